"""How the student's forward runs (tokenrl.lm.precision): bf16 autocast against fp32 on CPU, SDPA against eager
attention, torch.compile against eager, and the run option's checks. The same on a GPU: tests/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms import make_algorithm
from tests.conftest import tiny_llama
from tokenrl.lm.models import make_student
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.lm.precision import ATTENTION, PRECISIONS, autocast, check_precision, compiled_body
from tokenrl.run.checks import ConfigError, check_config
from tokenrl.run.config import make_run_config

ALGOS = {
    "bc": ("bc", {}),
    "iql_bd": ("iql_bd", {}),
    "iql_bd, vocabulary shift": ("iql_bd", {"q_shift": "vocab", "ce_coef": 0.0}),
    "kd": ("kd", {}),
}
"""The SFT warm start, the default recipe, the paper's pure BD loss and a dense-teacher loss."""

LOSS_RTOL = 2e-2
"""bf16 against fp32 on the same weights and batch, relative. bf16 keeps 8 significant bits: rounding a matrix
product's input moves it by at most 2^-9 (0.2%) relative, and the student's logits carry a few such roundings
(two decoder blocks and the head; products accumulate in float32). The losses sum those logits or subtract them:
the first-step differences measured here are 0.05% (kd) to 0.7% (the vocabulary-max shift, which subtracts two
rounded logits), 0.5-2% after 10 updates of diverging weights. 2% bounds them; a run whose formulas lost their
float32 upcast is not what this catches (that is tests/test_backup.py's business), a missing autocast is (the
difference is then exactly 0, asserted separately)."""


def _student(vocab: int, seed: int = 0) -> torch.nn.Module:
    # A large init gives peaked logits, so the losses depend on them and not only on log(V).
    return tiny_llama(vocab, seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, initializer_range=0.3)


def _vocab(buffer) -> int:
    return int(max(max(r) for r in buffer.responses)) + 1


