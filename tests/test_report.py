"""Tests of experiments/report.py on a fake Hydra multirun directory written here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

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
    """Mean and the 95% t-interval's half-width (scipy's)."""
    arr = np.asarray(values)
    half = scipy_stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return float(arr.mean()), float(half)


def approx_interval(interval, mean, half, n):
    assert (interval.mean, interval.half_width, interval.n) == pytest.approx((mean, half, n))


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
        approx_interval(row.stats["eval/teacher_nll"], nll_mean, nll_std, 2)
        approx_interval(row.stats["eval/rougeL"], rouge_mean, rouge_std, 2)
        assert f"| {algo} | 0.8 | {nll_mean:.3f} ± {nll_std:.3f} | – | {rouge_mean:.3f} ± {rouge_std:.3f} |" in stdout
    # Baselines: one value per training seed, although four runs carry them.
    approx_interval(by_algo["teacher"].stats["eval/teacher_nll"], *expected([1.0, 1.2]), 2)
    approx_interval(by_algo["teacher"].stats["eval/rougeL"], 40.0, 0.0, 2)
    approx_interval(by_algo["untrained student"].stats["eval/teacher_nll"], *expected([7.0, 7.5]), 2)
    assert "eval/rougeL" not in by_algo["untrained student"].stats
    assert f"| untrained student |  | 7.250 ± {expected([7.0, 7.5])[1]:.3f} | – | – |" in stdout


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
    approx_interval(rows[0].stats["eval/teacher_nll"], *expected([0.7, 1.7]), 2)


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
    assert lines[0].startswith("| algo | lr | teacher NLL @1.0 | resp. len @1.0 | teacher NLL @0.8 | resp. len @0.8 |")
    assert "| best step | n seeds |" in lines[0]
    half = expected([0.0, 1.0])[1]
    assert lines[2] == "| bd | 0.001 | " + f"0.500 ± {half:.3f} | " * len(report.PROTOCOL_METRICS) + "300,700 | 2 |"
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


def _run(report, algo, seed, final, sft=None):
    config = report.flatten({"seed": seed, "algo": {"name": algo}})
    return report.Run(Path(f"{algo}_{seed}"), algo, seed, config, final, sft_eval=sft or {})


def test_one_seed_prints_n_1_and_a_cell_with_fewer_seeds_its_own_n(report):
    runs = [
        _run(report, "bd", 0, {"eval/teacher_nll": 2.0, "eval/rougeL": 30.0}),
        _run(report, "kd", 0, {"eval/teacher_nll": 1.0, "eval/rougeL": 40.0}),
        _run(report, "kd", 1, {"eval/teacher_nll": 1.5}),
        _run(report, "kd", 2, {"eval/teacher_nll": 1.2, "eval/rougeL": 44.0}),
    ]
    metrics = [("eval/teacher_nll", "NLL"), ("eval/rougeL", "Rouge-L")]
    keys, rows = report.build_rows(runs, [k for k, _ in metrics])
    lines = report.to_markdown(keys, rows, metrics).splitlines()
    assert "| bd | 2.000 (n = 1) | 30.000 (n = 1) | 1 |" in lines
    nll, nll_half = expected([1.0, 1.5, 1.2])
    rouge, rouge_half = expected([40.0, 44.0])
    assert f"| kd | {nll:.3f} ± {nll_half:.3f} | {rouge:.3f} ± {rouge_half:.3f} (n = 2) | 3 |" in lines
    assert "± 0.000" not in "\n".join(lines)


def test_sft_start_is_one_row_when_shared_and_one_per_start_otherwise(report):
    start = {0: {"eval/teacher_nll": 3.0}, 1: {"eval/teacher_nll": 3.4}}
    runs = [_run(report, algo, seed, {"eval/teacher_nll": 1.0 + seed}, start[seed]) for algo in ("bd", "kd") for seed in (0, 1)]
    _, rows = report.build_rows(runs, ["eval/teacher_nll"])
    assert [row.algo for row in rows] == ["SFT start (of every row)", "bd", "kd"]
    approx_interval(rows[0].stats["eval/teacher_nll"], *expected([3.0, 3.4]), 2)
    # gkd started from another SFT start (a different evaluation at seed 0): two start rows, named by their rows.
    runs += [_run(report, "gkd", seed, {"eval/teacher_nll": 2.0}, {"eval/teacher_nll": 5.0 + seed}) for seed in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "baseline keeps the first one" warning any more
        _, rows = report.build_rows(runs, ["eval/teacher_nll"])
    assert [row.algo for row in rows[:2]] == ["SFT start of bd, kd", "SFT start of gkd"]
    approx_interval(rows[1].stats["eval/teacher_nll"], *expected([5.0, 6.0]), 2)


def test_plot_panels_one_per_metric_with_direction(report, tmp_path):
    assert report.axis_label("eval_p0.8/teacher_nll", "teacher NLL @0.8") == "teacher NLL @0.8, lower is better"
    assert report.axis_label("eval/rougeL", "Rouge-L") == "Rouge-L, higher is better"
    assert report.axis_label("eval/response_len", "length", teacher_line=True) == "length (no direction; teacher dashed)"
    assert report.axis_label("eval/student_entropy", "entropy") == "entropy (no direction)"
    from tokenrl.evaluation.stats import t_interval

    rows = [
        report.PlotRow("SFT start", {"eval/teacher_nll": t_interval([3.0, 3.2])}, baseline=True),
        report.PlotRow("kd (lr 0.0003)", {"eval/teacher_nll": t_interval([1.0, 1.2, 1.1]),
                                          "eval/response_len": t_interval([9.0])}),
    ]
    path = tmp_path / "panels.png"
    report.plot_panels(rows, [("eval/teacher_nll", "NLL"), ("eval/response_len", "length"), ("eval/rougeL", "R")], path,
                       teacher={"eval/response_len": t_interval([10.0, 10.0])})
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot_panels(rows, [("eval/rougeL", "R")], path)
