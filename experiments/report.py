"""Summarise runs into a markdown table (mean +- std over training seeds) and a teacher-NLL bar plot.

Usage::

    python experiments/report.py multirun/2025-01-01/12-00-00 outputs/2025-01-02/09-30-00 \
        --out report.md --plot teacher_nll.png

Every ``metrics.json`` below the given directories is one run (Hydra multirun ``<date>/<time>/<job>/``
folders and plain run folders both work). Expected schema, every key optional except that a run without
``final_eval`` is skipped with a warning::

    {
      "algo": "iql_bd",                      # algorithm name; else config["algo"]["name"] or config["algo"]
      "seed": 0,                             # training seed; else config["seed"]
      "config": {...},                       # the run's config, nested or flattened with dotted keys;
                                             # else read from <run dir>/.hydra/config.yaml
      "final_eval": {"eval/teacher_nll": 2.1, "eval/rougeL": 31.0, ...},  # tokenrl.evaluation.metrics.evaluate
      "init_eval": {...},                    # same keys, the student before training
      "teacher_eval": {...},                 # same keys, tokenrl.evaluation.metrics.evaluate_teacher_samples
      "sft_eval": {...},                     # same keys, the student after the SFT warm start (if any)
      "selection": {"best_step": 300, ...},  # selection=best: the chosen checkpoint (column "best step")
      "train": {...}                         # training curves; not used here
    }

Rows: one per algorithm and setting. A config key becomes a row label when it takes several values
within one algorithm's runs, or, for keys outside the ``algo.`` group, several values across all runs
(``algo.*`` keys that differ only between algorithms are implied by the algorithm name). Keys matching
``--ignore`` (seeds, Hydra and output paths by default) never do, and top-p keys (last component ``p`` or
``top_p``) and the keys given with ``--label`` (e.g. ``algo.lr``, to show each algorithm's chosen lr) always
label when present. Runs sharing a row are that setting's training seeds; the table
shows mean +- sample std (``ddof=1``) over them and their count. The "teacher" and "untrained student"
rows pool ``teacher_eval`` / ``init_eval`` over all runs, one value per training seed. Runs with a
``selection`` result add a "best step" column: the chosen checkpoint's step per seed, in seed order.

``--protocol`` picks the fair-protocol columns (``PROTOCOL_METRICS``): teacher NLL and Rouge-L at student
decoding top-p 1.0 and 0.8 side by side, the teacher-forced KL, the on-policy reverse KL, the set metrics
(mass outside the teacher's set, KL on the set, student entropy) and the response length.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULT_METRICS = (
    ("eval/teacher_nll", "teacher NLL"),
    ("eval/rougeL", "Rouge-L"),
    ("eval/kl_student_teacher", "KL(s‖t)"),
    ("eval/onpolicy_kl", "on-policy KL(s‖t)"),
    ("eval/response_len", "resp. len"),
)
PROTOCOL_METRICS = (
    ("eval/teacher_nll", "teacher NLL @1.0"),
    ("eval_p0.8/teacher_nll", "teacher NLL @0.8"),
    ("eval/rougeL", "Rouge-L @1.0"),
    ("eval_p0.8/rougeL", "Rouge-L @0.8"),
    ("eval/kl_student_teacher", "KL(s‖t)"),
    ("eval/onpolicy_kl", "on-policy KL(s‖t)"),
    ("eval/mass_outside_set", "mass outside set"),
    ("eval/kl_teacher_student_on_set", "KL(t‖s) on set"),
    ("eval/kl_set_teacher_student", "KL(t_p‖s)"),
    ("eval/student_entropy", "entropy"),
    ("eval/response_len", "resp. len"),
)
DEFAULT_IGNORE = (
    "seed", "*.seed", "hydra.*", "*output_dir*", "*run_dir*", "*log_dir*", "*save_dir*",
    # run bookkeeping that does not change the trained student
    "init_eval", "teacher_eval", "progress", "threads", "device", "data_dir", "log_every", "checkpoint_every",
    "checkpoint_seconds", "keep_checkpoints", "resume",
)
TOP_P_NAMES = ("p", "top_p")
BASELINES = (("teacher_eval", "teacher"), ("init_eval", "untrained student"), ("sft_eval", "SFT init (start of every algorithm)"))


@dataclass
class Run:
    """One training run read from a ``metrics.json``.

    Attributes:
        path: the ``metrics.json`` file.
        algo: algorithm name.
        seed: training seed (None if unknown).
        config: flattened config, dotted keys -> values.
        final_eval: metrics of the trained student.
        init_eval: metrics of the untrained student (may be empty).
        teacher_eval: metrics of the teacher's own samples (may be empty).
        sft_eval: metrics of the student after the SFT warm start (may be empty).
        best_step: the checkpoint step ``selection=best`` chose (None without a ``selection`` result).
        history: ``selection=best``'s validation scores, ``[step, score]`` pairs (empty without one).
    """

    path: Path
    algo: str
    seed: Any
    config: dict[str, Any]
    final_eval: dict[str, Any]
    init_eval: dict[str, Any] = field(default_factory=dict)
    teacher_eval: dict[str, Any] = field(default_factory=dict)
    sft_eval: dict[str, Any] = field(default_factory=dict)
    best_step: int | None = None
    history: list = field(default_factory=list)


@dataclass
class Row:
    """One table row.

    Attributes:
        algo: algorithm name, or "teacher" / "untrained student".
        labels: label key -> value (the setting this row stands for).
        stats: metric key -> (mean, std, n) over the row's training seeds.
        n: number of runs in the row.
        best_steps: the selected checkpoint's step of each run with a ``selection`` result, in seed order.
    """

    algo: str
    labels: dict[str, Any]
    stats: dict[str, tuple[float, float, int]]
    n: int
    best_steps: list[int] = field(default_factory=list)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (``{"a": {"b": 1}} -> {"a.b": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def find_metrics_files(paths: list[str | Path]) -> list[Path]:
    """All ``metrics.json`` files at or below the given files/directories, sorted, without duplicates."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file() and path.name == "metrics.json":
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob("metrics.json"))
        else:
            warnings.warn(f"{path}: not a directory or metrics.json; skipped")
    return sorted(found)


