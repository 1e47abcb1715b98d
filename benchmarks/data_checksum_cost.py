"""Cost of verifying the offline data on load: SHA-256 of every shard against its manifest entry vs loading it.

Generates a synthetic-task dataset once (into a temporary folder unless ``--data-dir``), then times, each as
the median of ``--repeats`` passes: the shards' checksums alone, the shards' parsing alone
(``ReplayBuffer.load``), and ``load_teacher_data`` (both, as a training run does).

    python benchmarks/data_checksum_cost.py                       # 500 prompts x 4 samples, 32 tokens
    python benchmarks/data_checksum_cost.py --prompts 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from tokenrl.data.buffer import ReplayBuffer
from tokenrl.tasks.datagen import generate_teacher_data, load_teacher_data, shard_path
from tokenrl.tasks.manifest import file_sha256
from tokenrl.tasks.synthetic import SyntheticLanguage


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--shard-prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    lang = SyntheticLanguage()
    prompts = lang.sample_prompts(args.prompts, np.random.default_rng(0))

    def sampler(ps, seed):
        return lang.sample_continuations(ps, args.max_new_tokens, np.random.default_rng(seed), top_p=0.8)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.data_dir or os.path.join(tmp, "data")
        buffer = generate_teacher_data(
            lang, sampler, prompts, out, samples_per_prompt=args.samples, cache_top_p=0.8,
            manifest={"teacher": "synthetic"}, shard_prompts=args.shard_prompts, progress=False,
        )
        shards = [shard_path(out, i) for i in range((args.prompts + args.shard_prompts - 1) // args.shard_prompts)]
        megabytes = sum(os.path.getsize(s) for s in shards) / 1e6
        checksum_s = _median_seconds(lambda: [file_sha256(s) for s in shards], args.repeats)
        parse_s = _median_seconds(lambda: [ReplayBuffer.load(s) for s in shards], args.repeats)
        verified_s = _median_seconds(lambda: load_teacher_data(out), args.repeats)
    print(f"{len(buffer)} trajectories, {buffer.n_tokens} tokens, {len(shards)} shards, {megabytes:.1f} MB")
    print("| step | seconds | x parsing |")
    print("|---|---|---|")
    print(f"| parse shards (ReplayBuffer.load) | {parse_s:.3f} | 1.00 |")
    print(f"| SHA-256 of shards | {checksum_s:.4f} | {checksum_s / parse_s:.3f} |")
    print(f"| load_teacher_data (verify + parse + merge) | {verified_s:.3f} | {verified_s / parse_s:.2f} |")


if __name__ == "__main__":
    main()
