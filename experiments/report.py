"""Summarise runs into a markdown table (mean and 95% t-interval over training seeds) and a panel plot.

Usage::

    python experiments/report.py multirun/2025-01-01/12-00-00 outputs/2025-01-02/09-30-00 \
        --out report.md --plot report.png

The fair comparison itself (every method at its chosen lr, paired differences to KD) is
``experiments/benchmark.py``, whose leaderboard uses this module's tables and plots.

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
shows the mean and the half-width of its 95% Student t-interval over them
(:mod:`tokenrl.evaluation.stats`; one seed prints ``mean (n = 1)``, a cell over fewer seeds than its row
adds its own ``n``), and the row's count. The "teacher" and "untrained student" rows pool ``teacher_eval`` /
``init_eval`` over all runs, one value per training seed. The SFT start is one row when every row's runs
started from the same one (the same ``sft_eval`` per seed), else one row per distinct start, naming the rows
that share it. Runs with a ``selection`` result add a "best step" column: the chosen checkpoint's step per
seed, in seed order.

``--plot`` draws one panel per metric (its direction on the axis: "lower is better", "higher is better", or the
teacher's value as a dashed line for response length and entropy), each row a point with its 95% interval bar
and ``n`` in its label.

``--protocol`` picks the fair-protocol columns (``PROTOCOL_METRICS``): teacher NLL with the response length,
and Rouge-L, at student decoding top-p 1.0 and 0.8 side by side, the teacher-forced KL, the on-policy reverse
KL and the set metrics (mass outside the teacher's set, KL on the set, student entropy).
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

import yaml

from tokenrl.evaluation.stats import Interval, t_interval

DEFAULT_METRICS = (
    ("eval/teacher_nll", "teacher NLL"),
    ("eval/response_len", "resp. len"),
    ("eval/rougeL", "Rouge-L"),
    ("eval/kl_student_teacher", "KL(s‖t)"),
    ("eval/onpolicy_kl", "on-policy KL(s‖t)"),
)
PROTOCOL_METRICS = (
    ("eval/teacher_nll", "teacher NLL @1.0"),
    ("eval/response_len", "resp. len @1.0"),
    ("eval_p0.8/teacher_nll", "teacher NLL @0.8"),
    ("eval_p0.8/response_len", "resp. len @0.8"),
    ("eval/rougeL", "Rouge-L @1.0"),
    ("eval_p0.8/rougeL", "Rouge-L @0.8"),
    ("eval/kl_student_teacher", "KL(s‖t)"),
    ("eval/onpolicy_kl", "on-policy KL(s‖t)"),
    ("eval/mass_outside_set", "mass outside set"),
    ("eval/kl_teacher_student_on_set", "KL(t‖s) on set"),
    ("eval/kl_set_teacher_student", "KL(t_p‖s)"),
    ("eval/student_entropy", "entropy"),
)
"""The response length stands beside the teacher NLL of the same samples: a short answer scores a low NLL."""
DEFAULT_IGNORE = (
    "seed", "*.seed", "hydra.*", "*output_dir*", "*run_dir*", "*log_dir*", "*save_dir*",
    # run bookkeeping that does not change the trained student
    "init_eval", "teacher_eval", "progress", "threads", "device", "data_dir", "log_every", "checkpoint_every",
    "checkpoint_seconds", "keep_checkpoints", "resume",
)
TOP_P_NAMES = ("p", "top_p")
BASELINES = (("teacher_eval", "teacher"), ("init_eval", "untrained student"))
DIRECTION = {
    "eval/teacher_nll": "lower", "eval/kl_student_teacher": "lower", "eval/kl_teacher_student": "lower",
    "eval/onpolicy_kl": "lower", "eval/onpolicy_kl_exact_state": "lower", "eval/mass_outside_set": "lower",
    "eval/kl_teacher_student_on_set": "lower", "eval/kl_set_teacher_student": "lower", "eval/rougeL": "higher",
}
"""Metric key (``eval/...``; ``eval_p<p>/...`` reads as ``eval/...``) -> which way is better; absent: no
direction (response length, entropies: compare with the teacher's)."""
AXIS_NAMES = {
    "eval/teacher_nll": "teacher NLL of samples", "eval/kl_student_teacher": "KL(s‖t), teacher-forced",
    "eval/kl_teacher_student": "KL(t‖s), teacher-forced", "eval/onpolicy_kl": "on-policy KL(s‖t)",
    "eval/mass_outside_set": "mass outside the teacher's set", "eval/kl_teacher_student_on_set": "KL(t‖s) on the set",
    "eval/kl_set_teacher_student": "KL(t_p‖s)", "eval/rougeL": "Rouge-L", "eval/response_len": "response length",
    "eval/student_entropy": "student entropy",
}
"""Metric key -> the plot's axis name (the decoding is added for ``eval_p<p>/...`` keys)."""


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
        stats: metric key -> mean and 95% t-interval over the row's training seeds.
        n: number of runs in the row.
        best_steps: the selected checkpoint's step of each run with a ``selection`` result, in seed order.
    """

    algo: str
    labels: dict[str, Any]
    stats: dict[str, Interval]
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


def _stats(evals: list[dict[str, Any]], metric_keys: list[str]) -> dict[str, Interval]:
    stats = {}
    for key in metric_keys:
        values = [float(e[key]) for e in evals if isinstance(e.get(key), (int, float))]
        if values:
            stats[key] = t_interval(values)
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


def sft_start_groups(starts: dict[str, dict[Any, dict[str, Any]]]) -> list[tuple[list[str], dict[Any, dict[str, Any]]]]:
    """Rows grouped by the SFT start their runs began from.

    Two rows share a start when their ``sft_eval`` is the same at every seed both have (runs of one seed that
    load one cached start evaluate it identically).

    Args:
        starts: row label -> training seed -> that seed's ``sft_eval`` (rows without one are left out).

    Returns:
        ``(labels, evals by seed)`` per distinct start, in the order of ``starts``.
    """
    groups: list[tuple[list[str], dict[Any, dict[str, Any]]]] = []
    for label, by_seed in starts.items():
        if not by_seed:
            continue
        for labels, merged in groups:
            common = set(merged) & set(by_seed)
            if common and all(_hashable(merged[s]) == _hashable(by_seed[s]) for s in common):
                labels.append(label)
                merged.update({s: e for s, e in by_seed.items() if s not in merged})
                break
        else:
            groups.append(([label], dict(by_seed)))
    return groups


def sft_row_name(labels: list[str], n_starts: int) -> str:
    """The table and plot name of an SFT-start row: shared by every row, or the rows that began from it."""
    return "SFT start (of every row)" if n_starts == 1 else "SFT start of " + ", ".join(labels)


def build_rows(
    runs: list[Run], metric_keys: list[str], ignore: tuple[str, ...] = DEFAULT_IGNORE, always: tuple[str, ...] = ()
) -> tuple[list[str], list[Row]]:
    """Group runs into rows and aggregate their final metrics over training seeds.

    Returns:
        ``(label_keys, rows)``: the teacher, the untrained student and the SFT start(s) first, then the
        algorithms sorted by name and labels.
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
    algo_rows, starts = [], {}
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
        row = Row(algo=members[0].algo, labels=labels, stats=_stats(evals, metric_keys), n=len(members), best_steps=best_steps)
        algo_rows.append(row)
        starts[row_name(row, keys)] = {_hashable(run.seed): run.sft_eval for run in members if run.sft_eval}
    sft_groups = sft_start_groups(starts)
    for names, by_seed in sft_groups:
        evals = list(by_seed.values())
        rows.append(Row(algo=sft_row_name(names, len(sft_groups)), labels={}, stats=_stats(evals, metric_keys), n=len(evals)))
    return keys, rows + algo_rows


def _column_names(keys: list[str]) -> list[str]:
    """Last component of each dotted key, or the full key where that is ambiguous."""
    last = [k.split(".")[-1] for k in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def _format_value(value: Any) -> str:
    # A "|" inside a cell would split the markdown column.
    return "" if value is None else str(value).replace("|", "\\|")


def to_markdown(keys: list[str], rows: list[Row], metrics: list[tuple[str, str]]) -> str:
    """Render rows as a GitHub markdown table: labels, mean ± 95% t-interval per metric, best steps if any, n seeds."""
    with_steps = any(row.best_steps for row in rows)
    header = ["algo", *_column_names(keys), *(title for _, title in metrics), *(["best step"] if with_steps else []), "n seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.algo, *(_format_value(row.labels.get(k)) for k in keys)]
        for key, _ in metrics:
            interval = row.stats.get(key)
            if interval is None:
                cells.append("–")
            else:
                own_n = interval.n not in (row.n, 1)  # a metric some of the row's runs lack
                cells.append(interval.format() + (f" (n = {interval.n})" if own_n else ""))
        if with_steps:
            cells.append(",".join(map(str, row.best_steps)))
        cells.append(str(row.n))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ± half-width of the 95% t-interval over training seeds (n seeds; one seed: n = 1, no interval)."]
    return "\n".join(lines) + "\n"


def row_name(row: Row, keys: list[str]) -> str:
    """The row's algorithm and its label settings, on one line."""
    names = _column_names(keys)
    settings = [f"{n}={row.labels[k]}" for n, k in zip(names, keys) if row.labels.get(k) is not None]
    return row.algo + (f" ({', '.join(settings)})" if settings else "")


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


@dataclass
class PlotRow:
    """One row of :func:`plot_panels`: a label and its intervals per metric (``baseline``: an SFT start, grey)."""

    label: str
    stats: dict[str, Interval]
    baseline: bool = False


def _generic_key(key: str) -> str:
    """``eval_p0.8/teacher_nll`` -> ``eval/teacher_nll`` (the same metric at another decoding)."""
    prefix, _, name = key.partition("/")
    return f"eval/{name}" if prefix.startswith("eval") else key


TEACHER_LINE = ("teacher_nll", "rougeL", "response_len", "student_entropy", "teacher_entropy")
"""Metrics whose panels draw the teacher's value (the others are 0 for the teacher by definition)."""


def direction(key: str) -> str | None:
    """``lower``, ``higher`` (is better) or None for ``key`` at any decoding (:data:`DIRECTION`)."""
    return DIRECTION.get(_generic_key(key))


def axis_label(key: str, title: str, teacher_line: bool = False) -> str:
    """The x-axis label of a metric's panel: its name and which way is better (none: compare with the teacher)."""
    better = direction(key)
    if better is not None:
        return f"{title}, {better} is better"
    return f"{title} (no direction; teacher dashed)" if teacher_line else f"{title} (no direction)"


def plot_panels(
    rows: list[PlotRow], metrics: list[tuple[str, str]] | tuple[tuple[str, str], ...], path: str | Path,
    teacher: dict[str, Interval] | None = None, title: str | None = None, ncols: int = 3,
) -> None:
    """One panel per metric: each row's mean with its 95% interval bar, the direction on the axis.

    A row with one seed is a hollow point without a bar; the teacher's value is a dashed line where it is not 0
    by definition (:data:`TEACHER_LINE`). Labels are wrapped and the layout keeps them inside the figure.

    Raises:
        ValueError: no row has any of the metrics.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(key, name) for key, name in metrics if any(key in row.stats and row.stats[key].n for row in rows)]
    if not shown:
        raise ValueError(f"no row has any of {[k for k, _ in metrics]}; nothing to plot")
    ncols = min(ncols, len(shown))
    nrows = -(-len(shown) // ncols)
    height = 0.34 * len(rows) + 1.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 2.4, height * nrows + 0.6), sharey=True,
                             squeeze=False, layout="constrained")
    positions = list(range(len(rows)))[::-1]  # the first row on top
    for ax, (key, name) in zip(axes.flat, shown):
        for y, row in zip(positions, rows):
            interval = row.stats.get(key)
            if interval is None or interval.n == 0:
                continue
            color = "0.45" if row.baseline else "C0"
            if interval.n > 1:
                ax.errorbar(interval.mean, y, xerr=[[interval.mean - interval.low], [interval.high - interval.mean]],
                            fmt="o", color=color, capsize=3, markersize=5)
            else:
                ax.plot(interval.mean, y, "o", mfc="none", color=color, markersize=5)
        teacher_line = bool(teacher and key in teacher and teacher[key].n and key.split("/")[-1] in TEACHER_LINE)
        if teacher_line:
            ax.axvline(teacher[key].mean, ls="--", lw=1, color="C3")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(axis_label(key, name, teacher_line), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    ns = [max((r.stats[k].n for k, _ in shown if k in r.stats), default=0) for r in rows]
    labels = [textwrap.fill(f"{row.label} (n = {n})", 38) for row, n in zip(rows, ns)]
    for ax_row in axes:
        ax_row[0].set_yticks(positions, labels, fontsize=8)
    notes = "bars: 95% t-interval over training seeds; hollow: one seed (no interval); dashed: the teacher"
    fig.suptitle(f"{title}\n{notes}" if title else notes, fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched recursively for metrics.json)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="write a PNG with one panel per metric (95%% intervals over seeds) to this file")
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
        teacher = next((row.stats for row in rows if row.algo == "teacher"), None)
        shown = [
            PlotRow(row_name(row, keys), row.stats, baseline=row.algo.startswith("SFT start"))
            for row in rows if row.algo not in ("teacher", "untrained student")
        ]
        plot_panels(shown, metrics, args.plot, teacher=teacher)
    return 0


if __name__ == "__main__":
    # Skipped runs are reported as one "warning: ..." line each, without warnings' source-line echo.
    warnings.formatwarning = lambda message, *rest, **kwargs: f"warning: {message}\n"
    sys.exit(main())
