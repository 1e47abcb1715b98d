"""Learning-rate sweep under the fair protocol: every method at a few learning rates, the lr picked by validation.

    python experiments/sweep_lr.py --algos bc,kd,iql_bd --lrs 1e-4,3e-4,1e-3 --seeds 0,1,2 \
        --out multirun/lr_sweep -- sft_steps=3000 eval.decode_top_p=[1.0,0.8]

For each algorithm and lr, one Hydra multirun of ``experiments/run.py`` over ``seed`` into
``OUT/<algo>/lr<lr>/`` with ``selection=best`` (the converged SFT start is cached and shared by every run of a seed;
each run reports the best validation score of its checkpoints, step 0 = the SFT start included). Then, per
algorithm, the lr with the lowest mean validation score over seeds is chosen (a run that failed, e.g. stopped by
the divergence guard, scores NaN, so its lr is never chosen and the sweep goes on), and ``OUT/lr_sweep.md`` gets a
table: the validation score at every lr, the chosen lr, and the test metrics of the chosen lr (mean +- std
over seeds); ``OUT/chosen.json`` maps each algorithm to its chosen ``lr`` and the run folders at that lr
(``runs``), for scripts that run more seeds at the chosen lr. Arguments after ``--`` go to every run (task, model, steps, ...). ``--lrs-for ALGO=LR,LR``
gives one algorithm its own grid; ``--summarize-only`` re-reads an existing ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METRICS = ("eval/teacher_nll", "eval/rougeL", "eval_p0.8/rougeL", "eval/kl_student_teacher", "eval/mass_outside_set")


def sweep_command(algo: str, lrs: list[float], seeds: list[int], out_dir: Path, extra: list[str]) -> list[str]:
    """The multirun command line of one algorithm's sweep."""
    return [
        sys.executable, str(ROOT / "experiments" / "run.py"), "-m", f"algo={algo}",
        f"algo.lr={','.join(f'{lr:g}' for lr in lrs)}", f"seed={','.join(map(str, seeds))}",
        "selection=best", "progress=false", *extra, f"hydra.sweep.dir={out_dir}",
    ]


def collect(out_dir: Path) -> list[dict]:
    """One record per run below ``out_dir``: ``algo``, ``lr``, ``seed``, ``val`` (best validation score), ``best_step``,
    ``final_eval`` and the run folder ``dir``. A run folder with a ``config.yaml`` but no ``metrics.json`` (a
    failed run) gets ``val`` NaN, ``best_step`` None and an empty ``final_eval``.

    Raises:
        ValueError: a run without a ``selection`` result (it was not run with ``selection=best``).
    """
    records = []
    for config_path in sorted(out_dir.rglob("config.yaml")):
        if config_path.parent.name == ".hydra" or (config_path.parent / "metrics.json").exists():
            continue
        # A run folder without metrics.json: the run failed (diverged, crashed); its lr scores NaN. Runs named by
        # their preset, as metrics.json's "algo" is (configs written before presets had a field: the name).
        config = yaml.safe_load(config_path.read_text())
        records.append({
            "algo": config["algo"].get("preset", config["algo"]["name"]), "lr": float(config["algo"]["lr"]), "seed": config["seed"],
            "val": float("nan"), "best_step": None, "final_eval": {}, "dir": str(config_path.parent),
        })
    for path in sorted(out_dir.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if "selection" not in metrics:
            raise ValueError(f"{path} has no 'selection' result: run the sweep with selection=best (or selection.every > 0)")
        records.append({
            "algo": metrics["algo"],
            "lr": float(metrics["config"]["algo"]["lr"]),
            "seed": metrics["seed"],
            "val": float(metrics["selection"]["best_score"]),
            "best_step": metrics["selection"]["best_step"],
            "final_eval": metrics["final_eval"],
            "dir": str(path.parent),
        })
    return records


def pick_lrs(records: list[dict]) -> dict[str, dict]:
    """Per algorithm: ``val_by_lr`` (mean validation score over seeds), the chosen ``lr`` (lowest) and its runs."""
    by_algo: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_algo[record["algo"]][record["lr"]].append(record)
    picks = {}
    for algo, by_lr in sorted(by_algo.items()):
        val_by_lr = {lr: float(np.mean([r["val"] for r in runs])) for lr, runs in sorted(by_lr.items())}
        chosen = min(val_by_lr, key=lambda lr: (np.nan_to_num(val_by_lr[lr], nan=np.inf), lr))
        picks[algo] = {"val_by_lr": val_by_lr, "lr": chosen, "runs": by_lr[chosen]}
    return picks


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.4f} ± {arr.std(ddof=1):.4f}" if arr.size > 1 else f"{arr.mean():.4f}"


def to_markdown(picks: dict[str, dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """The sweep table: validation score per lr, the chosen lr, and the chosen lr's test metrics over seeds."""
    lines = [
        "| algo | validation score by lr (lower is better) | chosen lr | seeds | best step | "
        + " | ".join(metrics) + " |",
        "|---|---|---|---|---|" + "---|" * len(metrics),
    ]
    for algo, pick in picks.items():
        vals = ", ".join(f"{lr:g}: {'failed' if np.isnan(v) else f'{v:.4f}'}" for lr, v in pick["val_by_lr"].items())
        runs = pick["runs"]
        cells = [_mean_std([r["final_eval"][m] for r in runs if m in r["final_eval"]]) for m in metrics]
        steps = ",".join(str(r["best_step"]) for r in sorted(runs, key=lambda r: r["seed"]))
        lines.append(f"| {algo} | {vals} | {pick['lr']:g} | {len(runs)} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="bc,kd,iql_bd", help="comma-separated algorithm names")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated learning rates (every algorithm)")
    parser.add_argument("--lrs-for", action="append", default=[], metavar="ALGO=LR,LR", help="one algorithm's own grid")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--out", default="multirun/lr_sweep", help="output directory")
    parser.add_argument("--summarize-only", action="store_true", help="only read OUT and write the table")
    args = parser.parse_args(own)

    out = Path(args.out)
    if not args.summarize_only:
        grids = {algo: [float(x) for x in args.lrs.split(",")] for algo in args.algos.split(",")}
        for spec in args.lrs_for:
            algo, _, lrs = spec.partition("=")
            if algo not in grids:
                parser.error(f"--lrs-for {spec}: {algo!r} is not in --algos {args.algos}")
            grids[algo] = [float(x) for x in lrs.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        for algo, lrs in grids.items():
            for lr in lrs:
                # One multirun per lr: Hydra stops a multirun at its first failed job, which would skip the rest.
                done = subprocess.run(sweep_command(algo, [lr], seeds, out / algo / f"lr{lr:g}", extra), cwd=ROOT)
                if done.returncode != 0:
                    print(f"warning: {algo} at lr {lr:g} failed (exit {done.returncode}); it scores NaN", file=sys.stderr)
    records = collect(out)
    if not records:
        print(f"error: no metrics.json under {out}", file=sys.stderr)
        return 1
    picks = pick_lrs(records)
    table = to_markdown(picks)
    sys.stdout.write(table)
    (out / "lr_sweep.md").write_text(table)
    chosen = {algo: {"lr": pick["lr"], "runs": sorted(r["dir"] for r in pick["runs"])} for algo, pick in picks.items()}
    (out / "chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
