"""The stages of the prepared GPU check (issue 22); ``benchmarks/gpu_check.sh`` runs them and collects one file.

Each stage appends a markdown section to ``--out``; ``--cpu-dry-run`` runs the same code on the CPU at tiny
shapes (tests/test_gpu_check.py), so only the device placement itself is left for the GPU.

    python benchmarks/gpu_check.py preflight --out F     # versions, the GPU, the packages the project imports
    python benchmarks/gpu_check.py steps --out F         # SFT / sparse BD / default recipe step at two shapes, bf16
    python benchmarks/gpu_check.py generate --out F      # TeacherSampler + top-p cache vs model.generate, batch 64
    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_check.py nccl --out F   # nccl, DDP and FSDP2 updates
    python benchmarks/gpu_check.py main-job --run-dir D --seconds S --out F        # the README main job's metrics

Timing: every variant is timed in interleaved rounds after a warm-up round (``torch.cuda.synchronize`` around
each call on a GPU); ratios are per round, reported as median [min-max]. Peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, one call per variant after the rounds.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "tensorboard": "tensorboard",
    "tqdm": "tqdm",
    "pytest": "pytest",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "gymnasium": "gymnasium",
    "farama_notifications": "farama-notifications",
    "rouge_score": "rouge-score",
    "nltk": "nltk",
    "defusedxml": "defusedxml",
}
"""Module -> distribution of everything the check imports. The GPU image lacks the last seven (hydra-core and
omegaconf for the configs, gymnasium for the envs, rouge-score for the metrics, and what they need that the image
does not hold); ``gpu_check.sh --download-wheels`` fetches them here, ``--wheels`` installs them there."""

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
"""Dense bf16 tensor-core peak (TFLOP/s, vendor datasheets, no sparsity) by a substring of the device name, first
match wins. The H200 SXM has the H100 SXM's 989.4; on this workplace's H200 an 8192^3 bf16 product ran at
~790 TFLOP/s (KINDS.md of the device tool), so an MFU of 80% is about that ceiling."""

SHAPES = {
    "GPT-2 small": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                        tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True),
}
"""The two students of the paper's settings (GPT-2 for GPT-2 XL, Qwen2.5-0.5B for Qwen2.5-3B), randomly
initialised with the released configs' shapes."""

DRY_SHAPES = {
    "GPT-2 small (dry run: 2 layers, d 64, vocab 1000)": dict(model_type="gpt2", vocab_size=1000, n_embd=64, n_layer=2,
                                                              n_head=4, n_positions=256, tie_word_embeddings=True,
                                                              bos_token_id=0, eos_token_id=0),
    "Qwen2.5-0.5B (dry run: 2 layers, d 64, vocab 2000)": dict(model_type="qwen2", vocab_size=2000, hidden_size=64,
                                                               intermediate_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, num_key_value_heads=2,
                                                               max_position_embeddings=256, tie_word_embeddings=True),
}

