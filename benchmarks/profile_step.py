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


def profile_parser(doc: str, vocab: int, layers: int, batch: int, top: int) -> argparse.ArgumentParser:
    """The command line every profile script shares: the model's vocabulary and depth, the batch, and how many
    operators each table lists (the defaults are the script's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--top", type=int, default=top, help="operators listed per table")
    return ap


def print_profile(fn, title: str, top: int) -> None:
    """Run ``fn`` once under torch.profiler and print ``title`` (``{total}``: its self CPU seconds) and a markdown
    table of the ``top`` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("\n" + title.format(total=f"{total / 1e6:.2f}") + "\n")
    print("| operator | calls | self CPU s | share |\n|---|---:|---:|---:|")
    for e in events[:top]:
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")


def main() -> None:
    import torch

    from algorithms import make_algorithm
    from step_cost import CONFIGS, random_llama, synthetic_buffer
    from tokenrl.lm.policy import CausalLMPolicy

    ap = profile_parser(__doc__, vocab=50257, layers=12, batch=4, top=8)
    ap.add_argument("--config", nargs="+", default=[c for c in CONFIGS if "dense" not in c], choices=list(CONFIGS))
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--seq", type=int, default=128)
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
        print_profile(lambda: algo.update(batch), f"{config}: {{total}} s self CPU time in one step", args.top)


if __name__ == "__main__":
    main()
