"""The benchmark suite: regenerates the figures of BENCHMARKS.md (issue 11).

Every figure compares variants measured side by side in one run: each repeat times every variant in turn
(interleaved, so machine load hits all of them alike), and the table reports each variant's median time
and, per repeat, its ratio to the baseline of that repeat (median and min-max over repeats). Figures 1-4
and 7 each run in a fresh subprocess and figure 5 one per configuration, so a peak memory is its own. Elapsed
seconds per figure are printed and written into BENCHMARKS.md.

    python benchmarks/run.py                   # all figures, rewrites BENCHMARKS.md (budget: < 25 min on 2 idle cores)
    python benchmarks/run.py --figures 1,6     # only these sections are replaced
    python benchmarks/run.py --quick --out /tmp/b.md   # tiny shapes, one repeat, one process: a smoke test

Figures: 1 BD step vs SFT step (GPT-2-small shape), 2 offline cache vs teacher forward on every batch,
3 teacher-data generation vs ``model.generate``, 4 cache bytes per token, 5 peak memory of one step at
vocabulary 150k, 6 sparse top-p value iteration vs full-action value iteration, 7 env rollout vs a raw
KV-cache loop, 9 the student's forward with bf16 autocast and torch.compile (CPU). The GPU figures are
``benchmarks/gpu_check.sh``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
END_MARK = "<!-- end of run.py output: everything below is kept as is -->"


# --------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------
def _interleaved(variants: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each zero-argument callable per repeat, variants interleaved within a repeat.

    ``warmup`` runs every variant once first, untimed (first-call allocations, lazy optimiser state).
    """
    for fn in variants.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _ratio_cells(times: list[float], base: list[float]) -> str:
    ratios = [t / b for t, b in zip(times, base)]
    med = statistics.median(ratios)
    return f"{med:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def _time_table(times: dict[str, list[float]], baseline: str, unit_scale: float = 1.0, unit: str = "s") -> list[str]:
    lines = [f"| variant | median {unit} | x {baseline}: median [min-max] over repeats |", "|---|---:|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts) * unit_scale:.3g} | {_ratio_cells(ts, times[baseline])} |")
    return lines


def _median_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    return statistics.median(t / b for t, b in zip(times[variant], times[baseline]))


def _goal(text: str, met: bool | None, measured: str) -> str:
    """The goal line of a figure: the issue's goal, whether this run meets it, and the measured value."""
    verdict = "not measured" if met is None else ("**met**" if met else "**missed**")
    return f"Goal (issue 11): {text} In this run: {verdict} ({measured})."


