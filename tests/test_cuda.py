"""The GPU path: training, bf16 autocast, torch.compile, the sampler and whole runs on a CUDA device.

Every test runs on ``TOKENRL_TEST_DEVICE`` (default ``cuda``) and is skipped when that is a CUDA device and none
is available, so the plain CPU suite skips this file. ``benchmarks/gpu_check.sh`` runs it on the GPU, and its
``--cpu-dry-run`` (tests/test_gpu_check.py) runs the same tests with ``TOKENRL_TEST_DEVICE=cpu``: then only the
device placement itself is left untested without a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from algorithms import make_algorithm
from tests.conftest import tiny_llama
from tests.test_precision import ALGOS, LOSS_RTOL, TINY_RUN, _student, _vocab
from tokenrl.core.top_p import top_p_mask, top_p_sparse
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.config import make_run_config

DEVICE = os.environ.get("TOKENRL_TEST_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"

pytestmark = pytest.mark.skipif(
    ON_GPU and not torch.cuda.is_available(), reason=f"TOKENRL_TEST_DEVICE={DEVICE} but CUDA is not available"
)

COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"
"""inductor on a GPU (Triton kernels); aot_eager on CPU, where inductor's C++ compile takes minutes on 2 cores."""


def _loss_and_grad(policy: CausalLMPolicy, name: str, extra: dict, batch) -> tuple[float, torch.Tensor]:
    algo = make_algorithm(name, policy, extra, total_steps=10)
    loss, _ = algo.compute_loss(batch)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten().cpu() for p in policy.parameters() if p.grad is not None])


def _batch(buffer, n: int, top_p: float | None = 0.8, seed: int = 0):
    return buffer.sample(n, torch.Generator().manual_seed(seed), top_p=top_p).to(DEVICE)


