"""The paper's scale, planned from measured costs (issue 22, item 4): wall clock and memory of the paper's two
settings for offline BD with the top-p cache, the released BD recipe (teacher forward on every batch) and MiniLLM
(student rollouts on every iteration), on 1 and 8 GPUs with FSDP.

    python benchmarks/paper_scale.py --measure /tmp/costs.json          # CPU per-token costs, one thread (~2 min)
    python benchmarks/paper_scale.py --costs /tmp/costs.json --out BENCHMARKS.md   # the section, from those costs

The first command times, on this machine's CPU, the operations the plan is made of: a training step (SFT and the
default ``iql_bd`` recipe), a teacher forward without gradient, teacher-data generation (``TeacherSampler`` with
the top-p cache, and transformers' ``generate``) and the released recipe's dense top-p masks, each as seconds per
token and as achieved FLOP/s (model FLOPs per token over its time); the pairs that are compared are timed
interleaved (benchmarks/run.py's rounds), so their ratios are side by side. The second turns them into the plan: the FLOPs
and bytes of every stage of each setting (parameter counts from the released configs, built on the meta device),
divided by a GPU's rate at the assumed utilisation (:data:`GPU`, :data:`ASSUMED`), and, as a cross-check that uses
the measured costs directly, by the CPU's measured rate. The section replaces the text between the
``<!-- paper scale -->`` markers of ``--out``. Every assumption is a named constant below and printed with the
tables; GPU rates are assumptions until ``benchmarks/gpu_check.sh`` measures them on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

MODELS = {
    "Qwen2.5-3B": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "GPT-2 XL": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25),
    "GPT-2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12),
}
"""The released configs' shapes (Qwen/Qwen2.5-*-Instruct, openai-community/gpt2*)."""

SETTINGS = {"Qwen2.5-3B -> Qwen2.5-0.5B": ("Qwen2.5-3B", "Qwen2.5-0.5B"), "GPT-2 XL -> GPT-2": ("GPT-2 XL", "GPT-2")}

DATA = dict(prompts=15011, held_out=0.066, samples_per_prompt=8, prompt_tokens=256, response_tokens=256)
"""databricks-dolly-15k (15,011 prompts) less the validation and test splits of ``task=dolly_qwen`` (3.3% each),
8 teacher samples per prompt; every prompt and response at its cap (``max_prompt_tokens`` = ``max_new_tokens`` =
256, length 512): an upper bound, real Dolly responses are shorter."""

TRAIN = dict(iterations=5000, batch=64, micro_batch=8)
"""5000 iterations at a global batch of 64 sequences of length 512; micro-batches of 8 sequences (1 GPU: 8
accumulation steps; 8 GPUs: one micro-batch per rank)."""

GPU = dict(name="H200 SXM", peak_tflops=989.4, hbm_tb_s=4.8, hbm_gib=141, nvlink_gb_s=300.0)
"""Dense bf16 peak and HBM bandwidth from the datasheet; NVLink: an effective 300 GB/s per GPU for ring
collectives (NVLink 4 moves 450 GB/s each way)."""

ASSUMED = dict(mfu_train=0.40, mfu_forward=0.40, bandwidth_efficiency=0.6, launch_us_per_layer=40.0,
               activation_bytes_per_token_layer_per_hidden=34, mask_passes=3)
"""Assumed, not measured (``gpu_check.sh`` measures the first three): model-FLOPs utilisation of a bf16 training
step and of a teacher forward over a batch; the fraction of HBM bandwidth a decode step reaches; the kernel-launch
time per decoder layer and decode step (about eight kernels of 5 us); activations per token and layer (Korthikanti
et al. 2022, 34 x hidden bytes for 16-bit activations, no score matrix with flash/SDPA attention); passes over a
float32 ``[tokens, V]`` logits tensor that the released recipe's dense top-p masks take (softmax, sort, cumsum)."""