def _subprocess_json(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _step_cost(config: str, vocab: int, hidden: int, layers: int, batch: int, seq: int, steps: int, quick: bool) -> dict:
    args = dict(config=config, vocab=vocab, hidden=hidden, layers=layers, batch=batch, seq=seq, steps=steps, threads=1)
    if quick:  # in this process: a smoke test must not pay one torch import per configuration
        import step_cost

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            step_cost._worker(argparse.Namespace(**args))
        return json.loads(out.getvalue().strip().splitlines()[-1])
    cmd = [sys.executable, os.path.join(HERE, "step_cost.py")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return _subprocess_json(cmd)


def _worker_json(figure: str, params: dict, quick: bool) -> dict:
    if quick:
        return WORKERS[figure](params)
    return _subprocess_json([sys.executable, os.path.abspath(__file__), "--worker", figure, json.dumps(params)])


# --------------------------------------------------------------------------------------------------
# Figure 1: one training step, every configuration interleaved in one process; figure 5: peak memory of one
# step (benchmarks/step_cost.py, a fresh process per configuration)
# --------------------------------------------------------------------------------------------------
FIG1_ALL_THREADS = ["sft (bc, chunked full-vocab CE)", "bd sparse head, pure BD loss (paper's vocab shift, ce_coef=0)",
                    "iql_bd default (sparse, q_shift=set, LM term ce_coef=1)"]
"""The configurations also timed at all cores (the two goals' rows and their baseline)."""


def _worker_steps(params: dict) -> dict:
    import torch

    from algorithms import make_algorithm
    from step_cost import CONFIGS, random_llama, synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy

    torch.manual_seed(0)
    V, T, B = params["vocab"], params["seq"], params["batch"]
    # One model and one AdamW state shared by every configuration: the step costs the same whichever
    # parameters it starts from, and five Adam states of a GPT-2-small would not fit next to the other jobs.
    policy = CausalLMPolicy(random_llama(V, params["hidden"], params["layers"], 2 * T + 64), V)
    buf = synthetic_buffer(V, T, B)
    algos, steps = {}, {}
    for config, (name, extra) in CONFIGS.items():
        algos[config] = make_algorithm(name, policy, extra, total_steps=100)
        if len(algos) > 1:
            first = next(iter(algos.values()))
            algos[config].optimizer, algos[config].scheduler = first.optimizer, first.scheduler
        batch = buf.collate(list(range(B)), top_p=algos[config].top_p)
        steps[config] = lambda a=algos[config], b=batch: a.update(b)
    times = {}
    for threads in params["threads"]:
        torch.set_num_threads(threads)
        chosen = steps if threads == 1 else {c: steps[c] for c in FIG1_ALL_THREADS}
        # Warm from the one-thread rounds (optimiser state allocated, allocator warm).
        times[str(threads)] = _interleaved(chosen, params["repeats"], warmup=threads == params["threads"][0])
    return {"times": times, "mean_set": float(buf.set_sizes().mean())}


def figure_1(quick: bool, repeats: int) -> str:
    shape = dict(vocab=1000, hidden=64, layers=2, batch=2, seq=16) if quick else \
        dict(vocab=50257, hidden=768, layers=12, batch=4, seq=128)
    all_threads = os.cpu_count() or 1
    threads = [1] + ([all_threads] if all_threads > 1 and not quick else [])
    r = _worker_json("1", {**shape, "repeats": repeats, "threads": threads}, quick)
    base = "sft (bc, chunked full-vocab CE)"
    parts = []
    for n in threads:
        parts += ["", f"**{n} thread{'s' if n > 1 else ''}**", "", *_time_table(r["times"][str(n)], base)]
    one = r["times"]["1"]
    pure = {c: _median_ratio(one, c, base) for c in one if "pure BD" in c}
    default = _median_ratio(one, "iql_bd default (sparse, q_shift=set, LM term ce_coef=1)", base)
    parts += ["", _goal("the pure BD loss with the sparse head <= 0.75x an SFT step at GPT-2-small shape.",
                        all(v <= 0.75 for v in pure.values()),
                        ", ".join(f"{'set' if 'q_shift=set' in c else 'vocabulary'} shift {v:.2f}x"
                                  for c, v in pure.items()) + ", one thread"),
              "", _goal("the default `iql_bd` recipe < 1.0x an SFT step.", default < 1.0, f"{default:.2f}x, one thread")]
    return "\n".join([
        f"Every configuration of `benchmarks/step_cost.py` on one random untied Llama of GPT-2-small's shape "
        f"({shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}) in one process, steps "
        f"interleaved (SFT, then each BD configuration, then SFT again, ...), one warm-up round then {repeats} "
        f"timed rounds; batch {shape['batch']} x {shape['seq']} response tokens after a 16-token prompt; synthetic "
        f"top-0.8 sets (mean size {r['mean_set']:.1f}). The configurations share the model and one AdamW state "
        "(the step's cost does not depend on the weights). Peak memory per configuration: figure 5.", *parts,
    ])


def figure_5(quick: bool, repeats: int) -> str:
    shape = dict(vocab=20000, hidden=64, layers=2, batch=2, seq=16) if quick else dict(vocab=150000, hidden=256, layers=2, batch=4, seq=128)
    configs = ["sft (bc, chunked full-vocab CE)", "bd dense head (iql_bd default, sparse=False)",
               "iql_bd default (sparse, q_shift=set, LM term ce_coef=1)"]
    results = {c: _step_cost(c, steps=1, quick=quick, **shape) for c in configs}
    base = results[configs[0]]["peak_mb"]
    lines = ["| step | peak RSS MB (whole process) | x SFT |", "|---|---:|---:|"]
    lines += [f"| {c} | {r['peak_mb']:.0f} | {r['peak_mb'] / base:.2f} |" for c, r in results.items()]
    return "\n".join([
        f"Peak resident set (ru_maxrss) of a fresh process that builds a random 2-layer Llama (hidden "
        f"{shape['hidden']}, vocab {shape['vocab']}, untied) and runs two `iql_bd`/`bc` steps on batch "
        f"{shape['batch']} x {shape['seq']} (`benchmarks/step_cost.py --vocab {shape['vocab']} --hidden "
        f"{shape['hidden']} --seq {shape['seq']} --steps 1`). The peak includes the model, its Adam state and the "
        "Python runtime, which are common to all rows.", "", *lines, "",
        "Goal (issue 11): none beyond reporting the peaks (dense vs sparse head, and SFT).",
    ])


# --------------------------------------------------------------------------------------------------
# Figure 2: offline sparse cache vs the released recipe (teacher forward + dense masks every batch)
# --------------------------------------------------------------------------------------------------
def _worker_offline(params: dict) -> dict:
    import torch

    from algorithms import make_algorithm
    from step_cost import random_llama, synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy
    from tokenrl.core.top_p import top_p_mask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, T, B = params["vocab"], params["seq"], params["batch"]
    student = random_llama(V, params["hidden"], params["layers"], 2 * T + 64)
    teacher = random_llama(V, params["t_hidden"], params["t_layers"], 2 * T + 64).eval()
    buf = synthetic_buffer(V, T, B)
    algo = make_algorithm("iql_bd", CausalLMPolicy(student, V), {"sparse": True}, total_steps=100)
    dense = make_algorithm("iql_bd", CausalLMPolicy(random_llama(V, params["hidden"], params["layers"], 2 * T + 64), V),
                           {"sparse": False}, total_steps=100)
    batch = buf.collate(list(range(B)), top_p=algo.top_p)

    def released() -> None:
        # The released code's per-batch work: a teacher forward over the batch and dense [B, L, V] top-p masks,
        # then the loss with dense logits (here on the same sets, so both steps optimise the same objective).
        with torch.no_grad():
            logits_BLV = teacher(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                                 position_ids=batch.position_ids_BL).logits
            top_p_mask(logits_BLV, 0.8)
        dense.update(batch)

    times = _interleaved({"offline cache, sparse head (ours)": lambda: algo.update(batch),
                          "teacher forward + dense masks + dense head (released)": released}, params["repeats"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"times": times, "teacher_x": count(teacher) / count(student)}


def figure_2(quick: bool, repeats: int) -> str:
    params = dict(vocab=1000, hidden=64, layers=2, t_hidden=128, t_layers=4, seq=16, batch=2) if quick else \
        dict(vocab=32000, hidden=256, layers=2, t_hidden=768, t_layers=12, seq=128, batch=4)
    r = _worker_json("2", {**params, "repeats": repeats}, quick)
    base = "teacher forward + dense masks + dense head (released)"
    times = {base: r["times"][base], **{k: v for k, v in r["times"].items() if k != base}}
    return "\n".join([
        f"Student: random untied Llama {params['layers']} layers, hidden {params['hidden']}; teacher: "
        f"{params['t_layers']} layers, hidden {params['t_hidden']} ({r['teacher_x']:.1f}x the student's parameters); "
        f"vocab {params['vocab']}, batch {params['batch']} x {params['seq']}, threads 1, {repeats} repeats. Shapes "
        "shrunk from the issue's 12-layer d768 student / 24-layer d1536 teacher to fit the 2-core time budget. "
        "Peak memory of the two recipes is not separated here (one process); see figure 5 for dense vs sparse "
        "heads.", "", *_time_table(times, base), "",
        _goal(">= 4x faster per step (<= 0.25x) than the released recipe, and lower peak memory.",
              _median_ratio(times, "offline cache, sparse head (ours)", base) <= 0.25,
              f"{_median_ratio(times, 'offline cache, sparse head (ours)', base):.2f}x the time; peak memory of the two "
              "recipes not separated in this figure, see figure 5 for the heads"),
    ])


# --------------------------------------------------------------------------------------------------
# Figure 3: teacher-data generation (sampler + top-p cache) vs transformers' model.generate
# --------------------------------------------------------------------------------------------------
def _smol_like(params: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied), fewer layers.
    config = LlamaConfig(vocab_size=params["vocab"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=params["layers"], num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0,
                         bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen so top-p sets are instruct-LM sized and EOS is rarely drawn
        model.model.embed_tokens.weight.mul_(params["sharpen"])
    return model


def _hf_teacher(model, vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tokenrl.lm.models import HFTeacher

    words = {"<eos>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")))
    tokenizer.eos_token = tokenizer.pad_token = "<eos>"
    return HFTeacher(model, tokenizer, max_batch=64)


def _worker_generate(params: dict) -> dict:
    import numpy as np
    import torch

    from tokenrl.lm.sampling import TeacherSampler

    torch.set_num_threads(1)
    model = _smol_like(params)
    rng = np.random.default_rng(0)
    B, N, V = params["batch"], params["new_tokens"], params["vocab"]
    prompts = [rng.integers(1, V, size=params["prompt_len"]).tolist() for _ in range(B)]
    prompt_BT = torch.tensor(prompts)
    # What experiments/generate.py runs for a transformers teacher (tokenrl.tasks.hf's data sampler).
    sampler = TeacherSampler(model, N, eos_token_id=0, pad_token_id=0, batch_size=B, vocab_size=V)
    made = {}

    def ours() -> None:
        samples, caches = sampler.with_top_p_cache(prompts, 0, 0.8)
        made["tokens"] = sum(len(r) for r, _ in samples)
        made["mean_set"] = float(np.mean(np.concatenate([c.sizes for c in caches])))

    def hf_generate() -> None:
        with torch.no_grad():
            out = model.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
        made["hf_tokens"] = int(out.shape[1] - prompt_BT.shape[1]) * B

    times = _interleaved({"model.generate (KV cache, no top-p cache)": hf_generate,
                          "tokenrl sampler + top-p cache (generate.py)": ours,
                          "tokenrl sampler only": lambda: sampler(prompts, 0)}, params["repeats"])
    return {"times": times, **made}


def figure_3(quick: bool, repeats: int) -> str:
    params = dict(vocab=2000, layers=2, batch=2, prompt_len=8, new_tokens=8, sharpen=8.0) if quick else \
        dict(vocab=49152, layers=10, batch=8, prompt_len=16, new_tokens=32, sharpen=8.0)
    r = _worker_json("3", {**params, "repeats": repeats}, quick)
    base = "model.generate (KV cache, no top-p cache)"
    lines = _time_table(r["times"], base)
    return "\n".join([
        f"A random Llama of SmolLM2-135M's shape with {params['layers']} layers instead of 30 (hidden 576, "
        f"vocab {params['vocab']}, tied, embeddings sharpened {params['sharpen']}x), {params['batch']} prompts of "
        f"{params['prompt_len']} tokens, {params['new_tokens']} new tokens, one batch, threads 1, {repeats} repeats. "
        "The tokenrl rows are `tokenrl.lm.sampling.TeacherSampler` (the task's data sampler): `with_top_p_cache` "
        "keeps the top-0.8 set of every logits row it samples from (mean set size "
        f"{r['mean_set']:.1f}), so the cache costs no second forward. "
        f"tokenrl generated {r['tokens']} tokens (responses stop at EOS), `generate` {r['hf_tokens']} "
        "(`min_new_tokens` forces the full length, so the tokenrl rows are at most as long). The ratio is time per "
        "batch, so < 1 favours tokenrl only if it also produced as many tokens.", "", *lines, "",
        _goal(">= 1.0x `generate`'s throughput including the top-p cache (time <= 1.0x for as many tokens).",
              _median_ratio(r["times"], "tokenrl sampler + top-p cache (generate.py)", base) <= 1.0
              and r["tokens"] >= r["hf_tokens"],
              f"{_median_ratio(r['times'], 'tokenrl sampler + top-p cache (generate.py)', base):.2f}x the time for "
              f"{r['tokens']} vs {r['hf_tokens']} tokens"),
    ])


# --------------------------------------------------------------------------------------------------
# Figure 4: cache bytes per token
# --------------------------------------------------------------------------------------------------
def _worker_cache(params: dict) -> dict:
    import numpy as np
    import torch

    import memory
    from tokenrl.tasks.datagen import compute_top_p_cache
    from tokenrl.core.top_p import restrict_top_p

    torch.set_num_threads(1)
    memory.VOCAB = params["vocab"]
    teacher = memory._random_teacher()
    prompts, responses = memory._random_pairs(params["n"], 8, params["len"], seed=1)
    ps = sorted(params["p"])
    # One teacher pass at the largest p; a smaller p's set is a prefix of it (tokenrl.core.top_p.restrict_top_p,
    # what training does with a cache stored at a larger p).
    caches = compute_top_p_cache(teacher, prompts, responses, ps[-1], batch_size=8)
    sizes = {p: [] for p in ps}
    for c in caches:
        starts = np.cumsum(c.sizes) - c.sizes
        slot_SK = np.arange(int(c.sizes.max()))[None, :]
        valid_SK = slot_SK < c.sizes[:, None]
        index_SK = np.minimum(starts[:, None] + slot_SK, len(c.ids) - 1)
        logprobs_SK = torch.from_numpy(np.where(valid_SK, c.logprobs[index_SK], -np.inf).astype(np.float32))
        for p in ps:
            sizes[p].append(restrict_top_p(logprobs_SK, torch.from_numpy(valid_SK), p).sum(-1).numpy())
    out = {}
    for p in ps:
        sizes_N = np.concatenate(sizes[p])
        # Stored per state: an int32 size; per member: an int32 id and a float16 log-prob.
        out[str(p)] = {"bytes_per_token": (4 * len(sizes_N) + 6 * sizes_N.sum()) / len(sizes_N),
                       "mean_set": float(sizes_N.mean())}
    return out


def figure_4(quick: bool, repeats: int) -> str:
    params = dict(vocab=5000, n=4, len=16) if quick else dict(vocab=150000, n=8, len=64)
    params["p"] = [0.5, 0.8, 0.95]
    r = _worker_json("4", params, quick)
    dense = 2 * params["vocab"]
    lines = ["| p | mean set size | bytes per token | x dense fp16 row |", "|---|---:|---:|---:|"]
    lines += [f"| {p} | {v['mean_set']:.1f} | {v['bytes_per_token']:.1f} | {v['bytes_per_token'] / dense:.5f} "
              f"({100 * v['bytes_per_token'] / dense:.3f}%) |" for p, v in r.items()]
    return "\n".join([
        f"Top-p cache (`tokenrl.tasks.datagen.compute_top_p_cache`: int32 set size per state, int32 ids and float16 "
        f"log-probs per member) of benchmarks/memory.py's random teacher (2-layer Llama, output sharpened 20x so "
        f"its sets are instruct-LM sized) at vocab {params['vocab']}, {params['n']} sequences x {params['len']} "
        f"tokens, vs a dense fp16 row of {dense} bytes. One cache pass at p = {max(params['p'])}; the smaller p's "
        "sets are its prefixes (`tokenrl.core.top_p.restrict_top_p`, as training restricts a cache). Sizes are "
        "deterministic (no repeats). SmolLM2's own sets are not measured here (no download in the suite).", "",
        *lines, "",
        _goal("<= 0.2% of a dense fp16 row at p = 0.8.", r["0.8"]["bytes_per_token"] / dense <= 0.002,
              f"{100 * r['0.8']['bytes_per_token'] / dense:.3f}%"),
    ])


# --------------------------------------------------------------------------------------------------
# Figure 6: tabular top-p value iteration, sparse storage vs full-action VI
# --------------------------------------------------------------------------------------------------
def _tabular_case(n_states: int, n_actions: int, seed: int = 0):
    import numpy as np

    from tokenrl.theory.tabular import top_p_support

    rng = np.random.default_rng(seed)
    next_SA = rng.integers(0, n_states, size=(n_states, n_actions))
    r_SA = rng.normal(size=(n_states, n_actions))
    # Zipf-like teacher: the top-0.8 set keeps a handful of actions whatever |A|.
    logits_SA = -1.5 * np.log1p(rng.permuted(np.tile(np.arange(n_actions), (n_states, 1)), axis=1))
    probs_SA = np.exp(logits_SA) / np.exp(logits_SA).sum(-1, keepdims=True)
    support_SA = top_p_support(probs_SA, 0.8)
    return next_SA, r_SA, support_SA


def figure_6(quick: bool, repeats: int) -> str:
    import numpy as np

    from tokenrl.theory.tabular import soft_value_iteration, sparse_soft_value_iteration

    n_states, gamma, tol = 32, 0.9, 1e-8
    sizes = (64, 128) if quick else (64, 256, 1024, 4096, 16384)
    lines = ["| A | mean set size | full-action VI s | top-p VI, dense table: x full | top-p VI, sparse: x full |",
             "|---:|---:|---:|---|---|"]
    sparse_s = []
    for n_actions in sizes:
        next_SA, r_SA, support_SA = _tabular_case(n_states, n_actions)
        P_SAS = np.zeros((n_states, n_actions, n_states))
        P_SAS[np.arange(n_states)[:, None], np.arange(n_actions), next_SA] = 1.0
        width = int(support_SA.sum(-1).max())
        ids_SK = np.argsort(~support_SA, axis=-1, kind="stable")[:, :width]
        valid_SK = np.take_along_axis(support_SA, ids_SK, -1)
        r_SK, next_SK = np.take_along_axis(r_SA, ids_SK, -1), np.take_along_axis(next_SA, ids_SK, -1)
        times = _interleaved({
            "full": lambda: soft_value_iteration(r_SA, P_SAS, gamma, tol=tol),
            "dense": lambda: soft_value_iteration(r_SA, P_SAS, gamma, support_SA, tol=tol),
            "sparse": lambda: sparse_soft_value_iteration(r_SK, next_SK, valid_SK, gamma, tol=tol),
        }, repeats, warmup=False)  # numpy: nothing to warm up
        sparse_s.append(statistics.median(times["sparse"]))
        lines.append(f"| {n_actions} | {support_SA.sum(-1).mean():.1f} | {statistics.median(times['full']):.3g} | "
                     f"{_ratio_cells(times['dense'], times['full'])} | {_ratio_cells(times['sparse'], times['full'])} |")
        del P_SAS
    return "\n".join([
        f"Random deterministic MDP with {n_states} states, Zipf teacher (exponent 1.5) and its top-0.8 sets, "
        f"gamma {gamma}, tolerance {tol:g}, {repeats} repeats. Full-action VI is `tokenrl.theory.tabular.soft_value_iteration` "
        "without a support (dense `[S, A, S]` transitions); the dense top-p VI is the same function with the "
        "support mask; the sparse one is `sparse_soft_value_iteration` on the set members only (`[S, K]`). "
        f"Sparse top-p VI median seconds across |A|: {', '.join(f'{s:.3g}' for s in sparse_s)}.", "", *lines, "",
        _goal("the top-p cost grows with the set size, not with |A| (read here as: sparse top-p VI at the largest "
              "|A| within 3x of its time at the smallest, while |A| grows "
              f"{sizes[-1] // sizes[0]}x).", sparse_s[-1] <= 3 * sparse_s[0],
              f"{sparse_s[-1] / sparse_s[0]:.2f}x from |A| = {sizes[0]} to {sizes[-1]}"),
    ])


# --------------------------------------------------------------------------------------------------
# Figure 7: env rollout with top-p restriction and the KV-cached teacher vs a raw KV-cache loop
# --------------------------------------------------------------------------------------------------
def _worker_env(params: dict) -> dict:
    import numpy as np
    import torch

    from envs.token_env import BatchedTokenGenerationEnv
    from tokenrl.core.top_p import top_p_restricted_policy
    from tokenrl.lm.models import IncrementalTeacher
    from tokenrl.lm.sampling import KVCacheStepper
    from tokenrl.core.top_p import top_p_mask

    torch.set_num_threads(1)
    V, B, N = params["vocab"], params["batch"], params["new_tokens"]
    student, teacher_model = _smol_like(params), _smol_like({**params, "sharpen": params["sharpen"] * 1.5})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, size=params["prompt_len"]).tolist() for _ in range(B)]
    env = BatchedTokenGenerationEnv(V, eos_token_id=0, max_new_tokens=N, max_prompt_len=params["prompt_len"])
    made = {}

    def env_rollout() -> None:
        student_fn = IncrementalTeacher(_hf_teacher(student, V)).next_token_logits
        policy = top_p_restricted_policy(student_fn, IncrementalTeacher(_hf_teacher(teacher_model, V)).next_token_logits, 0.8)
        with torch.no_grad():
            made["env"] = int(env.rollout(policy, prompts, seed=0).response_mask_BT.sum())

    def raw_loop() -> None:
        s_step, t_step = KVCacheStepper(student, 0, V), KVCacheStepper(teacher_model, 0, V)
        tokens_BT = torch.tensor(prompts)
        lengths_B = torch.full((B,), params["prompt_len"])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            s_BV, t_BV = s_step.start(tokens_BT, lengths_B), t_step.start(tokens_BT, lengths_B)
            done_B = torch.zeros(B, dtype=torch.bool)
            count = 0
            for _ in range(N):
                logits_BV = s_BV.masked_fill(~top_p_mask(t_BV, 0.8), float("-inf"))
                a_B = torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=gen)[:, 0]
                a_B = torch.where(done_B, torch.zeros_like(a_B), a_B)
                count += int((~done_B).sum())
                done_B = done_B | (a_B == 0)
                if bool(done_B.all()):
                    break
                s_BV, t_BV = s_step.advance(a_B), t_step.advance(a_B)
        made["raw"] = count

    times = _interleaved({"raw KV-cache loop (student + teacher steppers)": raw_loop,
                          "BatchedTokenGenerationEnv.rollout + top-p + IncrementalTeacher": env_rollout},
                         params["repeats"])
    return {"times": times, "tokens": made}


def figure_7(quick: bool, repeats: int) -> str:
    params = dict(vocab=2000, layers=2, batch=2, prompt_len=8, new_tokens=8, sharpen=8.0) if quick else \
        dict(vocab=49152, layers=4, batch=8, prompt_len=16, new_tokens=32, sharpen=8.0)
    r = _worker_json("7", {**params, "repeats": repeats}, quick)
    base = "raw KV-cache loop (student + teacher steppers)"
    return "\n".join([
        f"Student and teacher: random Llamas of SmolLM2-135M's width with {params['layers']} layers (vocab "
        f"{params['vocab']}), {params['batch']} prompts of {params['prompt_len']} tokens, up to "
        f"{params['new_tokens']} new tokens, top-0.8 restriction, threads 1, {repeats} repeats. Response tokens: "
        f"env {r['tokens']['env']}, raw loop {r['tokens']['raw']} (both stop a row at EOS; the samples differ "
        "because the generators are consumed differently).", "", *_time_table(r["times"], base), "",
        _goal("env overhead <= 20% (<= 1.20x the raw loop).",
              _median_ratio(r["times"], "BatchedTokenGenerationEnv.rollout + top-p + IncrementalTeacher", base) <= 1.2,
              f"{_median_ratio(r['times'], 'BatchedTokenGenerationEnv.rollout + top-p + IncrementalTeacher', base):.2f}x"),
    ])


# --------------------------------------------------------------------------------------------------
# Figure 9: the student's forward options on CPU: bf16 autocast and torch.compile (issue 22)
# --------------------------------------------------------------------------------------------------
FIG9_VARIANTS = {
    "sft (bc), fp32 eager": ("bc", "fp32", False),
    "sft (bc), bf16 autocast": ("bc", "bf16", False),
    "sft (bc), fp32 compiled": ("bc", "fp32", True),
    "iql_bd default, fp32 eager": ("iql_bd", "fp32", False),
    "iql_bd default, bf16 autocast": ("iql_bd", "bf16", False),
    "iql_bd default, fp32 compiled": ("iql_bd", "fp32", True),
}


def _worker_forward_options(params: dict) -> dict:
    import torch

    from algorithms import make_algorithm
    from step_cost import random_llama, synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, T, B = params["vocab"], params["seq"], params["batch"]
    model = random_llama(V, params["hidden"], params["layers"], 2 * T + 64)
    buf = synthetic_buffer(V, T, B)
    steps, first_call, shared = {}, {}, None
    for name, (algo_name, precision, compiled) in FIG9_VARIANTS.items():
        compile_ = params["backend"] if compiled else False
        algo = make_algorithm(algo_name, CausalLMPolicy(model, V, precision=precision, compile=compile_), {},
                              total_steps=100)
        shared = shared or (algo.optimizer, algo.scheduler)
        algo.optimizer, algo.scheduler = shared  # one AdamW state, as in figure 1
        batch = buf.collate(list(range(B)), top_p=algo.top_p)
        steps[name] = lambda a=algo, b=batch: a.update(b)
        t0 = time.perf_counter()
        steps[name]()  # the first call compiles (compiled variants) and allocates the optimiser state
        first_call[name] = time.perf_counter() - t0
    return {"times": _interleaved(steps, params["repeats"], warmup=False), "first_call": first_call}


def figure_9(quick: bool, repeats: int) -> str:
    params = dict(vocab=1000, hidden=64, layers=1, batch=2, seq=16, backend="aot_eager") if quick else \
        dict(vocab=32000, hidden=256, layers=4, batch=4, seq=128, backend="inductor")
    r = _worker_json("9", {**params, "repeats": repeats}, quick)
    times, first = r["times"], r["first_call"]
    lines = ["| variant | first call s | median s | x its fp32 eager: median [min-max] over repeats |", "|---|---:|---:|---|"]
    for name, ts in times.items():
        base = times[name.split(",")[0] + ", fp32 eager"]
        lines.append(f"| {name} | {first[name]:.3g} | {statistics.median(ts):.3g} | {_ratio_cells(ts, base)} |")
    compiled = {n: _median_ratio(times, n, n.split(",")[0] + ", fp32 eager") for n in times if "compiled" in n}
    bf16 = {n: _median_ratio(times, n, n.split(",")[0] + ", fp32 eager") for n in times if "bf16" in n}
    return "\n".join([
        f"Random untied Llama ({params['layers']} layers, hidden {params['hidden']}, vocab {params['vocab']}), batch "
        f"{params['batch']} x {params['seq']} response tokens, synthetic top-0.8 sets, threads 1, {repeats} interleaved "
        "rounds after each variant's first call; the variants share the model and one AdamW state. bf16 = "
        "`precision=bf16` (autocast of the body and head, float32 master weights); compiled = `compile=true` "
        f"(torch.compile of the decoder body, backend {params['backend']}, dynamic shapes). The first call includes "
        "the compilation; the ratios compare steady-state steps with the same algorithm's fp32 eager step.", "",
        *lines, "",
        "Goal (issue 22): measure before recommending. In this run: `compile=true` "
        + ", ".join(f"{v:.2f}x" for v in compiled.values()) + " and `precision=bf16` "
        + ", ".join(f"{v:.2f}x" for v in bf16.values())
        + " of the fp32 eager step (sft, iql_bd) on this CPU; GPU: not measured (benchmarks/gpu_check.sh).",
    ])


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
FIGURES = {
    1: ("BD step vs SFT step at GPT-2-small shape", figure_1, 2),
    2: ("Offline cache vs the released recipe (teacher forward on every batch)", figure_2, 2),
    3: ("Teacher-data generation vs transformers' generate", figure_3, 3),
    4: ("Top-p cache bytes per token", figure_4, 1),
    5: ("Peak memory of one step at vocabulary 150k", figure_5, 1),
    6: ("Tabular top-p value iteration vs full-action value iteration", figure_6, 2),
    7: ("Env rollout throughput vs a raw KV-cache loop", figure_7, 3),
    9: ("The student's forward on CPU: bf16 autocast and torch.compile", figure_9, 3),
}
"""Figure number -> (title, function, default repeats). Two timed rounds where a round is expensive and the
earlier spread was far from deciding the goal (figure 1, the suite's costliest steps; figure 2, 0.11-0.13 for a
0.25 goal; figure 6, ratios orders of magnitude apart); figures 4 and 5 are deterministic sizes and peaks."""
WORKERS = {"1": _worker_steps, "2": _worker_offline, "3": _worker_generate, "4": _worker_cache, "7": _worker_env,
           "9": _worker_forward_options}


def _header(argv: list[str], quick: bool) -> str:
    import numpy
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        "# Benchmarks", "",
        f"Generated by `python benchmarks/run.py{' ' + ' '.join(argv) if argv else ''}` on {time.strftime('%Y-%m-%d')}. "
        f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, load average {load:.1f} at the start (the "
        "machine was shared with other jobs: absolute times are noise, read the ratios, each measured side by "
        f"side in one run). Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, numpy {numpy.__version__}. The GPU tables (issue 11 item 8, issue 22) come from "
        "`benchmarks/gpu_check.sh`, not from this script: see the section GPU check below.", "",
        *(["**--quick: tiny shapes, one repeat, every variant in this one process, so the peak-memory columns are "
           "the process's running peak, not per variant. A smoke test, not a measurement.**", ""] if quick else []),
    ])


