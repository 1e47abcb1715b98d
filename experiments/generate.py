"""Generate (or resume, or just load) the offline teacher data of a task, without training.

Takes the same config as ``experiments/run.py`` and runs only its data stage, so a later training run with
the same task settings finds the data in ``data_dir`` and starts at once:

    python experiments/generate.py task=smollm2                 # SmolLM2 teacher data into data_cache/
    python experiments/generate.py task=dolly_gpt2 device=cuda  # the paper's data (a GPU job)
    python experiments/generate.py task=smollm2 task.samples_per_prompt=4 data_dir=/big/disk
    torchrun --nproc_per_node=4 experiments/generate.py task=dolly_gpt2 device=cuda   # shards split over ranks

Under torchrun rank r generates the shards i with i % world_size == r; the merged data set is the
single-process one file for file (every shard's seed depends only on its index). An interrupted generation
resumes from its last complete shard; every shard is checked against its SHA-256 in the manifest, and a
damaged one is named (delete it and rerun: only that shard is regenerated). Prints the data directory, the
number of trajectories, the bytes per token of the stored top-p sets and set-size statistics.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import hydra
import numpy as np
from omegaconf import DictConfig

from tokenrl.run.config import make_run_config, refuse_unknown_algo, register_configs
from tokenrl.run.distributed import process_group
from tokenrl.run.context import apply_threads
from tokenrl.run.inputs import build_task, load_data
from tokenrl.run.checks import check_config, check_student_tokenizer

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_cfg = make_run_config(cfg)
    check_config(run_cfg)
    apply_threads(run_cfg.threads)
    with process_group(run_cfg.device, run_cfg.dist.timeout_min) as (dist_ctx, device):
        run_cfg = dataclasses.replace(run_cfg, device=device)  # under torchrun and nccl: this rank's GPU
        task = build_task(run_cfg)
        check_student_tokenizer(run_cfg, task.tokenizer)
        start = time.time()
        buffer, data_dir, cached = load_data(run_cfg, task, dist_ctx)
        seconds = time.time() - start
    if not dist_ctx.is_main:
        return
    sizes = buffer.set_sizes()
    percentiles = np.percentile(sizes, [50, 90, 99]) if len(sizes) else np.zeros(3)
    print(f"data dir: {data_dir} ({'loaded from cache' if cached else 'generated'} in {seconds:.1f}s)")
    print(f"trajectories: {len(buffer)} ({buffer.n_tokens} tokens, {float(np.mean(buffer.terminated)):.1%} end with EOS)")
    print(f"bytes per token: {buffer.bytes_per_token():.1f}")
    print(
        f"top-p set size (p={buffer.cache_top_p}): mean {sizes.mean():.1f}, p50 {percentiles[0]:.0f}, "
        f"p90 {percentiles[1]:.0f}, p99 {percentiles[2]:.0f}, max {sizes.max()}"
    )


if __name__ == "__main__":
    refuse_unknown_algo(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    main()
