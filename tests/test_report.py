"""Tests of experiments/report.py on a fake Hydra multirun directory written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import load_experiment


@pytest.fixture(scope="module")
def report():
    return load_experiment("report")


# (algo, seed) -> final teacher NLL / Rouge-L; the expected row stats are computed from these.
FINAL = {
    ("bd", 0): (2.0, 30.0),
    ("bd", 1): (2.4, 34.0),
    ("sft", 0): (3.0, 20.0),
    ("sft", 1): (3.6, 22.0),
}
TEACHER_NLL = {0: 1.0, 1: 1.2}
INIT_NLL = {0: 7.0, 1: 7.5}


def write_multirun(root: Path, config_in_json: bool) -> Path:
    """Hydra layout ``multirun/DATE/TIME/<job>/``: two algorithms x two seeds, one failed job."""
    sweep = root / "multirun" / "2025-01-01" / "12-00-00"
    for job, ((algo, seed), (nll, rouge)) in enumerate(sorted(FINAL.items())):
        run_dir = sweep / str(job)
        run_dir.mkdir(parents=True)
        # Configs differ in seed, output path and an algorithm-specific lr (implied by the algorithm name).
        config = {
            "seed": seed,
            "output_dir": str(run_dir),
            "task": {"name": "synthetic", "p": 0.8},
            "algo": {"name": algo, "lr": 1e-4 if algo == "bd" else 3e-4},
        }
        metrics = {
            "algo": algo,
            "seed": seed,
            "final_eval": {"eval/teacher_nll": nll, "eval/rougeL": rouge, "eval/nll_by_position": [1.0, 2.0]},
            "init_eval": {"eval/teacher_nll": INIT_NLL[seed]},
            "teacher_eval": {"eval/teacher_nll": TEACHER_NLL[seed], "eval/rougeL": 40.0},
            "train": {},
        }
        if config_in_json:
            metrics["config"] = config
        else:
            (run_dir / ".hydra").mkdir()
            (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (sweep / "4").mkdir()
    (sweep / "4" / "metrics.json").write_text(json.dumps({"algo": "crashed"}))
    return root / "multirun"


def expected(values):
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1))


@pytest.mark.parametrize("config_in_json", [True, False], ids=["config-field", "hydra-yaml"])
def test_report_rows_means_stds_and_plot(report, tmp_path, capsys, config_in_json):
    multirun = write_multirun(tmp_path, config_in_json)
    out_md, out_png = tmp_path / "report.md", tmp_path / "nll.png"
    with pytest.warns(UserWarning, match="final_eval"):
        status = report.main([str(multirun), "--out", str(out_md), "--plot", str(out_png)])
    assert status == 0
    stdout = capsys.readouterr().out
    assert out_md.read_text() == stdout
    assert out_png.stat().st_size > 0 and out_png.read_bytes()[:4] == b"\x89PNG"

    with pytest.warns(UserWarning, match="final_eval"):
        runs = [r for r in map(report.load_run, report.find_metrics_files([multirun])) if r is not None]
    keys, rows = report.build_rows(runs, ["eval/teacher_nll", "eval/rougeL"])
    # p always labels; seed, output_dir and the per-algorithm lr do not.
    assert keys == ["task.p"]
    by_algo = {row.algo: row for row in rows}
    assert [row.algo for row in rows] == ["teacher", "untrained student", "bd", "sft"]
    for algo in ("bd", "sft"):
        row = by_algo[algo]
        assert row.n == 2 and row.labels == {"task.p": 0.8}
        nll_mean, nll_std = expected([FINAL[(algo, s)][0] for s in (0, 1)])
        rouge_mean, rouge_std = expected([FINAL[(algo, s)][1] for s in (0, 1)])
        assert row.stats["eval/teacher_nll"] == pytest.approx((nll_mean, nll_std, 2))
        assert row.stats["eval/rougeL"] == pytest.approx((rouge_mean, rouge_std, 2))
        assert f"| {algo} | 0.8 | {nll_mean:.3f} ± {nll_std:.3f} | {rouge_mean:.3f} ± {rouge_std:.3f} |" in stdout
    # Baselines: one value per training seed, although four runs carry them.
    assert by_algo["teacher"].stats["eval/teacher_nll"] == pytest.approx((*expected([1.0, 1.2]), 2))
    assert by_algo["teacher"].stats["eval/rougeL"] == pytest.approx((40.0, 0.0, 2))
    assert by_algo["untrained student"].stats["eval/teacher_nll"] == pytest.approx((*expected([7.0, 7.5]), 2))
    assert "eval/rougeL" not in by_algo["untrained student"].stats
    assert "| untrained student |  | 7.250 ± 0.354 | – |" in stdout


def test_report_splits_rows_on_swept_keys(report, tmp_path):
    runs = []
    for algo in ("bd", "sft"):
        for expectile in (0.7, 0.9):
            for seed in (0, 1):
                config = {"seed": seed, "algo": {"name": algo, "expectile": expectile}, "task": {"p": 0.8}}
                runs.append(report.Run(tmp_path, algo, seed, report.flatten(config), {"eval/teacher_nll": expectile + seed}))
    keys, rows = report.build_rows(runs, ["eval/teacher_nll"])
    assert keys == ["algo.expectile", "task.p"]
    assert [(row.algo, row.labels["algo.expectile"], row.n) for row in rows] == [
        ("bd", 0.7, 2), ("bd", 0.9, 2), ("sft", 0.7, 2), ("sft", 0.9, 2)
    ]
    assert rows[0].stats["eval/teacher_nll"] == pytest.approx((1.2, float(np.std([0.7, 1.7], ddof=1)), 2))


def test_report_fails_cleanly_without_runs(report, tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no usable metrics.json" in capsys.readouterr().err


def test_report_protocol_columns_forced_label_and_best_steps(report, tmp_path, capsys):
    """--protocol's columns, --label algo.lr (implied by the algorithm otherwise) and the per-seed best steps."""
    for algo, lr in (("bd", 1e-3), ("sft", 3e-4)):
        for seed, step in ((1, 700), (0, 300)):
            run_dir = tmp_path / f"{algo}_{seed}"
            run_dir.mkdir()
            final = {key: float(seed) for key, _ in report.PROTOCOL_METRICS}
            (run_dir / "metrics.json").write_text(json.dumps({
                "algo": algo, "seed": seed, "config": {"seed": seed, "algo": {"name": algo, "lr": lr}},
                "final_eval": final, "selection": {"best_step": step + (algo == "sft")},
            }))
    assert report.main([str(tmp_path), "--protocol", "--label", "algo.lr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| algo | lr | teacher NLL @1.0 | teacher NLL @0.8 |") and "| best step | n seeds |" in lines[0]
    assert lines[2] == "| bd | 0.001 | " + "0.500 ± 0.707 | " * len(report.PROTOCOL_METRICS) + "300,700 | 2 |"
    assert lines[3].startswith("| sft | 0.0003 |") and lines[3].endswith("| 301,701 | 2 |")


def test_report_curves_list_each_runs_validation_history(report, tmp_path, capsys):
    """--curves adds one line per run with its selection history, also for a run whose best step is 0."""
    histories = {"bd": [[0, 4.3], [20, 4.9], [40, 4.75]], "kd": [[0, 4.3], [20, 4.2], [40, 3.8]]}
    for algo, history in histories.items():
        run_dir = tmp_path / algo
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text(json.dumps({
            "algo": algo, "seed": 0, "config": {"seed": 0, "algo": {"name": algo, "lr": 1e-3}},
            "final_eval": {"eval/teacher_nll": 1.0},
            "selection": {"best_step": min(history, key=lambda h: h[1])[0], "history": history},
        }))
    assert report.main([str(tmp_path), "--curves"]) == 0
    out = capsys.readouterr().out
    assert "| bd | 0 | 0: 4.3000, 20: 4.9000, 40: 4.7500 |" in out
    assert "| kd | 0 | 0: 4.3000, 20: 4.2000, 40: 3.8000 |" in out
    assert report.main([str(tmp_path)]) == 0
    assert "validation score by step" not in capsys.readouterr().out
