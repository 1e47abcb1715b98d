"""experiments/sweep_lr.py: the lr pick by validation, and a tiny end-to-end sweep (one subprocess multirun)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_experiment
from tests.test_run_smoke import TINY


@pytest.fixture(scope="module")
def sweep():
    return load_experiment("sweep_lr")


def test_pick_lrs_takes_the_lowest_mean_validation_score(sweep):
    val = {(1e-4, 0): 1.0, (1e-4, 1): 0.6, (1e-3, 0): 0.7, (1e-3, 1): 0.7, (1e-2, 0): float("nan"), (1e-2, 1): 0.1}
    records = [
        {"algo": "bc", "lr": lr, "seed": seed, "val": v, "best_step": 0, "final_eval": {"eval/teacher_nll": v + 1}}
        for (lr, seed), v in val.items()
    ]
    pick = sweep.pick_lrs(records)["bc"]
    assert pick["val_by_lr"][1e-4] == pytest.approx(0.8) and pick["val_by_lr"][1e-3] == pytest.approx(0.7)
    assert pick["lr"] == 1e-3  # a diverged (NaN) seed never makes its lr win
    assert sorted(r["seed"] for r in pick["runs"]) == [0, 1]
    assert "| bc |" in sweep.to_markdown({"bc": pick}, ("eval/teacher_nll",)) and "1.7000 ± 0.0000" in sweep.to_markdown(
        {"bc": pick}, ("eval/teacher_nll",)
    )


def test_failed_run_scores_nan_and_its_lr_is_not_chosen(sweep, tmp_path):
    """A run folder with config.yaml but no metrics.json (stopped by the divergence guard) loses, the rest count."""
    for lr, val in ((1e-3, 0.5), (3e-3, None)):
        run_dir = tmp_path / "kd" / f"lr{lr:g}" / "0_kd_s0"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(f"algo:\n  name: kd\n  lr: {lr}\nseed: 0\n")
        if val is not None:
            (run_dir / "metrics.json").write_text(json.dumps({
                "algo": "kd", "seed": 0, "config": {"algo": {"lr": lr}},
                "selection": {"best_score": val, "best_step": 100}, "final_eval": {},
            }))
    records = sweep.collect(tmp_path)
    failed = next(r for r in records if r["lr"] == 3e-3)
    assert len(records) == 2 and failed["val"] != failed["val"] and failed["final_eval"] == {}
    assert sweep.pick_lrs(records)["kd"]["lr"] == 1e-3


def test_tiny_sweep_runs_and_reports_the_chosen_lr(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENRL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "sweep"
    extra = [*TINY, "sft_steps=4", "selection.sft_eval_every=2", "selection.every=2"]
    assert sweep.main(["--algos", "bc", "--lrs", "1e-3,1e-2", "--out", str(out), "--", *extra]) == 0
    records = sweep.collect(out)
    assert sorted(r["lr"] for r in records) == [1e-3, 1e-2]
    chosen = min(records, key=lambda r: r["val"])
    table = (out / "lr_sweep.md").read_text()
    assert f"| {chosen['lr']:g} |" in table
    assert json.loads((out / "chosen.json").read_text()) == {"bc": {"lr": chosen["lr"], "runs": [chosen["dir"]]}}
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["sft"]["steps_run"] <= 4 and metrics["selection"]["history"][0][0] == 0
