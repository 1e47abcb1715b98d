"""Where teacher-data generation's time goes: torch.profiler on one batch of figure 3 of ``benchmarks/run.py``.

Profiles ``TeacherSampler.with_top_p_cache`` (sampling plus the top-p sets of the sampling pass, what
``experiments/generate.py`` runs for a transformers teacher) and transformers' ``model.generate`` on the same
random SmolLM2-shaped model and prompts, one thread, and prints the operators with the largest self CPU time
of each as markdown tables.

    python benchmarks/profile_generate.py --layers 10
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from run import _smol_like
    from tokenrl.sampling import TeacherSampler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=10, help="operators listed per variant")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = _smol_like(dict(vocab=args.vocab, layers=args.layers, sharpen=8.0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, args.vocab, size=args.prompt_len).tolist() for _ in range(args.batch)]
    prompt_BT = torch.tensor(prompts)
    sampler = TeacherSampler(model, args.new_tokens, eos_token_id=0, pad_token_id=0, batch_size=args.batch,
                             vocab_size=args.vocab)

    def hf_generate() -> None:
        with torch.no_grad():
            model.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), do_sample=True, top_k=0, top_p=1.0,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    variants = {"tokenrl sampler + top-p cache": lambda: sampler.with_top_p_cache(prompts, 0, 0.8),
                "model.generate": hf_generate}
    for name, fn in variants.items():
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name}: {total / 1e6:.2f} s self CPU time for one batch\n")
        print("| operator | calls | self CPU s | share |\n|---|---:|---:|---:|")
        for e in events[: args.top]:
            print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")


if __name__ == "__main__":
    main()
