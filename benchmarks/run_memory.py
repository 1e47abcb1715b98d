"""Resident memory of a whole ``experiments/run.py`` run, stage by stage.

Runs the real entry point in this process with a thread that samples the resident set size every 50 ms, and
prints, for each trainer stage as it ends, the RSS before it, the peak inside it and the RSS after it (GB).
Nested stages print their own line (``evaluate_student`` inside ``reference_evaluations``). The process's
whole-run peak is the largest "peak"; ``/usr/bin/time -v`` around the plain command gives the same figure as
"Maximum resident set size".

    python benchmarks/run_memory.py task=smollm2 model=pruned model.keep_every=3 algo=iql_bd \
        steps=4 sft_steps=4 batch_size=8 'eval.seeds=[0]' progress=false
"""

from __future__ import annotations

import bisect
import os
import runpy
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tokenrl.evaluation import student  # noqa: E402
from tokenrl.run import inputs, outputs, train_loop, train_state, trainer  # noqa: E402

MODULES = (trainer, inputs, train_loop, train_state, outputs, student)  # where the stages are defined and called

STAGES = (
    "build_task", "load_data", "build_student", "reference_evaluations", "evaluate_student", "warm_start",
    "train_loop", "save_train_state", "final_evaluation", "save_outputs",
)
GB = 2**30


class RssSampler:
    """Samples the process's resident set size in a daemon thread; :meth:`peak_since` reads the samples."""

    def __init__(self, period_s: float = 0.05):
        self.period_s = period_s
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.times: list[float] = []
        self.values: list[int] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.times.append(time.time())
            self.values.append(self.now())
            time.sleep(self.period_s)

    def now(self) -> int:
        """Resident set size in bytes (Linux: the second field of /proc/self/statm, in pages)."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page_size

    def peak_since(self, t0: float) -> int:
        return max(self.values[bisect.bisect_left(self.times, t0) :] or [self.now()])


def instrument(sampler: RssSampler, name: str) -> None:
    """Replace the stage ``name`` in every module of :data:`MODULES` that holds it by a wrapper that prints its memory
    line when it returns."""
    fn = next(getattr(m, name) for m in MODULES if hasattr(m, name))

    def wrapper(*args, **kwargs):
        t0, before = time.time(), sampler.now()
        try:
            return fn(*args, **kwargs)
        finally:
            print(
                f"[memory] {name:22s} before {before / GB:.2f} GB  peak {sampler.peak_since(t0) / GB:.2f} GB  "
                f"after {sampler.now() / GB:.2f} GB  ({time.time() - t0:.0f} s)",
                file=sys.stderr, flush=True,
            )

    for module in MODULES:
        if getattr(module, name, None) is fn:
            setattr(module, name, wrapper)


def main() -> None:
    sampler = RssSampler()
    for name in STAGES:
        instrument(sampler, name)
    script = os.path.join(ROOT, "experiments", "run.py")
    sys.argv = [script, *sys.argv[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(f"[memory] whole run peak {max(sampler.values) / GB:.2f} GB", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