# --------------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------------
@functools.cache
def model_sizes(name: str) -> dict:
    """Parameters (all, in matrix products incl. the output head, per layer shapes) of a released config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(MODELS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    positions = getattr(model.base_model, "wpe", None)
    lookups = embed.numel() + (positions.weight.numel() if positions is not None else 0)
    tied = head.data_ptr() == embed.data_ptr() or config.tie_word_embeddings
    kv_dim = getattr(config, "num_key_value_heads", config.num_attention_heads) * (
        config.hidden_size // config.num_attention_heads)
    return {"params": total, "matmul": total - lookups + (head.numel() if tied else 0), "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "vocab": head.shape[0], "kv_dim": kv_dim}


# --------------------------------------------------------------------------------------------------
# Measured CPU costs
# --------------------------------------------------------------------------------------------------
def _timed(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each variant, timed interleaved (benchmarks/run.py), and the median per-round
    ratio of each variant to the first one."""
    from run import _interleaved, _median_ratio

    times = _interleaved(variants, repeats)
    first = next(iter(variants))
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: _median_ratio(times, k, first) for k in times})


def measure(repeats: int) -> dict:
    """Seconds per token and achieved FLOP/s of each operation of the plan, on this CPU, one thread."""
    import numpy as np
    import torch

    from algorithms import make_algorithm
    from run import _smol_like
    from step_cost import random_llama, synthetic_buffer
    from tokenrl.core.top_p import top_p_mask
    from tokenrl.lm.policy import CausalLMPolicy
    from tokenrl.lm.sampling import TeacherSampler

    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, B, P, T = 32000, 4, 16, 128

    def matmul_params(model) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) + (
            model.get_output_embeddings().weight.numel() if model.config.tie_word_embeddings else 0)

    out: dict = {"shapes": {}, "ops": {}}
    student = random_llama(V, 256, 4, 2 * T + 64)
    n_student = matmul_params(student)
    buffer = synthetic_buffer(V, T, B)
    algos = {name: make_algorithm(algo, CausalLMPolicy(student, V), extra, total_steps=100)
             for name, (algo, extra) in {"sft": ("bc", {}), "iql_bd": ("iql_bd", {})}.items()}
    seconds, ratios = _timed({name: lambda a=algo, b=buffer.collate(list(range(B)), top_p=algo.top_p): a.update(b)
                              for name, algo in algos.items()}, repeats)
    for name in algos:
        out["ops"][f"train step ({name})"] = {"s_per_token": seconds[name] / (B * (P + T)), "flops_per_token": 6 * n_student}
    out["ratios"] = {"iql_bd step / sft step": ratios["iql_bd"]}
    out["shapes"]["student"] = f"Llama 4 layers, d 256, vocab {V} ({n_student / 1e6:.0f}M in products), batch {B} x ({P} + {T})"

    teacher = random_llama(V, 512, 8, 2 * T + 64).eval()
    n_teacher = matmul_params(teacher)
    tokens_BL = torch.randint(1, V, (B, P + T))

    def forward() -> None:
        with torch.no_grad():
            teacher(input_ids=tokens_BL).logits

    with torch.no_grad():
        logits_NV = teacher(input_ids=tokens_BL).logits.reshape(-1, V).float()
    seconds, _ = _timed({"forward": forward, "mask": lambda: top_p_mask(logits_NV, 0.8)}, repeats)
    out["ops"]["teacher forward (no grad)"] = {"s_per_token": seconds["forward"] / (B * (P + T)),
                                               "flops_per_token": 2 * n_teacher}
    out["ops"]["dense top-p mask (released recipe)"] = {"s_per_token": seconds["mask"] / logits_NV.shape[0],
                                                        "flops_per_token": None}
    out["shapes"]["teacher"] = f"Llama 8 layers, d 512, vocab {V} ({n_teacher / 1e6:.0f}M), batch {B} x {P + T}"

    gen_model = _smol_like(dict(vocab=49152, layers=4, sharpen=8.0))
    n_gen = matmul_params(gen_model)
    rng = np.random.default_rng(0)
    Bg, N = 8, 32
    prompts = [rng.integers(1, 49152, size=16).tolist() for _ in range(Bg)]
    sampler = TeacherSampler(gen_model, N, eos_token_id=0, pad_token_id=0, batch_size=Bg, vocab_size=49152)
    prompt_BT = torch.tensor(prompts)

    def generate() -> None:
        with torch.no_grad():
            gen_model.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), do_sample=True, top_k=0,
                               top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)

    seconds, ratios = _timed({"decode, transformers generate": generate,
                              "decode, TeacherSampler + top-p cache": lambda: sampler.with_top_p_cache(prompts, 0, 0.8)},
                             repeats)
    for name, value in seconds.items():
        out["ops"][name] = {"s_per_token": value / (Bg * N), "flops_per_token": 2 * n_gen}
    out["ratios"]["TeacherSampler + cache / generate"] = ratios["decode, TeacherSampler + top-p cache"]
    out["shapes"]["generation"] = (f"figure 3's teacher with 4 layers (d 576, vocab 49152, {n_gen / 1e6:.0f}M), "
                                   f"batch {Bg}, 16-token prompts, {N} new tokens")
    out["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": 1, "repeats": repeats,
                   "torch": torch.__version__, "load_average": os.getloadavg()[0]}
    return out


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def _decode_step_s(model: dict, batch: int, context: float, weight_bytes: int) -> float:
    """GPU seconds of one decode step of ``batch`` rows: the larger of its FLOPs at the forward utilisation and its
    bytes (weights plus the KV cache of ``context`` tokens per row) at the assumed bandwidth, plus launch time."""
    flops = 2 * model["matmul"] * batch
    kv_bytes = 2 * model["layers"] * model["kv_dim"] * 2 * context * batch  # K and V, bf16
    compute = flops / (GPU["peak_tflops"] * 1e12 * ASSUMED["mfu_forward"])
    memory = (weight_bytes * model["params"] + kv_bytes) / (GPU["hbm_tb_s"] * 1e12 * ASSUMED["bandwidth_efficiency"])
    return max(compute, memory) + model["layers"] * ASSUMED["launch_us_per_layer"] * 1e-6