STEP_VARIANTS = {
    "sft (bc), fp32": ("bc", {}, "fp32"),
    "sft (bc)": ("bc", {}, "bf16"),
    "sparse BD, pure loss (paper's vocab shift, ce_coef=0)": ("iql_bd", {"q_shift": "vocab", "ce_coef": 0.0}, "bf16"),
    "sparse BD, pure loss, q_shift=set (ce_coef=0)": ("iql_bd", {"ce_coef": 0.0}, "bf16"),
    "iql_bd default (sparse, q_shift=set, ce_coef=1)": ("iql_bd", {}, "bf16"),
}
"""Step variants: SFT (the baseline of the ratios, bf16) and in float32, the pure BD loss with both Q shifts and
the default recipe, each in bf16 autocast unless named."""
BASELINE = "sft (bc)"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _append(out: str, lines: list[str]) -> None:
    with open(out, "a") as f:
        f.write("\n".join(lines) + "\n\n")


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(variants: dict[str, Callable[[], object]], rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` interleaved rounds, after one untimed warm-up round."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _ratio(times: list[float], base: list[float]) -> str:
    ratios = [t / b for t, b in zip(times, base)]
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def _peak_gib(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocated GPU memory of one call (None on CPU, where the allocator keeps no such count)."""
    import torch

    if not device.startswith("cuda"):
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def _peak_tflops(override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "no GPU: MFU not computed"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak, f"{peak:g} TFLOP/s dense bf16 ({name}, datasheet)"
    return None, f"{name}: peak unknown, pass --peak-tflops"


def _build(shape: dict, device: str):
    """A randomly initialised float32 model of ``shape`` (a transformers config's fields), built on ``device``,
    with the attention kernel tokenrl asks for."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenrl.lm.precision import ATTENTION

    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    return model.train()


def _matmul_params(model) -> tuple[int, int]:
    """``(parameters of the decoder blocks, vocabulary x hidden of the output head)``."""
    from tokenrl.lm.models import decoder_layers

    body = sum(p.numel() for p in decoder_layers(model).parameters())
    head = model.get_output_embeddings().weight
    return body, head.shape[0] * head.shape[1]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def stage_preflight(args: argparse.Namespace) -> int:
    missing = [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"gpu_check: missing Python packages: {', '.join(missing)}. The GPU image has torch, transformers and "
            "tensorboard but not these. On a machine with PyPI, from the repository root: "
            "`bash benchmarks/gpu_check.sh --download-wheels .whl` (with `.whl/` in .git/info/exclude); carry .whl to "
            "the GPU machine and run `bash benchmarks/gpu_check.sh --wheels .whl`.",
            file=sys.stderr,
        )
        return 2
    import torch
    import transformers

    device = _device(args.cpu_dry_run)
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); on a CPU machine use "
              "--cpu-dry-run", file=sys.stderr)
        return 2
    gpu = "none (CPU dry run)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
               f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}, CUDA {torch.version.cuda}")
    _append(args.out, [
        "## Machine", "",
        "| item | value |", "|---|---|",
        f"| date | {time.strftime('%Y-%m-%d %H:%M')} |",
        f"| GPU | {gpu} |",
        f"| CPU | {platform.machine()}, {os.cpu_count()} cores |",
        f"| Python / torch / transformers | {platform.python_version()} / {torch.__version__} / {transformers.__version__} |",
        f"| peak used for MFU | {_peak_tflops(args.peak_tflops)[1]} |",
    ])
    return 0


def stage_steps(args: argparse.Namespace) -> int:
    import torch

    from algorithms import make_algorithm
    from step_cost import synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy

    dry, device = args.cpu_dry_run, _device(args.cpu_dry_run)
    B, T = (2, 16) if dry else (args.batch, args.response)
    P = 16  # step_cost.synthetic_buffer's prompts
    rounds = 1 if dry else args.rounds
    peak, peak_text = _peak_tflops(args.peak_tflops)
    lines = ["## Training step cost", "",
             f"Batch {B} x ({P} prompt + {T} response tokens), synthetic top-0.8 sets (step_cost.synthetic_buffer), "
             f"{rounds} interleaved rounds after a warm-up; one model and one AdamW state shared by the variants; "
             "bf16 = autocast with float32 master weights (`precision=bf16`). Tokens/s counts response tokens. "
             f"MFU: model FLOPs per step = B (P + T) (6 N_body + 12 L D (P + T)) + B (T + 1) 6 V D (body over every "
             f"column, PaLM's attention term, the head at the response states), the same for every variant, over "
             f"{peak_text}."]
    for shape_name, shape in (DRY_SHAPES if dry else SHAPES).items():
        torch.manual_seed(0)
        model = _build(shape, device)
        V = model.get_output_embeddings().weight.shape[0]
        n_body, n_head = _matmul_params(model)
        L, D = model.config.num_hidden_layers, model.config.hidden_size
        flops = B * (P + T) * (6 * n_body + 12 * L * D * (P + T)) + B * (T + 1) * 6 * n_head
        buffer = synthetic_buffer(V, T, B)
        assert buffer.collate([0]).prompt_width == P
        steps, shared = {}, None
        for name, (algo_name, extra, precision) in STEP_VARIANTS.items():
            algo = make_algorithm(algo_name, CausalLMPolicy(model, V, precision=precision), extra, total_steps=100)
            if shared is None:
                shared = algo.optimizer, algo.scheduler
            algo.optimizer, algo.scheduler = shared
            batch = buffer.collate(list(range(B)), top_p=algo.top_p).to(device)
            steps[name] = lambda a=algo, b=batch: a.update(b)
        times = _interleaved(steps, rounds, device)
        peaks = {name: _peak_gib(fn, device) for name, fn in steps.items()}
        lines += ["", f"**{shape_name}** ({(n_body + n_head) / 1e6:.3g}M parameters in matrix products, vocab {V})", "",
                  "| variant | ms/step | x sft (bc): median [min-max] | response tokens/s | peak GiB | MFU |",
                  "|---|---:|---|---:|---:|---:|"]
        for name, ts in times.items():
            med = statistics.median(ts)
            mfu = f"{100 * flops / med / (peak * 1e12):.1f}%" if peak else "n/a"
            gib = f"{peaks[name]:.1f}" if peaks[name] is not None else "n/a (CPU)"
            lines.append(f"| {name} | {1e3 * med:.1f} | {_ratio(ts, times[BASELINE])} | {B * T / med:,.0f} | {gib} | {mfu} |")
        del model, steps, shared
        if device == "cuda":
            torch.cuda.empty_cache()
    _append(args.out, lines)
    return 0


def stage_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from tokenrl.lm.sampling import TeacherSampler

    dry, device = args.cpu_dry_run, _device(args.cpu_dry_run)
    shape_name, shape = list((DRY_SHAPES if dry else SHAPES).items())[1]
    B, P, N = (4, 8, 8) if dry else (args.gen_batch, 32, args.new_tokens)
    rounds = 1 if dry else args.gen_rounds
    torch.manual_seed(0)
    model = _build(shape, device)
    with torch.no_grad():  # sharpen (tied embeddings: the logits scale too) so top-p sets are instruct-LM sized
        model.get_input_embeddings().weight.mul_(args.sharpen)
    model = model.to(torch.bfloat16).eval()  # a teacher runs in bf16 weights (task dolly_qwen: teacher_dtype)
    V = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, size=P).tolist() for _ in range(B)]
    prompt_BT = torch.tensor(prompts, device=device)
    sampler = TeacherSampler(model, N, eos_token_id=0, pad_token_id=0, batch_size=B, vocab_size=V)
    made: dict[str, float] = {}

    def hf_generate() -> None:
        with torch.no_grad():
            out = model.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
        made["model.generate (KV cache, no top-p cache)"] = (out.shape[1] - P) * B

    def with_cache() -> None:
        samples, caches = sampler.with_top_p_cache(prompts, 0, 0.8)
        made["tokenrl sampler + top-p cache (generate.py)"] = sum(len(r) for r, _ in samples)
        made["mean_set"] = float(np.mean(np.concatenate([c.sizes for c in caches])))

    def plain() -> None:
        made["tokenrl sampler only"] = sum(len(r) for r, _ in sampler(prompts, 0))

    times = _interleaved({"model.generate (KV cache, no top-p cache)": hf_generate,
                          "tokenrl sampler + top-p cache (generate.py)": with_cache,
                          "tokenrl sampler only": plain}, rounds, device)
    base = "model.generate (KV cache, no top-p cache)"
    lines = ["## Teacher-data generation", "",
             f"{shape_name}-shaped random teacher in bf16 weights (embeddings sharpened {args.sharpen}x: mean top-0.8 "
             f"set {made['mean_set']:.1f}), batch {B}, {P}-token prompts, {N} new tokens, {rounds} interleaved rounds "
             "after a warm-up. The tokenrl rows stop a row at EOS (rare here); `generate` is forced to the full length.",
             "", "| variant | s per batch | x generate: median [min-max] | tokens | tokens/s |", "|---|---:|---|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3g} | {_ratio(ts, times[base])} | {made[name]:.0f} | {made[name] / med:,.0f} |")
    _append(args.out, lines)
    return 0


def stage_nccl(args: argparse.Namespace) -> int:
    """Under torchrun (one process): the process group, the project's collectives, and one gradient-accumulated
    update of the real loss module under DDP and under FSDP2, checked against the plain full-batch gradient.

    The trainer treats a torchrun world of one as a plain run (no process group), and one GPU holds one nccl rank,
    so this stage joins the group itself and wraps the loss module as ``wrap_for_training`` does for a world of
    more than one.
    """
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from algorithms import make_algorithm
    from step_cost import synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy
    from tokenrl.run import distributed
    from tokenrl.run.step import optimizer_update

    if "LOCAL_RANK" not in os.environ:
        print("gpu_check nccl: run under torchrun (torchrun --standalone --nproc_per_node=1 ...)", file=sys.stderr)
        return 2
    dry = args.cpu_dry_run
    local_rank = int(os.environ["LOCAL_RANK"])
    device = "cpu" if dry else f"cuda:{local_rank}"
    if not dry:
        torch.cuda.set_device(device)
    backend = "gloo" if dry else "nccl"
    start = time.perf_counter()
    dist.init_process_group(backend)
    rows = [f"| init_process_group({backend}) | ok | {time.perf_counter() - start:.2f} |"]
    try:
        start = time.perf_counter()
        total = distributed.all_reduce_sum([1.5, 2.0])
        echoed = distributed.broadcast_object({"rank": dist.get_rank()})
        assert total == [1.5, 2.0] and echoed == {"rank": 0}, (total, echoed)
        rows.append(f"| all_reduce_sum, broadcast_object | ok | {time.perf_counter() - start:.2f} |")
        shape = dict(list(DRY_SHAPES.values())[1])
        buffer = synthetic_buffer(shape["vocab_size"], 16, 4)
        for strategy in ("ddp", "fsdp"):
            start = time.perf_counter()
            torch.manual_seed(0)
            model = _build(shape, device)
            V = model.get_output_embeddings().weight.shape[0]
            # float32, so the accumulated gradient can be compared with the full-batch one to float rounding.
            reference = CausalLMPolicy(copy.deepcopy(model), V)
            policy = CausalLMPolicy(model, V)
            loss_module = distributed.LossForward(policy)
            if strategy == "ddp":
                loss_fn = nn.parallel.DistributedDataParallel(loss_module, device_ids=None if dry else [local_rank])
            else:
                fully_shard(loss_module)
                loss_fn = loss_module
            # As in the trainer: the optimiser is built after the wrapping (FSDP replaces the parameters).
            algo = make_algorithm("bc", policy, {}, total_steps=10)
            micro = [buffer.collate(part).to(device) for part in ([0, 1], [2, 3])]
            stats = optimizer_update(algo, micro, loss_fn, distributed.DistContext())
            # bc's loss is a token mean, so the accumulated gradient is the full-batch gradient.
            ref_algo = make_algorithm("bc", reference, {}, total_steps=10)
            ref_stats = ref_algo.update(buffer.collate([0, 1, 2, 3]).to(device))
            for p, q in zip(policy.parameters(), reference.parameters()):
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                torch.testing.assert_close(grad, q.grad, rtol=1e-4, atol=1e-6)
            assert abs(stats["loss/total"] - ref_stats["loss/total"]) <= 1e-5 * abs(ref_stats["loss/total"])
            state = distributed.algo_state(algo, loss_fn, distributed.DistContext())
            distributed.load_algo_state(algo, state, loss_fn)
            policy.precision = "bf16"  # and one accumulated update under the autocast
            bf16_loss = optimizer_update(algo, micro, loss_fn, distributed.DistContext())["loss/total"]
            assert bf16_loss == bf16_loss and abs(bf16_loss) < float("inf"), bf16_loss
            with distributed.full_parameters(loss_fn):
                n = sum(p.numel() for p in model.parameters())
            rows.append(f"| {strategy}: accumulated update of 2 micro-batches = the full-batch gradient; state gathered "
                        f"and restored; a bf16 update ({n:,} parameters) | ok | {time.perf_counter() - start:.2f} |")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _append(args.out, ["## One-process torchrun", "",
                       f"`torchrun --standalone --nproc_per_node=1`, backend {backend}, device {device}.", "",
                       "| check | result | s |", "|---|---|---:|", *rows])
    return 0


def stage_main_job(args: argparse.Namespace) -> int:
    with open(os.path.join(args.run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    train, final = metrics["train"], metrics["final_eval"]
    keys = ["eval/kl_student_teacher", "eval/kl_teacher_student", "eval/teacher_nll", "eval/response_len"]
    lines = ["## README main job", "", f"`{args.command}` ({args.seconds:.0f} s wall clock, process start included)",
             "", "| metric | value |", "|---|---:|"]
    lines += [f"| final {k} | {final[k]:.4g} |" for k in keys if k in final]
    lines += [f"| train.{k} | {v:.1f} |" for k, v in train.items() if k.endswith("_s") and isinstance(v, (int, float))]
    lines.append(f"| device, precision | {metrics['config']['device']}, {metrics['config'].get('precision', 'fp32')} |")
    _append(args.out, lines)
    return 0


STAGES = {"preflight": stage_preflight, "steps": stage_steps, "generate": stage_generate, "nccl": stage_nccl,
          "main-job": stage_main_job}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--out", required=True, help="markdown file the stage appends its section to")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    ap.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    ap.add_argument("--batch", type=int, default=16, help="steps: trajectories per step")
    ap.add_argument("--response", type=int, default=496, help="steps: response tokens (after 16 prompt tokens: 512)")
    ap.add_argument("--rounds", type=int, default=5, help="steps: timed rounds")
    ap.add_argument("--gen-batch", type=int, default=64, help="generate: prompts per batch")
    ap.add_argument("--new-tokens", type=int, default=128, help="generate: new tokens")
    ap.add_argument("--gen-rounds", type=int, default=3, help="generate: timed rounds")
    ap.add_argument("--sharpen", type=float, default=8.0, help="generate: embedding scale of the random teacher")
    ap.add_argument("--run-dir", help="main-job: the run's output directory")
    ap.add_argument("--seconds", type=float, default=float("nan"), help="main-job: its wall-clock seconds")
    ap.add_argument("--command", default="python experiments/run.py", help="main-job: the command that ran")
    args = ap.parse_args()
    if args.cpu_dry_run and args.stage != "preflight":
        import torch

        torch.set_num_threads(1)  # the dry run shares a small CPU with the test suite
    sys.exit(STAGES[args.stage](args))


if __name__ == "__main__":
    main()
