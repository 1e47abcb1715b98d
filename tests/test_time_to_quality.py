"""experiments/time_to_quality.py: the time-to-95% arithmetic, and a tiny end-to-end comparison."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

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


def _leaderboard(out: Path, methods: dict[str, tuple[str, float | None]]) -> None:
    """A benchmark output with ``leaderboard.json``: method -> (time_to_quality label of its config, chosen lr)."""
    out.mkdir(parents=True)
    entries = {}
    for name, (label, lr) in methods.items():
        algo = json.loads(json.dumps(dataclasses.asdict(ttq.algo_config(label))))
        algo.pop("lr")
        entries[name] = {"algo": algo, "chosen_lr": lr}
    (out / "leaderboard.json").write_text(json.dumps({"tasks": {"synthetic": {"methods": entries}}}))


def test_benchmark_lrs_match_methods_by_their_algorithm_config(tmp_path):
    _leaderboard(tmp_path / "b", {"bc": ("bc", 3e-4), "sqil": ("soft_q_sqil_p0.8", 1e-3), "gkd": ("gkd", None)})
    assert ttq.benchmark_lrs(str(tmp_path / "b"), ["bc", "soft_q_sqil_p0.8"]) == {"bc": 3e-4, "soft_q_sqil_p0.8": 1e-3}
    # The benchmark's SQIL ran on the top-0.8 set; the full-vocabulary label is another config.
    with pytest.raises(ValueError, match=r"soft_q_sqil's algorithm config.*'sqil': \['top_p'\]"):
        ttq.benchmark_lrs(str(tmp_path / "b"), ["soft_q_sqil"])
    with pytest.raises(ValueError, match="gkd in .* has no chosen lr"):
        ttq.benchmark_lrs(str(tmp_path / "b"), ["gkd"])
    with pytest.raises(ValueError, match="no task 'other'"):
        ttq.benchmark_lrs(str(tmp_path / "b"), ["bc"], task="other")
    with pytest.raises(ValueError, match="run experiments/benchmark.py"):
        ttq.benchmark_lrs(str(tmp_path / "missing"), ["bc"])


def test_tiny_comparison_at_a_benchmarks_lrs_writes_records_plot_and_section(tmp_path):
    sets = [
        "steps=6", "sft_steps=2", "batch_size=4", "rollout_every=3", "rollout_prompts=4", "task.n_train_prompts=24",
        "task.samples_per_prompt=1", "task.n_val_prompts=4", "task.n_test_prompts=6", "task.max_new_tokens=8",
        "eval.seeds=[0]", "task.corpus_sequences=16", "task.corpus_max_tokens=8",
    ]
    _leaderboard(tmp_path / "bench", {"bc": ("bc", 5e-4), "minillm": ("minillm", 2e-5)})
    md = tmp_path / "ttq.md"
    ttq.main(["--algos", "bc", "minillm", "--seeds", "0", "--val-every-s", "0.2", "--out", str(tmp_path / "out"),
              "--plot", str(tmp_path / "ttq.png"), "--markdown", str(md), "--from-benchmark", str(tmp_path / "bench"),
              "--set", *sets])
    records = json.loads((tmp_path / "out" / "runs" / "minillm_lr2e-05_s0.json").read_text())
    assert records[0]["train_clock_s"] == 0.0 and records[-1]["step"] == 6 and records[-1]["time/rollout_s"] > 0
    first_bc = json.loads((tmp_path / "out" / "runs" / "bc_lr0.0005_s0.json").read_text())[0]
    assert first_bc["val/teacher_nll"] == records[0]["val/teacher_nll"]  # one shared warm start
    assert (tmp_path / "ttq.png").stat().st_size > 0
    text = md.read_text()
    assert "lr: bc 0.0005, minillm 2e-05" in text
    assert "| minillm | bc |" in text and "One-time costs" in text and "teacher data" in text


def test_a_flat_curve_is_no_gain_despite_float_rounding_of_the_start():
    """The start is the mean over every run's first record: a curve that never moves must not count as a gain
    when that mean differs from its own value by rounding (it printed as "reached in 0.0 s")."""
    flat_value = 41.84808436607271  # the mean of 7 copies differs from the mean of 3 in the last digit
    metrics = [key for key, _, _ in ttq.METRICS]

    def run(values):
        return [{"train_clock_s": float(i), "step": i, **{key: v for key in metrics}} for i, v in enumerate(values)]

    data = {"runs": {
        "flat": [run([flat_value] * 3) for _ in range(3)],
        "moves": [run([flat_value, flat_value - 1.0, flat_value + 1.0]) for _ in range(4)],
    }}
    assert np.mean([flat_value] * 7) != np.mean([flat_value] * 3)
    analysis = ttq.analyse(data)
    for key, _, higher in ttq.METRICS:
        assert not analysis[key]["flat"]["gained"] and math.isnan(analysis[key]["flat"]["t95_own"])
        assert analysis[key]["moves"]["gained"]
        assert abs(analysis[key]["moves"]["t95_own"] - (2.0 if higher else 1.0)) < 0.02  # on the 200-point grid
