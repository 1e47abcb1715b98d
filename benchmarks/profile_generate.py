"""Where teacher-data generation's time goes, on figure 3's model of ``benchmarks/run.py`` at a chosen depth.

First the process CPU time (not wall time, so a loaded machine disturbs it less) of four paths, interleaved over
``--rounds``: transformers' ``model.generate``, ``TeacherSampler.with_top_p_cache`` (sampling plus the top-p sets
of the sampling pass, what ``experiments/generate.py`` runs for a transformers teacher), the sampler alone, and
the old two-pass path (sampler, then ``compute_top_p_cache``), as ratios to ``generate``. Then torch.profiler on
one batch of the first two: the operators with the largest self CPU time as markdown tables. Last, the CPU time of
one top-p computation on ``[batch, vocab]`` logits: ``tokenrl.core.top_p.top_p_mask`` vs the indexed full sort it
falls back to on boundary ties (what every step paid before), and the exact sparse sets (``top_p_sparse``) vs the
sampling pass's probed sets (``tokenrl.lm.probed_sets.probed_top_p_sets``, what a data-generation step pays now). One thread.

    python benchmarks/profile_generate.py --layers 4
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import statistics
    import time

    import numpy as np
    import torch

    from profile_step import print_profile, profile_parser
    from run import _hf_teacher, _smol_like
    from tokenrl.tasks.datagen import compute_top_p_cache
    from tokenrl.lm.probed_sets import probed_top_p_sets
    from tokenrl.lm.sampling import TeacherSampler
    from tokenrl.core.top_p import _mask_by_indexed_sort, top_p_mask, top_p_sparse

    ap = profile_parser(__doc__, vocab=49152, layers=10, batch=8, top=10)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved CPU-time rounds (after one warm-up)")
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

    teacher = _hf_teacher(model, args.vocab)

    def two_pass() -> None:
        samples = sampler(prompts, 0)
        compute_top_p_cache(teacher, prompts, [r for r, _ in samples], 0.8, batch_size=args.batch)

    variants = {"model.generate": hf_generate,
                "tokenrl sampler + top-p cache": lambda: sampler.with_top_p_cache(prompts, 0, 0.8),
                "tokenrl sampler only": lambda: sampler(prompts, 0),
                "two passes (sampler, then compute_top_p_cache)": two_pass}
    cpu = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, fn in variants.items():
            t0 = time.process_time()
            fn()
            if round_:  # round 0 is the warm-up
                cpu[name].append(time.process_time() - t0)
    print(f"| path | CPU s per batch (median of {args.rounds}) | x generate: median [min-max] |\n|---|---:|---|")
    for name, ts in cpu.items():
        ratios = [t / b for t, b in zip(ts, cpu["model.generate"])]
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] |")
    for name in ("tokenrl sampler + top-p cache", "model.generate"):
        print_profile(variants[name], f"{name}: {{total}} s self CPU time for one batch", args.top)
    with torch.no_grad():
        logits_BV = model(prompt_BT).logits[:, -1, : args.vocab].float()
    logprobs_BV = torch.log_softmax(logits_BV, -1)
    for name, fn in {"top_p_mask": lambda: top_p_mask(logits_BV, 0.8),
                     "indexed torch.sort (before)": lambda: _mask_by_indexed_sort(logits_BV, 0.8, 1),
                     "top_p_sparse (the exact sets)": lambda: top_p_sparse(logits_BV, 0.8),
                     "the sampling pass's probed sets (probed_top_p_sets)": lambda: probed_top_p_sets(logits_BV, logprobs_BV, 0.8),
                     }.items():
        fn()
        t0 = time.process_time()
        for _ in range(20):
            fn()
        print(f"\n{name} of [{args.batch}, {args.vocab}] logits: {(time.process_time() - t0) / 20 * 1e3:.1f} ms CPU")


if __name__ == "__main__":
    main()
