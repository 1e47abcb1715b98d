"""experiments/time_to_quality.py: the time-to-95% arithmetic, and a tiny end-to-end comparison."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

# experiments/ is not a package: load the script as a module.
_spec = importlib.util.spec_from_file_location(
    "experiments_time_to_quality", Path(__file__).resolve().parents[1] / "experiments" / "time_to_quality.py"
)
ttq = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ttq
_spec.loader.exec_module(ttq)


def _records(points, key="val/teacher_nll"):
    return [{"train_clock_s": t, "step": i, key: v} for i, (t, v) in enumerate(points)]


def test_mean_curve_is_the_seed_mean_of_step_functions_up_to_the_shortest_run():
    a = _records([(0.0, 4.0), (1.0, 2.0), (3.0, 1.0)])
    b = _records([(0.0, 4.0), (2.0, 0.0)])
    t, mean, lo, hi = ttq.mean_curve([a, b], "val/teacher_nll", n_grid=5)  # grid 0, .5, 1, 1.5, 2
    np.testing.assert_allclose(t, [0.0, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(mean, [4.0, 4.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(lo, [4.0, 4.0, 2.0, 2.0, 0.0])
    np.testing.assert_allclose(hi, [4.0, 4.0, 4.0, 4.0, 2.0])


def test_seconds_to_reach_95_percent_of_the_way_in_either_direction():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    assert ttq.seconds_to_reach(t, np.array([10.0, 5.0, 1.2, 1.0]), 10.0, 1.0, higher=False) == 2.0  # <= 1.45
    assert ttq.seconds_to_reach(t, np.array([10.0, 5.0, 1.5, 1.0]), 10.0, 1.0, higher=False) == 3.0
    assert ttq.seconds_to_reach(t, np.array([0.0, 96.0, 90.0, 99.0]), 0.0, 100.0, higher=True) == 1.0
    assert math.isnan(ttq.seconds_to_reach(t, np.array([0.0, 50.0, 60.0, 70.0]), 0.0, 100.0, higher=True))


def test_tiny_comparison_writes_records_plot_and_section(tmp_path):
    sets = [
        "steps=6", "sft_steps=2", "batch_size=4", "rollout_every=3", "rollout_prompts=4", "task.n_train_prompts=24",
        "task.samples_per_prompt=1", "task.n_val_prompts=4", "task.n_test_prompts=6", "task.max_new_tokens=8",
        "eval.seeds=[0]",
    ]
    md = tmp_path / "ttq.md"
    ttq.main(["--algos", "bc", "minillm", "--seeds", "0", "--val-every-s", "0.2", "--out", str(tmp_path / "out"),
              "--plot", str(tmp_path / "ttq.png"), "--markdown", str(md), "--set", *sets])
    records = json.loads((tmp_path / "out" / "runs" / "minillm_s0.json").read_text())
    assert records[0]["train_clock_s"] == 0.0 and records[-1]["step"] == 6 and records[-1]["time/rollout_s"] > 0
    first_bc = json.loads((tmp_path / "out" / "runs" / "bc_s0.json").read_text())[0]
    assert first_bc["val/teacher_nll"] == records[0]["val/teacher_nll"]  # one shared warm start
    assert (tmp_path / "ttq.png").stat().st_size > 0
    text = md.read_text()
    assert "| minillm | bc |" in text and "One-time costs" in text and "teacher data" in text