def test_fp32_loss_and_gradient_on_the_device_equal_the_cpu_ones(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    batch_cpu = synthetic_buffer.sample(16, torch.Generator().manual_seed(0), top_p=0.8)
    on_cpu = _loss_and_grad(CausalLMPolicy(_student(V), V), "iql_bd", {}, batch_cpu)
    on_device = _loss_and_grad(CausalLMPolicy(_student(V).to(DEVICE), V), "iql_bd", {}, batch_cpu.to(DEVICE))
    # TF32 is off by default in torch, so a GPU's float32 products round like the CPU's up to summation order.
    assert on_device[0] == pytest.approx(on_cpu[0], rel=1e-4)
    torch.testing.assert_close(on_device[1], on_cpu[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("label", list(ALGOS))
def test_bf16_loss_matches_fp32_on_the_device(label, synthetic_buffer):
    name, extra = ALGOS[label]
    V = _vocab(synthetic_buffer)
    batch = _batch(synthetic_buffer, 16, top_p=None if name != "iql_bd" else 0.8)
    losses = {
        precision: _loss_and_grad(CausalLMPolicy(_student(V).to(DEVICE), V, precision=precision), name, extra, batch)
        for precision in ("fp32", "bf16")
    }
    assert losses["bf16"][0] != losses["fp32"][0]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=LOSS_RTOL)
    assert float(torch.nn.functional.cosine_similarity(losses["bf16"][1], losses["fp32"][1], dim=0)) > 0.99


def test_bf16_updates_on_the_device_keep_float32_weights_and_moments(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    policy = CausalLMPolicy(_student(V).to(DEVICE), V, precision="bf16")
    algo = make_algorithm("iql_bd", policy, {}, total_steps=10)
    generator = torch.Generator().manual_seed(0)
    losses = [algo.update(synthetic_buffer.sample(16, generator, top_p=0.8).to(DEVICE))["loss/total"] for _ in range(8)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.device.type == torch.device(DEVICE).type for p in policy.parameters())
    moments = [v for s in algo.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_body_on_the_device_gives_the_eager_loss(precision, synthetic_buffer):
    V = _vocab(synthetic_buffer)
    stats = []
    for compile_ in (False, COMPILE_BACKEND):
        algo = make_algorithm("iql_bd", CausalLMPolicy(_student(V).to(DEVICE), V, precision, compile_), {}, total_steps=10)
        generator = torch.Generator().manual_seed(0)
        stats.append([algo.update(synthetic_buffer.sample(n, generator, top_p=0.8).to(DEVICE))["loss/total"]
                      for n in (8, 5, 8)])
    # Generated kernels may fuse and reorder float32 sums; under bf16 they may also round at other points.
    np.testing.assert_allclose(stats[1], stats[0], rtol=1e-4 if precision == "fp32" else LOSS_RTOL)


def test_sdpa_and_eager_attention_agree_on_the_device_under_bf16(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    batch = _batch(synthetic_buffer, 8, top_p=None)
    logits = {}
    for attn, precision in [("eager", "fp32"), ("sdpa", "bf16"), ("eager", "bf16")]:
        model = _student(V).to(DEVICE)
        model.config._attn_implementation = attn
        policy = CausalLMPolicy(model, V, precision=precision)
        logits[attn, precision] = policy.dense_logits(policy.state_hidden(batch)).float()
    reference = logits["eager", "fp32"]

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    # bf16 logits of this student are ~1.5% (in norm) from the float32 ones on CPU, with either kernel.
    assert distance(logits["sdpa", "bf16"], reference) < 3e-2
    assert distance(logits["sdpa", "bf16"], logits["eager", "bf16"]) < 3e-2


def test_probed_top_p_sets_on_the_device_equal_the_exact_rule():
    from tokenrl.lm.probed_sets import probed_top_p_sets
    from tests.test_sampling import _probe_cases

    for name, logits_BV in _probe_cases():
        logits_BV = logits_BV.to(DEVICE)
        sets = probed_top_p_sets(logits_BV, torch.log_softmax(logits_BV, -1), 0.8)
        exact = top_p_sparse(logits_BV, 0.8)
        assert torch.equal(sets.sizes_B, exact.sizes), name
        for b, n in enumerate(exact.sizes.tolist()):
            assert torch.equal(sets.ids_BK[b, :n], exact.ids[b, :n]), (name, b)
            assert torch.equal(sets.logprobs_BK[b, :n], exact.logprobs[b, :n]), (name, b)
        assert torch.equal(sets.mask(logits_BV), top_p_mask(logits_BV, 0.8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_pass_sets_on_the_device_equal_the_teacher_forced_pass(dtype):
    from tokenrl.lm.models import HFTeacher
    from tokenrl.lm.sampling import TeacherSampler
    from tokenrl.tasks.datagen import compute_top_p_cache
    from tests.test_models import word_tokenizer

    tokenizer = word_tokenizer()
    V = len(tokenizer)
    model = tiny_llama(V, initializer_range=0.3, eos_token_id=3, pad_token_id=1).to(DEVICE, dtype).eval()
    prompts = [np.random.default_rng(i).integers(4, V, size=3 + i % 4).tolist() for i in range(10)]
    sampler = TeacherSampler(model, 8, eos_token_id=3, pad_token_id=1, top_p=0.9, batch_size=4, vocab_size=V)
    samples, caches = sampler.with_top_p_cache(prompts, seed=0, p=0.8)
    assert [r for r, _ in samples] == [r for r, _ in sampler(prompts, seed=0)]  # the cache changes no sample
    two_pass = compute_top_p_cache(HFTeacher(model, tokenizer), prompts, [r for r, _ in samples], 0.8, batch_size=4)
    same_set, same_top = [], []
    for got, want, (response, _) in zip(caches, two_pass, samples):
        assert all(0 <= t < V for t in response)
        assert got.sizes.shape == want.sizes.shape == (len(response) + 1,) and int(got.sizes.min()) >= 1
        got_sets = np.split(got.ids, np.cumsum(got.sizes)[:-1])
        want_sets = np.split(want.ids, np.cumsum(want.sizes)[:-1])
        same_set += [np.array_equal(a, b) for a, b in zip(got_sets, want_sets)]
        same_top += [a[0] == b[0] for a, b in zip(got_sets, want_sets)]
    # The cached (one token) and the full forward run different kernels: their logits agree to float rounding, so
    # a set can differ where a member sits at the boundary; in bfloat16 the rounding is 2^-8 and such flips are
    # more frequent. A shifted state (an off-by-one) would make most sets differ.
    assert np.mean(same_set) >= (0.98 if dtype == torch.float32 else 0.6), np.mean(same_set)
    assert np.mean(same_top) >= (1.0 if dtype == torch.float32 else 0.9), np.mean(same_top)


@pytest.mark.parametrize("algo", ["iql_bd", "minillm"])
def test_synthetic_run_on_the_device(algo, tmp_path):
    from tokenrl.run.trainer import run

    overrides = {"rollout_every": 2, "rollout_prompts": 8, "batch_size": 8} if algo == "minillm" else {}
    cfg = make_run_config({**TINY_RUN, "algo": {"name": algo}, "device": DEVICE, "precision": "bf16",
                           "data_dir": str(tmp_path / "data"), **overrides})
    metrics = run(cfg, str(tmp_path / "out"))
    assert metrics["config"]["device"] == DEVICE and metrics["train"]["steps"] == cfg.steps
    assert np.isfinite(metrics["train"]["last_stats"]["loss/total"])
    assert np.isfinite(metrics["final_eval"]["eval/kl_student_teacher"])


def test_transformers_task_generates_and_trains_on_the_device(tmp_path):
    from tests.test_hf_task import _task_cfg, _write_prompts, _write_teacher
    from tokenrl.run.inputs import build_task
    from tokenrl.run.trainer import run

    _write_teacher(str(tmp_path / "teacher"))
    _write_prompts(str(tmp_path / "prompts.jsonl"))
    task_cfg = dataclasses.asdict(_task_cfg(tmp_path, n_references=0, eval_cache_dir=None))
    cfg = make_run_config({**TINY_RUN, "task": {"kind": "hf", **task_cfg}, "model": {"kind": "pruned", "keep_every": 2},
                           "device": DEVICE, "precision": "bf16", "batch_size": 4, "data_dir": str(tmp_path / "data")})
    task = build_task(cfg)
    assert next(task.teacher.model.parameters()).device.type == torch.device(DEVICE).type
    metrics = run(cfg, str(tmp_path / "out"))
    assert metrics["data"]["data/trajectories"] > 0
    assert np.isfinite(metrics["final_eval"]["eval/kl_student_teacher"])
