"""Time-to-quality: validation metrics against training wall-clock, offline vs on-policy, from one SFT warm start.

Usage (the full comparison of issue 10; a reduced one: fewer seeds, ``steps``, a longer ``--val-every-s``)::

    python experiments/time_to_quality.py --seeds 0 1 2 --out runs/ttq \
        --plot docs/time_to_quality.png --markdown runs/ttq/time_to_quality.md
    # each algorithm at the lr a benchmark chose (experiments/benchmark.py's output directory); suite=default's
    # SQIL runs on the teacher's top-0.8 set, which is the label soft_q_sqil_p0.8 here
    python experiments/time_to_quality.py --from-benchmark multirun/benchmark/default \
        --algos bc kd iql_bd minillm gkd soft_q_sqil_p0.8 --seeds 0 1 2 --out runs/ttq_tuned

Without ``--from-benchmark`` every algorithm runs at its preset's lr (``experiments/conf/algo``); with it, at
the lr the benchmark chose for the method whose algorithm config (lr aside) is the label's, on the benchmark's
task (``--benchmark-task`` when it has several); a label no benchmark method matches is an error.

What it does, in one process with the run's thread count (``threads``, default 1):

1. builds the task of the run config (``--set key=value`` overrides, as on ``experiments/run.py``'s command
   line) and generates its teacher data into ``<out>/data`` (timed once: the one-time teacher-data cost,
   kept with the warm start's in ``<out>/costs.json`` for later invocations);
2. trains one SFT warm start (``sft_steps``, seed 0) that every algorithm and seed starts from (skipped when
   every requested run already has its record under ``<out>/runs``, which are reused);
3. for every algorithm and seed: a fresh copy of the warm-started student and of the teacher data, then
   :func:`tokenrl.run.train_loop.train_loop` with ``eval.val_every_s``: every that many seconds of the training
   clock (rollouts, teacher scoring, batch drawing, updates; validation excluded) the student is scored on
   the validation prompts (teacher NLL, teacher-forced KL, on-policy KL, Rouge-L). Records go to
   ``<out>/runs/<algo>_lr<lr>_s<seed>.json``;
4. writes the plot (each metric against the training clock, one line per algorithm: mean over seeds, band
   = min..max over seeds) and a markdown section: seconds to reach 95% of each algorithm's own best and of
   the best of all, the on-policy / offline ratios, seconds per stage, and the one-time costs.

"95% of a best" is 95% of the improvement from the shared warm start to that best, so it reads the same for
metrics where lower is better (NLL, KL) and higher is better (Rouge-L). Each curve is the seed mean of the
step functions "last validation at or before t", on a grid up to the shortest run of that algorithm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algorithms import make_algorithm  # noqa: E402
from tokenrl.run import distributed  # noqa: E402
from tokenrl.data.buffer import ReplayBuffer  # noqa: E402
from tokenrl.run.config import RunConfig, compose_algo, make_run_config  # noqa: E402
from tokenrl.core.divergence import DivergenceGuard  # noqa: E402
from tokenrl.lm.policy import CausalLMPolicy  # noqa: E402
from tokenrl.run.context import RunContext, apply_threads  # noqa: E402
from tokenrl.run.inputs import build_student, build_task, load_data, load_task_corpus  # noqa: E402
from tokenrl.run.train_loop import train_loop  # noqa: E402
from tokenrl.run.trainer import warm_start  # noqa: E402

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
# label -> (algo=<name>: an algorithm or a preset, overrides): the comparison of issue 10; iql_bd as `algo=iql_bd` runs it (the
# fixed default: set-max Q shift, top_p 0.8, LM term); the on-policy baselines in their papers' full-vocabulary form
# (minillm and gkd at their defaults, soft_q with top_p = 1.0).
ALGOS = {
    "bc": ("bc", {}),
    "kd": ("kd", {}),
    "iql_bd": ("iql_bd", {}),
    "minillm": ("minillm", {}),
    "gkd": ("gkd", {}),
    "soft_q_sqil": ("soft_q", {"reward": "sqil", "top_p": 1.0}),
}
# The same on-policy algorithms restricted to the teacher's top-0.8 set (rollouts and losses), on request
# with --algos (not in the default comparison).
TOP_P_ALGOS = {
    "minillm_p0.8": ("minillm", {"top_p": 0.8}),
    "gkd_p0.8": ("gkd", {"top_p": 0.8}),
    "soft_q_sqil_p0.8": ("soft_q", {"reward": "sqil", "top_p": 0.8}),
}
ON_POLICY = ("minillm", "gkd", "soft_q_sqil", *TOP_P_ALGOS)
# (key, label, higher is better)
METRICS = (
    ("val/teacher_nll", "teacher NLL", False),
    ("val/kl_student_teacher", "teacher-forced KL(s‖t)", False),
    ("val/onpolicy_kl", "on-policy KL(s‖t)", False),
    ("val/rougeL", "Rouge-L", True),
)
STAGES = ("time/rollout_s", "time/teacher_score_s", "time/batch_s", "time/update_s")


def copy_buffer(buffer: ReplayBuffer) -> ReplayBuffer:
    """A buffer whose lists are new (rollouts added to it do not reach ``buffer``); arrays are shared, read-only."""
    values = {f.name: getattr(buffer, f.name) for f in dataclasses.fields(buffer)}
    lists = {name: list(v) for name, v in values.items() if isinstance(v, list)}
    return dataclasses.replace(buffer, **lists)


def algo_node(label: str) -> dict:
    """The ``algo`` node of ``label`` as ``experiments/run.py algo=<name>`` composes it, plus its overrides."""
    name, overrides = {**ALGOS, **TOP_P_ALGOS}[label]
    return {**compose_algo(CONF_DIR, name), **overrides}


def algo_config(label: str, lr: float | None = None):
    """The typed ``algo`` node of ``label`` (at ``lr``, else the preset's)."""
    node = algo_node(label)
    return make_run_config({"algo": node if lr is None else {**node, "lr": lr}}).algo


def benchmark_lrs(out: str, labels: list[str], task: str | None = None) -> dict[str, float]:
    """Each label's lr from ``<out>/leaderboard.json`` of ``experiments/benchmark.py``: the chosen lr of the
    method whose algorithm config, lr aside, is the label's.

    Raises:
        ValueError: no leaderboard, several tasks and no ``task``, no matching method (the message lists the
            methods of the same algorithm and the keys where they differ), or a method without a chosen lr.
    """
    path = os.path.join(out, "leaderboard.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: run experiments/benchmark.py with out={out} first")
    with open(path) as f:
        tasks = json.load(f)["tasks"]
    if task is None and len(tasks) != 1:
        raise ValueError(f"{path} has tasks {sorted(tasks)}: choose one with --benchmark-task")
    task = task if task is not None else next(iter(tasks))
    if task not in tasks:
        raise ValueError(f"{path} has no task {task!r}; it has {sorted(tasks)}")
    methods = tasks[task]["methods"]
    lrs = {}
    for label in labels:
        wanted = json.loads(json.dumps(dataclasses.asdict(algo_config(label))))
        wanted.pop("lr")
        matches = [name for name, info in methods.items() if info["algo"] == wanted]
        if not matches:
            near = {name: sorted(k for k in set(info["algo"]) | set(wanted) if info["algo"].get(k) != wanted.get(k))
                    for name, info in methods.items() if info["algo"]["name"] == wanted["name"]}
            raise ValueError(f"no method of {path} (task {task}) runs {label}'s algorithm config; methods of "
                             f"algo={wanted['name']} there and the keys where they differ: {near or 'none'}")
        chosen = methods[matches[0]]["chosen_lr"]
        if chosen is None:
            raise ValueError(f"{matches[0]} in {path} has no chosen lr yet (runs pending, or every lr failed)")
        lrs[label] = chosen
    return lrs


def base_config(overrides: list[str]) -> RunConfig:
    """The run config every algorithm shares (``algo`` is replaced per run)."""
    defaults = {"algo": {"name": "bc"}, "sft_steps": 500, "steps": 1000, "batch_size": 32, "progress": False}
    return make_run_config(OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.from_dotlist(overrides)))


