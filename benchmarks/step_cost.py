"""Cost of one training step: SFT (dense cross-entropy) vs Bellman Distill with the dense and the sparse head.

Each configuration runs in its own subprocess so its peak resident memory (ru_maxrss) is its own. The table
reports time per step (median over repeats) and peak memory, with ratios to the SFT step measured in the
same run. Absolute numbers are machine noise; read the ratios.

    python benchmarks/step_cost.py                       # vocab 32k and 150k, a small Llama
    python benchmarks/step_cost.py --vocab 50000 --steps 5 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "sft (bc, chunked full-vocab CE)": ("bc", {}),
    "bd sparse head, pure BD loss (paper's vocab shift, ce_coef=0)": ("iql_bd", {"q_shift": "vocab", "ce_coef": 0.0}),
    "bd sparse head, pure BD loss, q_shift=set (ce_coef=0)": ("iql_bd", {"ce_coef": 0.0}),
    "iql_bd default (sparse, q_shift=set, LM term ce_coef=1)": ("iql_bd", {}),
    "bd dense head (iql_bd default, sparse=False)": ("iql_bd", {"sparse": False}),
}
"""Step configurations: the SFT baseline, the pure BD loss (both Q shifts), the default ``iql_bd`` recipe
(the defaults of ``BellmanDistillConfig``), and that recipe with dense logits."""


def random_llama(vocab: int, hidden: int, layers: int, max_len: int):
    """A random untied Llama (4 heads, MLP 4x hidden) with the given shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len, tie_word_embeddings=False,
        )
    )


def synthetic_buffer(vocab: int, seq: int, batch: int, seed: int = 0):
    """``batch`` random trajectories of ``seq`` response tokens with synthetic top-0.8 sets (``ReplayBuffer``)."""
    import numpy as np

    from tokenrl.data.buffer import ReplayBuffer, TopPCache

    rng = np.random.default_rng(seed)
    V, T = vocab, seq
    buf = ReplayBuffer(pad_id=0, cache_top_p=0.8)
    for _ in range(batch):
        resp = rng.integers(1, V, size=T).tolist()
        # Set sizes like an instruct LM's top-0.8 sets: mostly a few tokens, a long tail up to ~100.
        sizes = np.minimum(1 + rng.geometric(0.2, size=T + 1), 128).astype(np.int32)
        ids, lps = [], []
        for t, k in enumerate(sizes):
            others = rng.choice(V - 1, size=k, replace=False) + 1  # = choice(arange(1, V)), without the O(V) arange
            if t < T:
                others[0] = resp[t]  # the expert action lies in its set (data sampled at the training p)
            ids.append(others)
            lps.append(np.sort(np.log(rng.dirichlet(np.ones(k))))[::-1])
        buf.add([[1] * 16], [resp], [False], caches=[TopPCache(sizes, np.concatenate(ids).astype(np.int32), np.concatenate(lps).astype(np.float16))])
    return buf


def _worker(args: argparse.Namespace) -> None:
    import torch

    from algorithms import make_algorithm
    from tokenrl.lm.policy import CausalLMPolicy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, T = args.vocab, args.seq
    model = random_llama(V, args.hidden, args.layers, 2 * T + 64)
    buf = synthetic_buffer(V, T, args.batch)
    name, extra = CONFIGS[args.config]
    algo = make_algorithm(name, CausalLMPolicy(model, V), extra, total_steps=100)
    batch = buf.collate(list(range(args.batch)), top_p=algo.top_p)
    algo.update(batch)  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        algo.update(batch)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": statistics.median(times), "times": times, "peak_mb": peak_mb,
                      "mean_set": float(buf.set_sizes().mean())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 150000])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        args.vocab = args.vocab[0]
        _worker(args)
        return
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers; batch {args.batch} x {args.seq} response tokens; "
          f"{args.threads} threads; median of {args.steps} steps")
    print("| vocab | step | time/step (s) | x SFT | peak RSS (MB) | x SFT |")
    print("|---|---|---|---|---|---|")
    for vocab in args.vocab:
        base = None
        for config in CONFIGS:
            cmd = [sys.executable, os.path.abspath(__file__), "--config", config, "--vocab", str(vocab)]
            for k in ("hidden", "layers", "batch", "seq", "steps", "threads"):
                cmd += [f"--{k}", str(getattr(args, k))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            base = base or r
            print(f"| {vocab} | {config} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