@pytest.mark.parametrize("label", list(ALGOS))
def test_bf16_loss_and_gradient_match_fp32_on_the_same_weights(label, synthetic_buffer):
    name, extra = ALGOS[label]
    V = _vocab(synthetic_buffer)
    results = {}
    for precision in PRECISIONS:
        policy = CausalLMPolicy(_student(V), V, precision=precision)
        algo = make_algorithm(name, policy, extra, total_steps=10)
        batch = synthetic_buffer.sample(16, torch.Generator().manual_seed(0), top_p=algo.top_p)
        loss, _ = algo.compute_loss(batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results[precision] = float(loss.detach()), grad
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 != loss32, "bf16 gave the fp32 loss exactly: the autocast did not run"
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99


def test_bf16_runs_the_body_and_head_in_bf16_and_keeps_float32_master_weights(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    policy = CausalLMPolicy(_student(V), V, precision="bf16")
    algo = make_algorithm("iql_bd", policy, {}, total_steps=10)
    batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p)
    h_BSD = policy.state_hidden(batch)
    assert policy.dense_logits(h_BSD).dtype == torch.bfloat16
    assert policy.sparse_logits(h_BSD, batch.cand_ids_BSK).dtype == torch.bfloat16
    # The chunked full-vocabulary pass upcasts its logits before its log-sum-exp.
    assert policy.vocab_stats(h_BSD, batch.actions_BT, need_max=True).nll_BT.dtype == torch.float32
    algo.update(batch)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    moments = [v for state in algo.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@pytest.mark.parametrize("label", ["bc", "iql_bd"])
def test_bf16_training_tracks_fp32(label, synthetic_buffer):
    name, extra = ALGOS[label]
    V = _vocab(synthetic_buffer)
    curves = {}
    for precision in PRECISIONS:
        algo = make_algorithm(name, CausalLMPolicy(_student(V), V, precision=precision), extra, total_steps=10)
        generator = torch.Generator().manual_seed(0)
        curves[precision] = np.array([
            algo.update(synthetic_buffer.sample(16, generator, top_p=algo.top_p))["loss/total"] for _ in range(10)
        ])
    assert curves["fp32"][-1] < curves["fp32"][0]  # it learns, so the comparison is over a moving curve
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=LOSS_RTOL)


def test_bf16_with_activation_checkpointing_recomputes_under_the_autocast(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    grads = []
    for checkpointing in (False, True):
        model, _ = make_student("fresh", config_overrides=dict(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, initializer_range=0.3), gradient_checkpointing=checkpointing)
        policy = CausalLMPolicy(model, V, precision="bf16")
        algo = make_algorithm("iql_bd", policy, {}, total_steps=10)
        loss, _ = algo.compute_loss(synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p))
        loss.backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    # The recomputed forward must round like the original one (same autocast), so the gradients agree.
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


TINY_RUN = {
    "algo": {"name": "iql_bd"},
    "steps": 6,
    "sft_steps": 3,
    "batch_size": 8,
    "task": {"n_train_prompts": 24, "samples_per_prompt": 1, "n_val_prompts": 4, "n_test_prompts": 4, "max_new_tokens": 8},
    "eval": {"seeds": [0], "decode_top_p": [1.0]},
    "teacher_eval": False,
    "init_eval": False,
    "progress": False,
    "checkpoint_seconds": 0,
}


def test_precision_bf16_trains_through_the_run_and_tracks_fp32(tmp_path):
    from tokenrl.run.trainer import run

    metrics = {}
    for precision in PRECISIONS:
        cfg = make_run_config({**TINY_RUN, "precision": precision, "data_dir": str(tmp_path / "data")})
        metrics[precision] = run(cfg, str(tmp_path / precision))
    last = {p: m["train"]["last_stats"]["loss/total"] for p, m in metrics.items()}
    assert metrics["bf16"]["config"]["precision"] == "bf16"
    assert last["bf16"] != last["fp32"]  # the warm start and the algorithm ran under the autocast
    assert last["bf16"] == pytest.approx(last["fp32"], rel=LOSS_RTOL)
    assert np.isfinite(metrics["bf16"]["final_eval"]["eval/kl_student_teacher"])


@pytest.mark.parametrize(
    "override, key",
    [({"precision": "fp16"}, "precision='fp16'"), ({"precision": "bf16", "model": {"dtype": "bfloat16"}}, "model.dtype=float32")],
)
def test_bad_precision_is_refused_naming_the_key_and_the_fix(override, key):
    with pytest.raises(ConfigError) as error:
        check_config(make_run_config({**TINY_RUN, **override}))
    assert key in str(error.value)


def test_check_precision_reports_each_problem():
    assert check_precision("fp32", "cpu", "bfloat16") == []  # bf16 weights trained as they are
    assert check_precision("bf16", "cpu", "float32") == []
    assert "not a torch device" in check_precision("bf16", "gpu", "float32")[0]
    with pytest.raises(ValueError, match="precision"):
        autocast("half", "cpu")
    with pytest.raises(ValueError, match="precision"):
        CausalLMPolicy(tiny_llama(), 64, precision="half")


# --------------------------------------------------------------------------------------------------
# Attention kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_students_and_loaded_models_use_sdpa(arch, tmp_path):
    from tokenrl.lm.models import load_causal_lm

    sizes = {"gpt2": dict(n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)}.get(
        arch, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    )
    student, _ = make_student("fresh", config_overrides={"model_type": arch, "vocab_size": 64, **sizes})
    assert student.config._attn_implementation == ATTENTION
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0")), eos_token="t0"
    )
    student.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_causal_lm(str(tmp_path))
    assert loaded.config._attn_implementation == ATTENTION


def test_sdpa_and_eager_attention_give_the_same_states(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(0))  # left-padded prompts, right-padded responses
    h = {}
    for attn in ("sdpa", "eager"):
        model = _student(V)
        model.config._attn_implementation = attn
        h[attn] = CausalLMPolicy(model, V).state_hidden(batch)
    torch.testing.assert_close(h["sdpa"], h["eager"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# torch.compile (aot_eager here: the same graph capture and autograd as inductor without its C++ compile,
# which takes minutes on 2 cores; inductor itself runs in tests/test_cuda.py and benchmarks/run.py figure 9)
# --------------------------------------------------------------------------------------------------
def test_compiled_body_gives_the_eager_loss_and_gradients_for_changing_widths(synthetic_buffer):
    V = _vocab(synthetic_buffer)
    eager = CausalLMPolicy(_student(V), V)
    compiled = CausalLMPolicy(_student(V), V, compile="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and saving unchanged
    algos = [make_algorithm("iql_bd", p, {}, total_steps=10) for p in (eager, compiled)]
    generator = torch.Generator().manual_seed(0)
    widths = set()
    for _ in range(3):
        batch = synthetic_buffer.sample(int(torch.randint(2, 9, (1,), generator=generator)), generator, top_p=0.8)
        widths.add(batch.input_ids_BL.shape)
        stats = [algo.update(batch) for algo in algos]
        assert stats[1]["loss/total"] == pytest.approx(stats[0]["loss/total"], rel=1e-5)
    assert len(widths) > 1
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_body_leaves_the_module_eager():
    model = tiny_llama()
    compiled_body(model.base_model, backend="aot_eager")
    assert type(model.base_model).__name__ == "LlamaModel" and not hasattr(model.base_model, "_orig_mod")
    assert not hasattr(model.base_model, "_compiled_call_impl") or model.base_model._compiled_call_impl is None