def _section(n: int, body: str, seconds: float, quick: bool, repeats: int) -> str:
    title = FIGURES[n][0]
    command = f"python benchmarks/run.py --figures {n}" + (" --quick" if quick else f" --repeats {repeats}")
    return (f"<!-- fig {n} -->\n## {n}. {title}\n\n{body}\n\n(`{command}`, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"section time {seconds:.0f} s)\n<!-- /fig {n} -->")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figures", default=",".join(map(str, FIGURES)), help="comma-separated figure numbers")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, help="timed repeats of every figure (default: each figure's own, see FIGURES)")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return
    figures = [int(f) for f in args.figures.split(",")]
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise SystemExit(f"--figures: unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    old = open(args.out).read() if os.path.exists(args.out) else ""
    sections = dict(re.findall(r"<!-- fig (\d+) -->\n(.*?)<!-- /fig \1 -->", old, flags=re.S))
    sections = {int(k): f"<!-- fig {k} -->\n{v}<!-- /fig {k} -->" for k, v in sections.items()}
    tail = old.split(END_MARK, 1)[1] if END_MARK in old else ""
    start = time.time()
    elapsed = {}
    for n in figures:
        t0 = time.time()
        repeats = 1 if args.quick else (args.repeats or FIGURES[n][2])
        body = FIGURES[n][1](args.quick, repeats)
        elapsed[n] = time.time() - t0
        sections[n] = _section(n, body, elapsed[n], args.quick, repeats)
        print(f"figure {n} done in {elapsed[n]:.0f} s (suite so far {time.time() - start:.0f} s)", flush=True)
    argv = sys.argv[1:]
    text = _header(argv, args.quick)
    per_figure = ", ".join(f"figure {n} {s:.0f} s" for n, s in elapsed.items())
    text += f"Suite time of this invocation: {time.time() - start:.0f} s ({per_figure}).\n\n"
    text += "\n\n".join(sections[n] for n in sorted(sections)) + f"\n\n{END_MARK}\n{tail.lstrip(chr(10))}"
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