def _read_config(metrics: dict[str, Any], path: Path) -> dict[str, Any]:
    if isinstance(metrics.get("config"), dict):
        return flatten(metrics["config"])
    hydra_config = path.parent / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        with hydra_config.open() as f:
            # safe_load keeps Hydra interpolations (${...}) as strings, which is enough to tell runs apart.
            loaded = yaml.safe_load(f) or {}
        return flatten(loaded) if isinstance(loaded, dict) else {}
    warnings.warn(f"{path}: no 'config' field and no .hydra/config.yaml; rows cannot be split by config")
    return {}


def load_run(path: Path) -> Run | None:
    """Read one ``metrics.json`` (see the module docstring); None, with a warning, if it is unusable."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warnings.warn(f"{path}: cannot read ({err}); skipped")
        return None
    if not isinstance(metrics.get("final_eval"), dict):
        warnings.warn(f"{path}: no 'final_eval' dict; skipped")
        return None
    config = _read_config(metrics, path)
    algo = metrics.get("algo") or config.get("algo.name") or config.get("algo")
    if not isinstance(algo, str):
        warnings.warn(f"{path}: no 'algo' name in metrics.json or config; labelled 'unknown'")
        algo = "unknown"
    return Run(
        path=path,
        algo=algo,
        seed=metrics.get("seed", config.get("seed")),
        config=config,
        final_eval=metrics["final_eval"],
        init_eval=metrics.get("init_eval") or {},
        teacher_eval=metrics.get("teacher_eval") or {},
        sft_eval=metrics.get("sft_eval") or {},
        best_step=(metrics.get("selection") or {}).get("best_step"),
        history=(metrics.get("selection") or {}).get("history") or [],
    )


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def label_keys(
    runs: list[Run], ignore: tuple[str, ...] = DEFAULT_IGNORE, always: tuple[str, ...] = ()
) -> list[str]:
    """Config keys that distinguish rows (see the module docstring for the rule); ``always``: forced labels."""
    keys = sorted({k for run in runs for k in run.config})
    chosen = []
    for key in keys:
        if key in always:
            chosen.append(key)
            continue
        if any(fnmatch.fnmatch(key, pattern) for pattern in ignore):
            continue
        if key.split(".")[-1] in TOP_P_NAMES:
            chosen.append(key)
            continue
        values_by_algo: dict[str, set] = {}
        for run in runs:
            if key in run.config:
                values_by_algo.setdefault(run.algo, set()).add(_hashable(run.config[key]))
        varies_within_algo = any(len(v) > 1 for v in values_by_algo.values())
        varies_overall = len(set().union(*values_by_algo.values())) > 1
        in_algo_group = key == "algo" or key.startswith("algo.")
        if varies_within_algo or (varies_overall and not in_algo_group):
            chosen.append(key)
    return chosen


def _stats(evals: list[dict[str, Any]], metric_keys: list[str]) -> dict[str, tuple[float, float, int]]:
    stats = {}
    for key in metric_keys:
        values = [float(e[key]) for e in evals if isinstance(e.get(key), (int, float))]
        if values:
            arr = np.asarray(values)
            stats[key] = (float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, arr.size)
    return stats


def _baseline_evals(runs: list[Run], field_name: str) -> list[dict[str, Any]]:
    """One baseline eval per training seed (runs of several algorithms share it)."""
    by_seed: dict[str, dict[str, Any]] = {}
    for run in runs:
        evaluation = getattr(run, field_name)
        if not evaluation:
            continue
        seed_key = _hashable(run.seed)
        if seed_key in by_seed and _hashable(by_seed[seed_key]) != _hashable(evaluation):
            warnings.warn(
                f"{field_name} differs between runs with seed {run.seed} (e.g. {run.path}); "
                "the baseline row keeps the first one"
            )
            continue
        by_seed.setdefault(seed_key, evaluation)
    return list(by_seed.values())


def build_rows(
    runs: list[Run], metric_keys: list[str], ignore: tuple[str, ...] = DEFAULT_IGNORE, always: tuple[str, ...] = ()
) -> tuple[list[str], list[Row]]:
    """Group runs into rows and aggregate their final metrics over training seeds.

    Returns:
        ``(label_keys, rows)``: baseline rows first, then the algorithms sorted by name and labels.
    """
    keys = label_keys(runs, ignore, always)
    rows = []
    for field_name, name in BASELINES:
        evals = _baseline_evals(runs, field_name)
        if evals:
            rows.append(Row(algo=name, labels={}, stats=_stats(evals, metric_keys), n=len(evals)))
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        group = (run.algo,) + tuple(_hashable(run.config.get(k)) for k in keys)
        groups.setdefault(group, []).append(run)
    for group in sorted(groups):
        members = groups[group]
        seeds = [_hashable(run.seed) for run in members]
        if len(set(seeds)) < len(seeds):
            warnings.warn(
                f"row {group} has repeated seeds {sorted(seeds)}; another config key may differ "
                "(see --ignore) or runs were repeated"
            )
        labels = {k: members[0].config.get(k) for k in keys}
        evals = [run.final_eval for run in members]
        best_steps = [run.best_step for run in sorted(members, key=lambda r: str(r.seed)) if run.best_step is not None]
        rows.append(
            Row(algo=members[0].algo, labels=labels, stats=_stats(evals, metric_keys), n=len(members), best_steps=best_steps)
        )
    return keys, rows


def _column_names(keys: list[str]) -> list[str]:
    """Last component of each dotted key, or the full key where that is ambiguous."""
    last = [k.split(".")[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def _format_value(value: Any) -> str:
    # A "|" inside a cell would split the markdown column.
    return "" if value is None else str(value).replace("|", "\\|")


def to_markdown(keys: list[str], rows: list[Row], metrics: list[tuple[str, str]]) -> str:
    """Render rows as a GitHub markdown table: labels, ``mean ± std`` per metric, best steps if any, n seeds."""
    with_steps = any(row.best_steps for row in rows)
    header = ["algo", *_column_names(keys), *(title for _, title in metrics), *(["best step"] if with_steps else []), "n seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.algo, *(_format_value(row.labels.get(k)) for k in keys)]
        for key, _ in metrics:
            if key in row.stats:
                mean, std, _n = row.stats[key]
                cells.append(f"{mean:.3f} ± {std:.3f}")
            else:
                cells.append("–")
        if with_steps:
            cells.append(",".join(map(str, row.best_steps)))
        cells.append(str(row.n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row_name(row: Row, keys: list[str]) -> str:
    names = _column_names(keys)
    settings = [f"{n}={row.labels[k]}" for n, k in zip(names, keys) if row.labels.get(k) is not None]
    return row.algo + (f"\n{', '.join(settings)}" if settings else "")


def curves_markdown(runs: list[Run], keys: list[str]) -> str:
    """One line per run with ``selection=best``'s validation curve: ``step: score`` for every validation.

    Shows how a run moved even when its reported student is the SFT start (best step 0).
    """
    names = _column_names(keys)
    lines = ["| run | seed | validation score by step (lower is better) |", "|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.algo, [str(r.config.get(k)) for k in keys], str(r.seed))):
        if not run.history:
            continue
        settings = [f"{n}={run.config[k]}" for n, k in zip(names, keys) if run.config.get(k) is not None]
        label = run.algo + (f" ({', '.join(settings)})" if settings else "")
        curve = ", ".join(f"{int(step)}: {score:.4f}" for step, score in run.history)
        lines.append(f"| {label} | {run.seed} | {curve} |")
    return "\n".join(lines) + "\n"


def plot_rows(keys: list[str], rows: list[Row], path: str | Path, metric: str = "eval/teacher_nll") -> None:
    """Save a bar chart of ``metric`` (mean, std error bars over training seeds) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if metric in row.stats]
    if not shown:
        raise ValueError(f"no row has metric {metric!r}; nothing to plot")
    means = [row.stats[metric][0] for row in shown]
    stds = [row.stats[metric][1] for row in shown]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(shown)), 4.0))
    ax.bar(range(len(shown)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([_row_name(row, keys) for row in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched recursively for metrics.json)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="write a PNG bar chart of the teacher NLL per row to this file")
    parser.add_argument(
        "--metric",
        action="append",
        metavar="KEY[=TITLE]",
        help="metric column (repeatable); default: " + ", ".join(k for k, _ in DEFAULT_METRICS),
    )
    parser.add_argument("--protocol", action="store_true", help="the fair protocol's columns (PROTOCOL_METRICS)")
    parser.add_argument(
        "--curves", action="store_true", help="also print each run's selection=best validation curve (step: score)"
    )
    parser.add_argument(
        "--label", action="append", metavar="KEY", help="config key always shown as a row label (e.g. algo.lr)"
    )
    parser.add_argument(
        "--ignore",
        action="append",
        metavar="PATTERN",
        help="config keys (fnmatch patterns) never used as row labels, added to: " + ", ".join(DEFAULT_IGNORE),
    )
    args = parser.parse_args(argv)

    metrics = list(PROTOCOL_METRICS if args.protocol else DEFAULT_METRICS)
    if args.metric:
        metrics = [tuple(m.split("=", 1)) if "=" in m else (m, m.removeprefix("eval/")) for m in args.metric]
    ignore = DEFAULT_IGNORE + tuple(args.ignore or ())
    runs = [run for run in map(load_run, find_metrics_files(args.dirs)) if run is not None]
    if not runs:
        print(f"error: no usable metrics.json under {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    keys, rows = build_rows(runs, [k for k, _ in metrics], ignore, tuple(args.label or ()))
    table = to_markdown(keys, rows, metrics)
    if args.curves:
        table += "\n" + curves_markdown(runs, keys)
    sys.stdout.write(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.plot:
        plot_rows(keys, rows, args.plot)
    return 0


if __name__ == "__main__":
    # Skipped runs are reported as one "warning: ..." line each, without warnings' source-line echo.
    warnings.formatwarning = lambda message, *rest, **kwargs: f"warning: {message}\n"
    sys.exit(main())
