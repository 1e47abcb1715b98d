"""Training steps per second of ``experiments/run.py`` at 1 and 2 processes (torchrun, gloo, CPU).

Each world size trains the same run (the synthetic task, the default tiny student, Bellman Distill, the same
global batch, no warm start) on data generated once beforehand; the figure is ``steps / train_s`` from
metrics.json (the training loop only: data, evaluation and saving are outside it). On a shared CPU the
processes compete for the same cores, so this measures the overhead of the gloo all-reduce more than any
speed-up; GPUs are another matter.

    python benchmarks/dist_throughput.py                  # 1 and 2 processes, 100 steps, batch 32
    python benchmarks/dist_throughput.py --procs 1 2 4 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(procs: int, args: argparse.Namespace, data_dir: str, out_dir: str) -> dict:
    overrides = [
        f"steps={args.steps}", "sft_steps=0", f"batch_size={args.batch}", "eval.seeds=[0]", "eval.n_prompts=8",
        "init_eval=false", "teacher_eval=false", "progress=false", "threads=1", f"data_dir={data_dir}",
        f"hydra.run.dir={out_dir}",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = (launcher if procs > 1 else [sys.executable]) + [os.path.join(ROOT, "experiments", "run.py"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--batch", type=int, default=32, help="global batch (trajectories per step)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        _run(1, argparse.Namespace(steps=1, batch=args.batch), data_dir, os.path.join(tmp, "warmup"))
        print("| processes | micro-batch per rank | steps | train (s) | steps/s |")
        print("|---|---|---|---|---|")
        for procs in args.procs:
            train = _run(procs, args, data_dir, os.path.join(tmp, f"run{procs}"))
            seconds = train["train_s"]
            print(f"| {procs} | {args.batch // procs} | {args.steps} | {seconds:.1f} | {args.steps / seconds:.2f} |")


if __name__ == "__main__":
    main()