def run_all(args: argparse.Namespace, lrs: dict[str, float]) -> dict:
    """Steps 1-3 of the module docstring at ``lrs`` (label -> lr; the preset's where absent); returns
    ``{"costs": ..., "lrs": {label: lr}, "runs": {label: [records per seed]}}``."""
    cfg = base_config([*args.set, f"data_dir={os.path.join(args.out, 'data')}", f"eval.val_every_s={args.val_every_s}"])
    algos = {label: algo_config(label, lrs.get(label)) for label in args.algos}
    apply_threads(cfg.threads)
    task = build_task(cfg)
    # One-time costs, kept for later invocations that reuse the data and the finished runs.
    cost_path = os.path.join(args.out, "costs.json")
    costs = {}
    if os.path.exists(cost_path):
        with open(cost_path) as f:
            costs = json.load(f)
    start = time.perf_counter()
    buffer, _, cached = load_data(cfg, task)
    if not cached or "teacher_data_s" not in costs:
        costs.update({"teacher_data_s": time.perf_counter() - start, "cached": cached})

    def record_path(label: str, seed: int) -> str:
        return os.path.join(args.out, "runs", f"{label}_lr{algos[label].lr:g}_s{seed}.json")

    warm_state = None
    if any(not os.path.exists(record_path(label, seed)) for label in args.algos for seed in args.seeds):
        model = build_student(cfg.model, task, 0, cfg.device)
        ctx = _context(cfg, args.out, "sft", task, buffer, model, seed=0)
        warm_start(ctx)
        costs["sft_s"] = ctx.timings.get("sft_s", 0.0)
        warm_state = {k: v.clone() for k, v in model.state_dict().items()}
    with open(cost_path, "w") as f:
        json.dump(costs, f)

    runs: dict[str, list[list[dict]]] = {}
    for label in args.algos:
        for seed in args.seeds:
            path = record_path(label, seed)
            if not os.path.exists(path):
                run_cfg = dataclasses.replace(cfg, seed=seed, algo=algos[label])
                student = build_student(cfg.model, task, seed, cfg.device)
                student.load_state_dict(warm_state)
                run_ctx = _context(run_cfg, args.out, f"{label}_s{seed}", task, copy_buffer(buffer), student, seed)
                algo = make_algorithm(
                    run_cfg.algo_name, run_ctx.policy, run_cfg.algo_config(), total_steps=run_cfg.steps
                )
                if algo.needs_lm_batch:  # MiniLLM's PT loss: a batch of the task's corpus with every batch
                    run_ctx.corpus, _ = load_task_corpus(run_cfg, task)
                torch.manual_seed(seed)
                train_loop(run_ctx, algo, 0)
                run_ctx.writer.close()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(run_ctx.results["validation"], f)
                clock_s = run_ctx.results["validation"][-1]["train_clock_s"]
                print(f"{label} seed {seed}: {clock_s:.1f} s training clock", flush=True)
            with open(path) as f:
                runs.setdefault(label, []).append(json.load(f))
    return {"costs": costs, "lrs": {label: algo.lr for label, algo in algos.items()}, "runs": runs}


