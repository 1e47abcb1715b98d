"""Where one training step's time goes: torch.profiler on one ``bc`` (SFT) or ``iql_bd`` update.

Same model and synthetic batch as ``benchmarks/step_cost.py`` (random untied Llama, synthetic top-0.8 sets);
prints the operators with the largest self CPU time as a markdown table.

    python benchmarks/profile_step.py --config "sft (bc, chunked full-vocab CE)" \
        "iql_bd default (sparse, q_shift=set, LM term ce_coef=1)" --vocab 50257 --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from algorithms import make_algorithm
    from step_cost import CONFIGS, random_llama, synthetic_buffer
    from tokenrl.policy import CausalLMPolicy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=[c for c in CONFIGS if "dense" not in c], choices=list(CONFIGS))
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--top", type=int, default=8, help="operators listed per configuration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    buf = synthetic_buffer(args.vocab, args.seq, args.batch)
    for config in args.config:
        torch.manual_seed(0)
        name, extra = CONFIGS[config]
        model = random_llama(args.vocab, args.hidden, args.layers, 2 * args.seq + 64)
        algo = make_algorithm(name, CausalLMPolicy(model, args.vocab), extra, total_steps=100)
        batch = buf.collate(list(range(args.batch)), top_p=algo.top_p)
        algo.update(batch)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            algo.update(batch)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{config}: {total / 1e6:.2f} s self CPU time in one step\n")
        print("| operator | calls | self CPU s | share |\n|---|---:|---:|---:|")
        for e in events[: args.top]:
            print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")


if __name__ == "__main__":
    main()