def plan(costs: dict) -> tuple[list[str], list[str]]:
    """The estimate rows (markdown) and the per-operation table, from the measured CPU costs."""
    ops = costs["ops"]
    cpu_rate = {k: v["flops_per_token"] / v["s_per_token"] for k, v in ops.items() if v["flops_per_token"]}
    bd_over_sft = costs["ratios"]["iql_bd step / sft step"]
    cache_over_generate = costs["ratios"]["TeacherSampler + cache / generate"]
    peak = GPU["peak_tflops"] * 1e12
    prompts = round(DATA["prompts"] * (1 - DATA["held_out"]))
    trajectories = prompts * DATA["samples_per_prompt"]
    L = DATA["prompt_tokens"] + DATA["response_tokens"]
    step_tokens = TRAIN["batch"] * L
    rows = []
    for setting, (teacher_name, student_name) in SETTINGS.items():
        t, s = model_sizes(teacher_name), model_sizes(student_name)
        for world in (1, 8):
            micro = TRAIN["micro_batch"]
            # Data: the teacher samples every trajectory (ranks take disjoint shards); prefill is a forward.
            gen_prefill_s = trajectories * DATA["prompt_tokens"] * 2 * t["matmul"] / (peak * ASSUMED["mfu_forward"])
            gen_steps = math.ceil(trajectories / (TRAIN["batch"] * world)) * DATA["response_tokens"]
            context = DATA["prompt_tokens"] + DATA["response_tokens"] / 2
            gen_decode_s = gen_steps * _decode_step_s(t, TRAIN["batch"], context, 2)
            data_s = gen_prefill_s / world + gen_decode_s
            data_cpu_s = trajectories * (DATA["prompt_tokens"] * 2 * t["matmul"] / cpu_rate["teacher forward (no grad)"]
                                         + DATA["response_tokens"] * 2 * t["matmul"]
                                         / cpu_rate["decode, TeacherSampler + top-p cache"])
            # One iteration's pieces (per GPU, the global batch split over the ranks).
            train_s = 6 * s["matmul"] * step_tokens / (peak * ASSUMED["mfu_train"]) / world
            comm_s = 0.0 if world == 1 else 2 * 4 * s["params"] * (world - 1) / world / (GPU["nvlink_gb_s"] * 1e9)
            teacher_s = 2 * t["matmul"] * step_tokens / (peak * ASSUMED["mfu_forward"]) / world
            mask_s = (step_tokens * t["vocab"] * 4 * ASSUMED["mask_passes"]
                      / (GPU["hbm_tb_s"] * 1e12 * ASSUMED["bandwidth_efficiency"]) / world)
            student_fwd_s = 2 * s["matmul"] * step_tokens / (peak * ASSUMED["mfu_forward"]) / world
            rollout_s = DATA["response_tokens"] * _decode_step_s(s, TRAIN["batch"] // world, context, 4)
            cpu_train = 6 * s["matmul"] * step_tokens * bd_over_sft / cpu_rate["train step (iql_bd)"]
            cpu_teacher = 2 * t["matmul"] * step_tokens / cpu_rate["teacher forward (no grad)"]
            cpu_mask = step_tokens * ops["dense top-p mask (released recipe)"]["s_per_token"] * t["vocab"] / 32000
            cpu_rollout = TRAIN["batch"] * DATA["response_tokens"] * 2 * s["matmul"] / cpu_rate["decode, transformers generate"]
            cpu_student_fwd = 2 * s["matmul"] * step_tokens / cpu_rate["teacher forward (no grad)"]
            methods = {
                "offline BD, top-p cache (ours)": (data_s, train_s * bd_over_sft + comm_s, data_cpu_s, cpu_train, False),
                "released BD (teacher forward + dense masks every batch)":
                    (data_s, train_s + teacher_s + mask_s + comm_s, data_cpu_s, cpu_train + cpu_teacher + cpu_mask, True),
                "MiniLLM (student rollouts + teacher forward every iteration)":
                    (0.0, rollout_s + teacher_s + student_fwd_s + train_s + comm_s, 0.0,
                     cpu_rollout + cpu_teacher + cpu_student_fwd + cpu_train, True),
            }
            for method, (d_s, step_s, d_cpu, step_cpu, holds_teacher) in methods.items():
                total_h = (d_s + TRAIN["iterations"] * step_s) / 3600
                cpu_days = (d_cpu + TRAIN["iterations"] * step_cpu) / 86400
                memory = memory_gib(s, t, world, micro, holds_teacher, dense_logits="released" in method)
                fits = "yes" if memory <= GPU["hbm_gib"] else "**no**"
                cpu_cell = f"{cpu_days:,.0f}" if world == 1 else "(as 1 GPU)"
                rows.append(f"| {setting} | {method} | {world} | {d_s / 3600:.2f} | "
                            f"{TRAIN['iterations'] * step_s / 3600:.2f} | {total_h:.2f} | {memory:.0f} ({fits}) | "
                            f"{cpu_cell} |")
    op_rows = []
    for name, v in ops.items():
        rate = f"{cpu_rate[name] / 1e9:.1f}" if name in cpu_rate else "(bytes-bound)"
        op_rows.append(f"| {name} | {1e6 * v['s_per_token']:.1f} | {rate} | not measured |")
    notes = [f"Measured side by side (median of the per-round ratios): the default iql_bd step / the SFT step "
             f"{bd_over_sft:.2f}x (applied to the BD training time); TeacherSampler with the top-p cache / generate "
             f"{cache_over_generate:.2f}x (4 layers: the set's per-token cost is a larger share of a shallow model's "
             "step than of figure 3's)."]
    return rows, op_rows + ["", *notes]


def memory_gib(s: dict, t: dict, world: int, micro: int, holds_teacher: bool, dense_logits: bool) -> float:
    """Peak GPU memory per rank of a training step (GiB).

    Student: float32 master weights, gradients and AdamW moments (16 bytes per parameter); with FSDP as
    implemented (one group at the root) the AdamW moments and the stored parameters are sharded, but a micro-batch's
    forward and backward hold the gathered parameters and the full gradients (8 bytes per parameter + 12 / world).
    Activations: 34 x hidden bytes per token and layer for a micro-batch of length 512, plus the chunked
    full-vocabulary pass (1024 positions x V, float32 logits, their softmax and gradient). Teacher (released recipe,
    MiniLLM): bf16 weights on every rank, and for the released recipe its dense float32 logits of the micro-batch,
    sorted once (values and int64 indices).
    """
    L = DATA["prompt_tokens"] + DATA["response_tokens"]
    states = 16 * s["params"] if world == 1 else 8 * s["params"] + 12 * s["params"] / world
    activations = ASSUMED["activation_bytes_per_token_layer_per_hidden"] * s["hidden"] * s["layers"] * micro * L
    vocab_chunk = 3 * 4 * 1024 * s["vocab"]
    teacher = 2 * t["params"] if holds_teacher else 0
    logits = micro * L * t["vocab"] * (4 + 4 + 8) if dense_logits else 0
    return (states + activations + vocab_chunk + teacher + logits) / 2**30


def section(costs: dict) -> str:
    rows, op_rows = plan(costs)
    meta = costs["meta"]
    sizes = {name: model_sizes(name) for name in MODELS}
    prompts = round(DATA["prompts"] * (1 - DATA["held_out"]))
    return "\n".join([
        "<!-- paper scale -->",
        "## The paper's scale, planned from measured costs",
        "",
        "Produced by `python benchmarks/paper_scale.py --measure costs.json` (CPU costs, "
        f"{meta['date']}, one thread, load average {meta['load_average']:.1f}, median of {meta['repeats']}) and "
        "`python benchmarks/paper_scale.py --costs costs.json --out BENCHMARKS.md` (this section). No GPU was "
        "available in this session: every GPU figure below is an estimate from FLOPs, bytes and the assumptions "
        "listed, not a measurement.",
        "",
        "**Measured costs (CPU, this session).** Shapes: " + "; ".join(f"{k}: {v}" for k, v in costs["shapes"].items())
        + ". Achieved rate = model FLOPs per token (6N for a training step, 2N for a forward or a decoded token, N = "
          "parameters in matrix products) over the measured time.",
        "",
        "| operation | CPU us per token | CPU achieved GFLOP/s | GPU (gpu_check.sh) |",
        "|---|---:|---:|---|",
        *op_rows,
        "",
        "**Settings.** " + ", ".join(f"{k}: {v['params'] / 1e9:.3g}B parameters ({v['matmul'] / 1e9:.3g}B in products, "
                                     f"{v['layers']} layers, d {v['hidden']}, vocab {v['vocab']})" for k, v in sizes.items())
        + f". Data: {DATA['prompts']:,} Dolly prompts less {100 * DATA['held_out']:.1f}% held out = {prompts:,}, "
          f"{DATA['samples_per_prompt']} samples each ({prompts * DATA['samples_per_prompt']:,} trajectories), prompt "
          f"and response at their caps ({DATA['prompt_tokens']} + {DATA['response_tokens']} tokens: an upper bound). "
          f"Training: {TRAIN['iterations']} iterations x {TRAIN['batch']} sequences x 512 tokens, micro-batch "
          f"{TRAIN['micro_batch']} (1 GPU: {TRAIN['batch'] // TRAIN['micro_batch']} accumulation steps; 8 GPUs: one "
          "micro-batch per rank, `dist.strategy=fsdp`).",
        "",
        f"**Assumptions (GPU).** {GPU['name']}: {GPU['peak_tflops']} TFLOP/s dense bf16, {GPU['hbm_tb_s']} TB/s HBM, "
        f"{GPU['hbm_gib']} GiB, NVLink {GPU['nvlink_gb_s']:.0f} GB/s effective for collectives. Training step: 6N "
        f"FLOPs per token at {100 * ASSUMED['mfu_train']:.0f}% MFU (`precision=bf16`), times the measured BD/SFT "
        f"step ratio for BD; teacher and student forwards without gradient (and prefill): 2N at "
        f"{100 * ASSUMED['mfu_forward']:.0f}%; a decode step of 64 rows: the larger of its 2N x 64 FLOPs at that MFU "
        f"and its bytes (weights: bf16 teacher, float32 student since sampling runs in the weights' dtype; the KV "
        f"cache of the average context) at {100 * ASSUMED['bandwidth_efficiency']:.0f}% of HBM bandwidth, plus "
        f"{ASSUMED['launch_us_per_layer']:.0f} us of kernel launches per layer; the released recipe's dense top-p masks: "
        f"{ASSUMED['mask_passes']} passes over float32 [tokens, V] logits at that bandwidth; FSDP: per iteration a "
        "reduce-scatter of float32 gradients and an all-gather of float32 parameters. 8 GPUs: every stage split "
        "evenly over the ranks (data shards, micro-batches, rollout prompts), each rank holding a full teacher. "
        "Memory: see `memory_gib` in the script (float32 master weights, gradients and AdamW = 16 bytes per "
        f"parameter; activations {ASSUMED['activation_bytes_per_token_layer_per_hidden']} x hidden bytes per token "
        "and layer; the chunked full-vocabulary pass; the bf16 teacher; the released recipe's dense logits). The CPU "
        "column divides the same FLOPs by the CPU's measured rates (one core), a cross-check of scale only.",
        "",
        "| setting | method | GPUs | data generation h | training h | total h | peak GiB per GPU (fits 141?) "
        "| 1 CPU core, measured rates: days |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "What the plan says: the offline recipe pays the teacher once, in data generation (decode-bound: a decode step "
        "reads the teacher's weights for 64 tokens), and then trains at the student's cost; the released recipe pays a "
        "teacher forward over every training batch (2 N_teacher per token against 6 N_student: "
        + ", ".join(f"{2 * sizes[t]['matmul'] / (6 * sizes[st]['matmul']):.1f}x the student step for {k.split(' ->')[0]}"
                    for k, (t, st) in SETTINGS.items())
        + ") plus dense masks over the vocabulary; MiniLLM pays rollouts (decode, bound by bytes and launches, not "
        "FLOPs, so they do not shrink with more GPUs at a fixed batch) and a teacher forward every iteration. The SFT "
        "warm start all three begin with is not counted. These are estimates; "
        "`benchmarks/gpu_check.sh` measures the MFU of the training steps, generation tokens/s and peak memory on a "
        "GPU, and the assumptions above should be replaced by its numbers when a session has one.",
        "",
        "Commands for 8 GPUs on one machine (data once, then training with the paper's lr 5e-6, 100 warm-up steps, "
        "batch 64 and 5000 iterations; `hydra.run.dir` shared by the ranks; the SFT warm start keeps tokenrl's "
        "defaults, `sft_steps`, `sft_lr`):",
        "",
        "```bash",
        "export DOLLY_JSONL=databricks-dolly-15k.jsonl",
        "torchrun --standalone --nproc_per_node=8 experiments/generate.py task=dolly_qwen device=cuda threads=0 \\",
        "    data_dir=/shared/data_cache",
        "torchrun --standalone --nproc_per_node=8 experiments/run.py task=dolly_qwen model=pretrained \\",
        "    model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct algo=iql_bd algo.lr=5e-6 algo.warmup_steps=100 \\",
        "    device=cuda threads=0 precision=bf16 dist.strategy=fsdp steps=5000 batch_size=64 micro_batch_size=8 \\",
        "    data_dir=/shared/data_cache hydra.run.dir=outputs/bd_qwen",
        "# GPT-2 XL -> GPT-2: task=dolly_gpt2 model.name_or_path=gpt2 (the same two commands)",
        "```",
        "<!-- /paper scale -->",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", metavar="JSON", help="time the operations on this CPU and write their costs here")
    ap.add_argument("--repeats", type=int, default=3, help="--measure: timed repeats per operation (median)")
    ap.add_argument("--costs", metavar="JSON", help="the costs --measure wrote")
    ap.add_argument("--out", help="replace the <!-- paper scale --> section of this file (else print it)")
    args = ap.parse_args()
    if args.measure:
        with open(args.measure, "w") as f:
            json.dump(measure(args.repeats), f, indent=1)
        print(f"costs written to {args.measure}")
    if args.costs:
        with open(args.costs) as f:
            text = section(json.load(f))
        if not args.out:
            print(text)
            return
        old = open(args.out).read()
        pattern = re.compile(r"<!-- paper scale -->.*?<!-- /paper scale -->", flags=re.S)
        if not pattern.search(old):
            raise SystemExit(f"{args.out} has no <!-- paper scale --> ... <!-- /paper scale --> block to replace")
        with open(args.out, "w") as f:
            f.write(pattern.sub(lambda _: text, old))
    if not (args.measure or args.costs):
        ap.error("give --measure JSON and/or --costs JSON")


if __name__ == "__main__":
    main()