def _context(cfg: RunConfig, out: str, name: str, task, buffer, model, seed: int) -> RunContext:
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size)
    return RunContext(
        cfg=cfg, out_dir=os.path.join(out, "runs"), task=task, buffer=buffer, model=model, policy=policy,
        generator=torch.Generator().manual_seed(seed), writer=SummaryWriter(os.path.join(out, "tb", name)),
        results={}, timings={}, data_dir=os.path.join(out, "data"), guard=DivergenceGuard(cfg.divergence_factor),
        loss_fn=distributed.LossForward(policy),  # one process: the loss is called unwrapped
    )


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------
def mean_curve(
    records_per_seed: list[list[dict]], key: str, n_grid: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(t, mean, lo, hi)``: the seeds' step functions on a common grid up to the shortest run's clock."""
    t_end = min(r[-1]["train_clock_s"] for r in records_per_seed)
    grid = np.linspace(0.0, t_end, n_grid)
    values = []
    for records in records_per_seed:
        clocks = np.array([r["train_clock_s"] for r in records])
        vals = np.array([r[key] for r in records])
        values.append(vals[np.searchsorted(clocks, grid, side="right") - 1])
    values = np.array(values)
    return grid, values.mean(0), values.min(0), values.max(0)


def seconds_to_reach(t: np.ndarray, curve: np.ndarray, start: float, target: float, higher: bool) -> float:
    """First ``t`` where the curve has made 95% of the way from ``start`` to ``target`` (NaN if never)."""
    threshold = start + 0.95 * (target - start)
    reached = curve >= threshold if higher else curve <= threshold
    return float(t[np.argmax(reached)]) if reached.any() else float("nan")


def analyse(data: dict) -> dict:
    """Curves, best values and times to 95% per metric and algorithm."""
    out: dict = {}
    for key, _, higher in METRICS:
        curves = {label: mean_curve(recs, key) for label, recs in data["runs"].items()}
        start = float(np.mean([recs[0][key] for recs_all in data["runs"].values() for recs in recs_all]))
        best = {label: (c[1].max() if higher else c[1].min()) for label, c in curves.items()}
        best_all = max(best.values()) if higher else min(best.values())
        # A curve that never improves on the warm start has no time to its best (NaN, "no gain"); the start is
        # a mean over runs, so "improves" means by more than float rounding.
        tol = 1e-9 * max(1.0, abs(start))
        gained = {label: (b > start + tol) if higher else (b < start - tol) for label, b in best.items()}
        out[key] = {
            label: {
                "curve": c, "start": start, "best": float(best[label]), "gained": bool(gained[label]),
                "t95_own": seconds_to_reach(c[0], c[1], start, best[label], higher) if gained[label] else float("nan"),
                "t95_all": seconds_to_reach(c[0], c[1], start, best_all, higher) if gained[label] else float("nan"),
            }
            for label, c in curves.items()
        }
    return out


def plot(data: dict, analysis: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (key, label, _) in zip(axes, METRICS):
        for algo, res in analysis[key].items():
            t, mean, lo, hi = res["curve"]
            line, = ax.plot(t, mean, label=algo, ls="--" if algo in ON_POLICY else "-")
            ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    n_seeds = max(len(r) for r in data["runs"].values())
    fig.suptitle(f"validation metrics vs training clock (mean, band = min..max over {n_seeds} seed(s))", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(data: dict, analysis: dict, command: str) -> str:
    """The RESULTS.md section body (tables only; the caller adds the heading and the reading)."""
    fmt = lambda x: "not reached" if np.isnan(x) else f"{x:.1f}"  # noqa: E731
    labels = list(data["runs"])
    lines = [f"Command: `{command}`", "", "lr: " + ", ".join(f"{label} {lr:g}" for label, lr in data["lrs"].items()), ""]
    lines.append(
        "Best validation value, then seconds of training clock (validation excluded) to make 95% of the way "
        "from the shared SFT warm start to the algorithm's own best (own) and to the best of all algorithms "
        "(all); mean curve over seeds. \"no gain\": the curve never improved on the warm start (its best is "
        "the start value)."
    )
    lines.append("")
    header = "| algo | " + " | ".join(f"{m[1]}: best / own / all" for m in METRICS) + " |"
    lines += [header, "|---" * (len(METRICS) + 1) + "|"]
    for label in labels:
        results = [analysis[k][label] for k, _, _ in METRICS]
        cells = [
            f"{r['best']:.3f} / " + (f"{fmt(r['t95_own'])} / {fmt(r['t95_all'])}" if r["gained"] else "no gain")
            for r in results
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Training clock per run and its stages (seconds, mean over seeds; steps per second of clock):", ""]
    stage_names = " | ".join(s.split("/")[1] for s in STAGES)
    lines += [f"| algo | steps | clock | {stage_names} | steps/s |", "|---" * (len(STAGES) + 4) + "|"]
    for label in labels:
        finals = [recs[-1] for recs in data["runs"][label]]
        clock = np.mean([f["train_clock_s"] for f in finals])
        steps = np.mean([f["step"] for f in finals])
        stages = " | ".join(f"{np.mean([f.get(s, 0.0) for f in finals]):.1f}" for s in STAGES)
        lines.append(f"| {label} | {steps:.0f} | {clock:.1f} | {stages} | {steps / clock:.1f} |")
    offline = [lab for lab in labels if lab not in ON_POLICY]
    online = [lab for lab in labels if lab in ON_POLICY]
    if offline and online:
        lines += [
            "",
            "On-policy / offline ratio of the seconds to 95% of the own best (>1: the offline algorithm is "
            "faster; n/a: one of the two never improved on the warm start):",
            "",
            "| on-policy | offline | " + " | ".join(m[1] for m in METRICS) + " |",
            "|---" * (len(METRICS) + 2) + "|",
        ]
        for on in online:
            for off in offline:
                ratios = [_ratio(analysis[k][on]["t95_own"], analysis[k][off]["t95_own"]) for k, _, _ in METRICS]
                cells = ["n/a" if not np.isfinite(r) else f"{r:.2f}" for r in ratios]
                lines.append(f"| {on} | {off} | " + " | ".join(cells) + " |")
    costs = data["costs"]
    lines += [
        "",
        f"One-time costs, outside every clock above: teacher data {costs['teacher_data_s']:.1f} s"
        f"{' (cached when timed)' if costs.get('cached') else ''}, "
        f"SFT warm start {costs['sft_s']:.1f} s (shared by all).",
    ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN when undefined (a time not reached, or 0 s: already there at the warm start)."""
    return a / b if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0 else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=[*ALGOS, *TOP_P_ALGOS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-every-s", type=float, default=10.0, help="validation every n seconds of training clock")
    parser.add_argument(
        "--set", nargs="*", default=[], help="run-config overrides, e.g. steps=300 task.max_new_tokens=16"
    )
    parser.add_argument("--out", default="runs/ttq", help="data, per-run records and TensorBoard logs")
    parser.add_argument("--plot", default="docs/time_to_quality.png")
    parser.add_argument("--markdown", default=None, help="write the section here (default <out>/time_to_quality.md)")
    parser.add_argument("--from-benchmark", metavar="OUT", help="each algorithm at the lr experiments/benchmark.py chose in OUT")
    parser.add_argument("--benchmark-task", help="the benchmark task whose lrs to take (default: its only task)")
    args = parser.parse_args(argv)
    try:
        lrs = benchmark_lrs(args.from_benchmark, args.algos, args.benchmark_task) if args.from_benchmark else {}
    except ValueError as err:
        parser.error(str(err))
    os.makedirs(args.out, exist_ok=True)
    data = run_all(args, lrs)
    analysis = analyse(data)
    plot(data, analysis, args.plot)
    command = "python experiments/time_to_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(data, analysis, command)
    with open(args.markdown or os.path.join(args.out, "time_to_quality.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
