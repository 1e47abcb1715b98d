"""The fair comparison of the zoo in one resumable command: every method at its best lr, several seeds, intervals.

    python experiments/benchmark.py suite=default                  # every method on the default synthetic task
    python experiments/benchmark.py suite=synthetic_lm --dry-run   # the grid, what is finished, the estimated cost
    python experiments/benchmark.py suite=default hydra.launcher.n_jobs=4
    python experiments/benchmark.py suite=default hydra/launcher=submitit_slurm hydra.launcher.partition=P

A suite (``experiments/conf/suite/<name>.yaml``, schema :class:`SuiteConfig`) declares tasks, methods (an
``algo=<name>`` preset, fixed overrides and an lr grid), training seeds and the shared protocol. The command

1. **expands** methods x lrs x seeds x tasks into runs. A run is its override list (protocol, task, method,
   ``algo.lr``, ``seed``), composed against ``experiments/conf`` exactly as ``experiments/run.py`` would; its
   id is a hash of that list (without the keys that only say how a run executes: ``threads``, ``progress``,
   ...) and its directory ``OUT/<task>/<method>/lr<lr>/s<seed>``, where ``run.json`` records the id, the
   overrides and the resolved config;
2. **skips** runs that are finished and verified (``metrics.json`` parses, holds the same resolved config and
   ``train.steps == steps``) or failed (``error.txt``, e.g. the divergence guard; ``retry_failed=true`` reruns
   them); a directory holding another config is an error that names it, never overwritten;
3. **launches** the rest through Hydra's launcher plugins: it writes them to ``OUT/plan.json`` and starts a
   Hydra multirun of this script sweeping ``run`` over the pending runs' directories, so each job trains one
   run (:func:`run_job`, calling :func:`tokenrl.run.trainer.run` in that directory). The default launcher,
   ``hydra/launcher=joblib_local`` (Hydra's joblib launcher, ``hydra.launcher.n_jobs=2``), runs them in local
   worker processes; ``submitit_slurm`` (``pip install -e ".[slurm]"``) as cluster jobs. An interrupted run resumes
   in its directory from its newest checkpoint (``resume=true``; the checkpoint holds the best validated weights so
   far, ``selection.every``; one killed during its SFT warm start resumes from the SFT's checkpoint), a failed one
   retried starts again.
   The first run of each seed goes alone in a first wave, so that the SFT start it caches is not trained
   twice by runs side by side (``sft_first=false``: all at once);
4. **chooses** each method's lr: the best mean validation score over seeds (``selection.best_score``, lower is
   better; an lr with a failed seed is out, also a seed outside ``lr_seeds`` that failed at an lr chosen
   earlier: the next best is chosen and the other seeds run at it); a choice at either edge of the grid adds one point beyond it (the grid's log spacing, two
   significant digits) and runs it, at most ``max_grid_extensions`` times per method, until the choice is
   strictly inside. A grid where no lr improves on the start (the best validated step is 0 at every lr and
   seed: every lr tried only makes the student worse) is *flat*: it still extends downwards (a smaller lr may
   yet improve), and when its extensions are used up the leaderboard says "flat" rather than "edge": there is
   no optimum to bracket, the row holds the start's weights;
5. **writes** ``OUT/leaderboard.md`` and ``OUT/leaderboard.json``: per task, each method at its chosen lr (mean
   and 95% t-interval over seeds, :mod:`tokenrl.evaluation.stats`), the paired per-seed difference to the
   reference method (``kd``), the teacher and the SFT start(s), a plot per task and the lr grids.

Killing the command (SIGTERM, SIGINT or SIGKILL) and rerunning it redoes no finished run: on a signal the
launched jobs stop after their current update (the trainer checkpoints), no queued job starts (an interrupted
launcher worker ends; a job whose multirun has stopped does not start), and on Linux the jobs of a killed
command get SIGTERM as well; a job waits for a lock on its run directory (``flock``: a local file system), so
two commands never train into one. Cluster jobs already submitted are not cancelled by a signal to the command.
``--dry-run`` (``dry_run=true``) prints the grid, its state and the estimated cost, and runs nothing.
``--report`` (``report=true``) writes the leaderboard of the runs finished so far and runs nothing: each grid as
far as it got (a choice at an edge whose extension has not run yet stays at the edge: a provisional choice), rows
with the seeds that finished (n says how many), and the runs a rerun would still do counted in its header.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling report.py (tables and plots)

import report  # noqa: E402
from tokenrl.evaluation.stats import Interval, paired_difference, t_interval  # noqa: E402

# tokenrl's run modules (torch, transformers: seconds of start-up) are imported inside the functions that use
# them: the launched multirun's driver process only composes this script's own config and dispatches jobs.

SCRIPT = os.path.abspath(__file__)
CONF_DIR = os.path.join(os.path.dirname(SCRIPT), "conf")  # the runs' configs: experiments/run.py's
RUN_FILE, ERROR_FILE, LOG_FILE, LOCK_FILE, PLAN_FILE = "run.json", "error.txt", "run.log", ".lock", "plan.json"
HYDRA_FILES = {".hydra", "benchmark.log", LOCK_FILE}  # what Hydra and the lock put in a run directory first
LEADERBOARD_METRICS = (
    ("eval/kl_student_teacher", "KL(s‖t)"),
    ("eval/kl_teacher_student", "KL(t‖s)"),
    ("eval/onpolicy_kl", "on-policy KL(s‖t)"),
    ("eval/teacher_nll", "teacher NLL @1.0"),
    ("eval/response_len", "resp. len @1.0"),
    ("eval/rougeL", "Rouge-L @1.0"),
    ("eval_p0.8/teacher_nll", "teacher NLL @0.8"),
    ("eval_p0.8/response_len", "resp. len @0.8"),
    ("eval/mass_outside_set", "mass outside set"),
)
"""The leaderboard's metrics, in the plot's panel order (3 per line): the KLs, then each decoding's teacher NLL
beside its response length."""
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@functools.cache
def execution_keys() -> frozenset[str]:
    """Run-config keys that say how a run executes, not what it computes: outside a run's id and config check
    (the keys a resumed run may change, :data:`tokenrl.run.checkpoint.RESUME_MAY_CHANGE`, but ``steps``; and
    ``data_dir``, where the shared data lives)."""
    from tokenrl.run.checkpoint import RESUME_MAY_CHANGE

    return frozenset((RESUME_MAY_CHANGE - {"steps"}) | {"data_dir"})


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` atomically (:func:`tokenrl.data.buffer.write_json_atomic`)."""
    from tokenrl.data.buffer import write_json_atomic

    write_json_atomic(str(path), obj)


class BenchmarkError(RuntimeError):
    """A suite, a run directory or a launch the benchmark cannot go on with; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """One method of a suite: a preset of ``experiments/conf/algo`` with fixed overrides, and its lr grid."""

    algo: str = MISSING  # the preset, as in `experiments/run.py algo=<name>`
    lrs: list[float] = MISSING  # the initial lr grid, increasing (log-spaced; extended at an edge)
    overrides: list[str] = field(default_factory=list)  # e.g. [algo.reward=sqil]


@dataclass
class TaskSpec:
    """One task of a suite."""

    overrides: list[str] = field(default_factory=list)  # e.g. [task=synthetic_lm, model=small_lm]
    seconds_per_run: float = 240.0  # the cost estimate's seconds per run before any run of the task finished


@dataclass
class SuiteConfig:
    """What a benchmark compares and under which protocol (``experiments/conf/suite/<name>.yaml``)."""

    name: str = MISSING
    tasks: dict[str, TaskSpec] = MISSING  # task label -> its overrides
    methods: dict[str, MethodSpec] = MISSING  # method label -> preset, overrides, lr grid
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds (same seed = same SFT start)
    # The seeds the lr grid runs on (None: every seed); the other seeds run at each method's chosen lr only, once its
    # grid is settled. A budget rule for expensive tasks, applied to every method alike; the leaderboard says so.
    lr_seeds: list[int] | None = None
    protocol: list[str] = field(default_factory=list)  # overrides of every run (before the task's and method's)
    selection_metric: str = "kl_student_teacher"  # selection.metric: the validation score that picks lrs and checkpoints
    max_grid_extensions: int = 2  # lr points a method's grid may gain beyond its edges
    reference: str | None = "kd"  # the method every other one is compared with seed by seed (None: no comparison)


@dataclass
class BenchmarkConfig:
    """Top level of ``experiments/benchmark.py`` (``experiments/conf/benchmark.yaml``)."""

    suite: SuiteConfig = MISSING
    out: str = MISSING  # output directory: one folder per run, the plan, the leaderboard
    dry_run: bool = False  # print the grid, its state and the estimated cost; run nothing (also --dry-run)
    report: bool = False  # write the leaderboard of the finished runs; run nothing (also --report)
    retry_failed: bool = False  # rerun failed runs (error.txt) instead of reporting them
    sft_first: bool = True  # launch one run per new seed first (it caches the SFT start), then the rest
    run: str | None = None  # set by the launched multirun: the run (its folder under out) this job trains


def register_benchmark_configs() -> None:
    """Put the benchmark's schema in Hydra's ConfigStore (the runs' schemas: :func:`resolved_run_config`)."""
    ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


# --------------------------------------------------------------------------------------------------
# Expansion: suite -> runs
# --------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One run of the grid.

    Attributes:
        task: task label.
        method: method label.
        lr: ``algo.lr``.
        seed: training seed.
        overrides: the override list that defines the run (as on ``experiments/run.py``'s command line).
        config: the resolved run config (``dataclasses.asdict`` of its :class:`~tokenrl.run.config.RunConfig`).
    """

    task: str
    method: str
    lr: float
    seed: int
    overrides: list[str]
    config: dict[str, Any]

    @property
    def key(self) -> str:
        """The run's directory under the output directory (and the launched sweep's value)."""
        return run_key(self.task, self.method, self.lr, self.seed)

    @property
    def id(self) -> str:
        """A hash of the overrides that define the result (order and execution-only keys aside)."""
        defining = sorted(o for o in self.overrides if _override_key(o) not in execution_keys())
        return hashlib.sha1(json.dumps(defining).encode()).hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """What ``run.json`` holds (and a plan entry)."""
        return {"id": self.id, **dataclasses.asdict(self)}


def run_key(task: str, method: str, lr: float, seed: int) -> str:
    """A run's directory under the output directory: ``<task>/<method>/lr<lr>/s<seed>``."""
    return f"{task}/{method}/lr{lr:g}/s{seed}"


def _override_key(override: str) -> str:
    """The top-level config key an override sets (``algo.lr=1e-3`` -> ``algo``, ``+threads=2`` -> ``threads``)."""
    return override.split("=", 1)[0].lstrip("+~").split(".")[0]


def run_overrides(suite: SuiteConfig, task: str, method: str, lr: float, seed: int) -> list[str]:
    """Protocol, task, method, lr and seed overrides, later ones replacing earlier ones with the same key."""
    spec = suite.methods[method]
    ordered = [
        *suite.protocol, f"selection.metric={suite.selection_metric}", *suite.tasks[task].overrides,
        f"algo={spec.algo}", *spec.overrides, f"algo.lr={lr!r}", f"seed={seed}",
    ]
    merged: dict[str, str] = {}
    for override in ordered:
        key = override.split("=", 1)[0]
        merged.pop(key, None)  # keep the last value at its own position
        merged[key] = override
    return list(merged.values())


def check_suite(suite: SuiteConfig) -> None:
    """Refuse what the expansion cannot name or choose from, before anything runs.

    Raises:
        BenchmarkError: naming the suite key and the fix.
    """
    problems = []
    for kind, labels in (("tasks", suite.tasks), ("methods", suite.methods)):
        if not labels:
            problems.append(f"suite.{kind} is empty")
        problems += [
            f"suite.{kind}.{label}: a label may hold only letters, digits, '_', '.' and '-' (it names a folder)"
            for label in labels if not _NAME.match(label)
        ]
    for label, spec in suite.methods.items():
        if not spec.lrs or any(lr <= 0 for lr in spec.lrs) or sorted(set(spec.lrs)) != list(spec.lrs):
            problems.append(f"suite.methods.{label}.lrs must be positive and strictly increasing, got {list(spec.lrs)}")
    if not suite.seeds or len(set(suite.seeds)) != len(suite.seeds):
        problems.append(f"suite.seeds must be distinct and non-empty, got {list(suite.seeds)}")
    if suite.lr_seeds is not None and (not suite.lr_seeds or not set(suite.lr_seeds) <= set(suite.seeds)):
        problems.append(f"suite.lr_seeds must be a non-empty subset of suite.seeds {list(suite.seeds)}, got "
                        f"{list(suite.lr_seeds)}; or null for every seed")
    if suite.reference is not None and suite.reference not in suite.methods:
        problems.append(f"suite.reference={suite.reference!r} is not a method of the suite ({', '.join(suite.methods)}); "
                        "name one or set it to null")
    if suite.max_grid_extensions < 0:
        problems.append(f"suite.max_grid_extensions must be >= 0, got {suite.max_grid_extensions}")
    if problems:
        raise BenchmarkError(f"suite {suite.name!r}:\n  " + "\n  ".join(problems))


VALUE_KEYS = ("algo.lr", "seed")
"""Overrides that set one plain value: merged into the composed (unresolved) config of the other overrides, which
Hydra composes once per task and method instead of once per run; the result is the same."""


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    from tokenrl.run.config import compose_config

    return compose_config(CONF_DIR, overrides)


@functools.lru_cache(maxsize=None)
def _resolved(overrides: tuple[str, ...]) -> str:
    from tokenrl.run.config import make_run_config

    values = [o for o in overrides if o.split("=", 1)[0] in VALUE_KEYS]
    cfg = OmegaConf.merge(_compose(tuple(o for o in overrides if o not in values)), OmegaConf.from_dotlist(values))
    return json.dumps(dataclasses.asdict(make_run_config(cfg)))


def resolved_run_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved run config of ``experiments/run.py <overrides>`` (:func:`tokenrl.run.config.compose_config`).

    Each override list is composed once per process (the grid's rounds expand the same runs again).

    Raises:
        hydra.errors.ConfigCompositionException, omegaconf errors: an unknown key or value, named.
    """
    return json.loads(_resolved(tuple(overrides)))


def lr_seeds(suite: SuiteConfig) -> list[int]:
    """The seeds every lr of a grid runs on (``suite.lr_seeds``, by default every seed)."""
    return list(suite.seeds if suite.lr_seeds is None else suite.lr_seeds)


def expand(
    suite: SuiteConfig, grids: dict[tuple[str, str], list[float]], chosen: dict[tuple[str, str], float] | None = None
) -> list[RunSpec]:
    """Every run of the grids, task by task, method by method, lr by lr, seed innermost: each lr on the
    :func:`lr_seeds`, and for each (task, method) in ``chosen`` its chosen lr on the other seeds.

    Raises:
        BenchmarkError: a run does not compose (the error names the key), or the protocol does not validate the
            algorithm (no ``selection.every``), so no lr can be chosen.
    """
    runs = []
    grid_seeds, chosen = lr_seeds(suite), chosen or {}
    for task in suite.tasks:
        for method in suite.methods:
            cells = [(lr, seed) for lr in grids[task, method] for seed in grid_seeds]
            if (task, method) in chosen:
                cells += [(chosen[task, method], seed) for seed in suite.seeds if seed not in grid_seeds]
            for lr, seed in cells:
                overrides = run_overrides(suite, task, method, lr, seed)
                try:
                    config = resolved_run_config(overrides)
                except Exception as err:  # noqa: BLE001 - Hydra's and the schemas' errors name the key
                    raise BenchmarkError(f"suite {suite.name!r}: the runs of {task}/{method} do not compose: "
                                         f"{type(err).__name__}: {err}") from err
                runs.append(RunSpec(task, method, lr, seed, overrides, config))
    unvalidated = sorted({f"{r.task}/{r.method}" for r in runs if not r.config["selection"]["every"]})
    if unvalidated:
        raise BenchmarkError(
            f"suite {suite.name!r}: {', '.join(unvalidated)} would run without validation (selection.every=0), so "
            "there is no score to choose an lr by; add selection=best (or selection.every=N) to suite.protocol"
        )
    return runs


def failures_elsewhere(suite: SuiteConfig, grids: dict[tuple[str, str], list[float]], out: Path,
                       planned: set[str]) -> list[RunSpec]:
    """The runs, not in ``planned``, of the seeds outside :func:`lr_seeds` at an lr of the grids whose directory
    holds an ``error.txt``: a seed that failed at an lr chosen earlier. They join the plan (the leaderboard lists
    them; ``retry_failed`` reruns them) and rule their lr out (:attr:`Grid.chosen`)."""
    found = []
    grid_seeds = lr_seeds(suite)
    for (task, method), lrs in grids.items():
        for lr in lrs:
            for seed in suite.seeds:
                key = run_key(task, method, lr, seed)
                if seed in grid_seeds or key in planned or not (out / key / ERROR_FILE).exists():
                    continue
                overrides = run_overrides(suite, task, method, lr, seed)
                found.append(RunSpec(task, method, lr, seed, overrides, resolved_run_config(overrides)))
    return found


# --------------------------------------------------------------------------------------------------
# The state of a run directory
# --------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What a run directory holds.

    Attributes:
        kind: ``finished`` (verified metrics), ``failed`` (``error.txt``), ``pending`` or ``conflict`` (the
            directory holds something else).
        detail: the conflict, or the error's last line.
        metrics: the verified ``metrics.json`` of a finished run.
    """

    kind: str
    detail: str = ""
    metrics: dict[str, Any] | None = None


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without :func:`execution_keys`: what must match for two runs to be the same."""
    return {key: value for key, value in config.items() if key not in execution_keys()}


def config_differences(stored: dict[str, Any], wanted: dict[str, Any], limit: int = 5) -> list[str]:
    """``key: stored -> wanted`` for each differing key of the result configs (dotted keys, at most ``limit``)."""
    a, b = report.flatten(result_config(stored)), report.flatten(result_config(wanted))
    diffs = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def verified(metrics: Any, spec: RunSpec) -> bool:
    """``metrics`` (a parsed ``metrics.json``) is the finished result of ``spec``."""
    return (
        isinstance(metrics, dict)
        and isinstance(metrics.get("config"), dict)
        and not config_differences(metrics["config"], spec.config)
        and (metrics.get("train") or {}).get("steps") == spec.config["steps"]
        and isinstance(metrics.get("final_eval"), dict)
        and isinstance((metrics.get("selection") or {}).get("best_score"), (int, float))
    )


def inspect_run(spec: RunSpec, out: Path, retry_failed: bool = False) -> RunState:
    """The state of ``spec``'s directory under ``out`` (see :class:`RunState`)."""
    run_dir = out / spec.key
    if not run_dir.is_dir():
        return RunState("pending")
    record_path = run_dir / RUN_FILE
    if not record_path.exists():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in HYDRA_FILES)
        if foreign:
            return RunState("conflict", f"{run_dir} holds {', '.join(foreign[:5])} but no {RUN_FILE}: not a run of "
                                        "this benchmark; move it away or choose another out=")
        return RunState("pending")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        return RunState("conflict", f"{record_path} is unreadable ({err}); remove {run_dir} to rerun the run")
    differences = config_differences(record.get("config") or {}, spec.config)
    if record.get("id") != spec.id or differences:
        what = "; ".join(differences) or f"overrides {record.get('overrides')} -> {spec.overrides}"
        return RunState("conflict", f"{run_dir} holds a run of another config ({what}); remove it to rerun with "
                                    "the suite's config, or choose another out=")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            metrics = None
        if verified(metrics, spec):
            return RunState("finished", metrics=metrics)
    error_path = run_dir / ERROR_FILE
    if error_path.exists() and not retry_failed:
        lines = error_path.read_text().strip().splitlines()
        return RunState("failed", lines[-1] if lines else "failed")
    return RunState("pending")


def run_seconds(metrics: dict[str, Any]) -> float:
    """A finished run's seconds: the sum of its stages' timings (``train``'s ``*_s``, start-up excluded)."""
    return float(sum(v for k, v in metrics["train"].items() if k.endswith("_s") and "/" not in k))


# --------------------------------------------------------------------------------------------------
# The lr rule
# --------------------------------------------------------------------------------------------------
def mean_scores(scores: dict[float, list[float | None]]) -> dict[float, float | None]:
    """lr -> mean validation score over seeds; NaN if a seed failed (NaN), None while a seed is pending (None)."""
    means = {}
    for lr, values in scores.items():
        if any(v is None for v in values):
            means[lr] = None
        else:
            means[lr] = math.fsum(values) / len(values) if not any(math.isnan(v) for v in values) else math.nan
    return means


def choose_lr(scores: dict[float, list[float | None]]) -> float | None:
    """The lr with the lowest mean validation score over seeds (ties: the smaller lr).

    Args:
        scores: lr -> one score per seed: the run's ``selection.best_score``, NaN for a failed run, None for a
            pending one.

    Returns:
        None while any run is pending or when every lr has a failed seed.
    """
    means = mean_scores(scores)
    if any(m is None for m in means.values()):
        return None
    finite = [lr for lr, m in means.items() if not math.isnan(m)]
    return min(finite, key=lambda lr: (means[lr], lr)) if finite else None


def grid_step(grid: list[float]) -> float:
    """The grid's log spacing: the ratio between neighbours of an evenly log-spaced grid with its ends."""
    return (grid[-1] / grid[0]) ** (1.0 / (len(grid) - 1))


def extend_grid(grid: list[float], chosen: float | None) -> list[float]:
    """The lr to add when ``chosen`` sits at an edge of ``grid``: one more point beyond it at the grid's log
    spacing, to two significant digits (1e-4, 3e-4, 1e-3 -> 3.2e-5 below, 3.2e-3 above); [] when ``chosen`` is
    strictly inside, None, or the grid has one point (nothing to space by)."""
    if chosen is None or len(grid) < 2 or grid[0] < chosen < grid[-1]:
        return []
    step = grid_step(grid)
    beyond = grid[0] / step if chosen == grid[0] else grid[-1] * step
    return [float(f"{beyond:.2g}")]


# --------------------------------------------------------------------------------------------------
# Launching through Hydra's launcher
# --------------------------------------------------------------------------------------------------
def sft_waves(pending: list[RunSpec], states: dict[str, RunState], runs: list[RunSpec]) -> list[list[RunSpec]]:
    """``pending`` in waves: first one run of each (task, seed) with no finished run yet (it trains and caches
    that seed's SFT start), then the rest, which load it instead of training it side by side."""
    started = {(r.task, r.seed) for r in runs if states[r.key].kind == "finished"}
    first: dict[tuple[str, int], RunSpec] = {}
    for run in pending:
        if (run.task, run.seed) not in started:
            first.setdefault((run.task, run.seed), run)
    firsts = {run.key for run in first.values()}
    rest = [run for run in pending if run.key not in firsts]
    return [wave for wave in (list(first.values()), rest) if wave] if first and rest else [pending]


def _libc() -> ctypes.CDLL | None:
    """The C library where it has ``prctl`` (Linux), loaded before forking (not between fork and exec)."""
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "prctl") else None
    return None


def _child_setup(parent: int, libc: ctypes.CDLL | None) -> None:
    """In the launched multirun, before exec: its own process group (its workers join it) and, on Linux,
    SIGTERM when this command dies, even by SIGKILL."""
    os.setsid()
    if libc is not None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the command died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


MULTIRUN_ENV = "TOKENRL_BENCHMARK_MULTIRUN"  # "host:pid" of the launched multirun, for its jobs (set in cli)


def _local_multirun() -> int | None:
    """The pid of the launched multirun when this process is one of its local jobs (the multirun itself or a
    worker of a local launcher: same host, its process group); None elsewhere (a cluster job, a test)."""
    host, _, pid = os.environ.get(MULTIRUN_ENV, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname() or os.getpgrp() != int(pid):
        return None
    return int(pid)


def _launcher_gone() -> str | None:
    """Why a job must not start: the local multirun it belongs to has stopped (a launcher worker still holding
    jobs queued before the signal); None when it may start."""
    launcher = _local_multirun()
    if launcher is not None and launcher not in (os.getpid(), os.getppid()):
        return f"the multirun that launched it (pid {launcher}) has stopped"
    return None


def _end_job_process() -> None:
    """After an interruption in a local launcher worker (not the multirun itself): end the worker by SIGTERM, as
    the signal's default would have, instead of letting it take its next queued job."""
    launcher = _local_multirun()
    if launcher is not None and launcher != os.getpid():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_group_on_sigterm() -> None:
    """In the launched multirun (a process-group leader): a SIGTERM stops every job of the group too (each
    trainer checkpoints after its current update), then the multirun itself."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)


def launch(wave: list[RunSpec], out: Path, forward: list[str]) -> int:
    """Run ``wave`` as one Hydra multirun of this script over ``run`` (the launcher of ``forward``); its exit code.

    A SIGTERM or SIGINT to this command goes to the multirun's process group as SIGTERM; the command then waits
    for it and exits with the signal's status.
    """
    cmd = [sys.executable, SCRIPT, "-m", *forward, f"out={out}", "run=" + ",".join(r.key for r in wave)]
    print(f"launching {len(wave)} run(s): {' '.join(cmd[1:3])} ... run=<{len(wave)} runs>", flush=True)
    env = dict(os.environ, TOKENRL_BENCHMARK_LAUNCH="1")
    received: list[int] = []
    parent, libc = os.getpid(), _libc()
    child = subprocess.Popen(cmd, env=env, preexec_fn=lambda: _child_setup(parent, libc))

    def forward_signal(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"interrupted by signal {received[0]}: the runs stopped after their current update; rerun the same "
              "command to continue", file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0])
    return code


def say(line: str) -> None:
    """Print one line of a job in one write: the jobs of a local launcher share the command's output, and print's
    separate write of the newline let two jobs' lines run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (waiting for another process that trains in it, e.g. a job of a
    killed command still stopping)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"[benchmark] {run_dir}: another process trains here; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def clear_outputs(run_dir: Path) -> None:
    """Remove a run's outputs (an unfinished attempt), keeping what Hydra and the lock put there."""
    for path in run_dir.iterdir():
        if path.name in HYDRA_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_job(bench: BenchmarkConfig) -> str:
    """One job of the launched multirun: train the run ``bench.run`` of ``OUT/plan.json`` in its directory.

    Returns ``finished`` or ``failed``. A failure of the run (an exception, e.g. the divergence guard) is written
    to ``error.txt`` and does not stop the other jobs; an interruption (KeyboardInterrupt, after the trainer's
    checkpoint) leaves the run pending and ends the job's process (a launcher worker takes no further job); a job
    whose multirun has stopped does not start. An interrupted earlier attempt (checkpoints of training or
    of the SFT warm start, no ``error.txt``) is resumed from its newest checkpoint; a failed one is cleared and
    started again.
    """
    from tokenrl.run.checkpoint import list_checkpoints
    from tokenrl.run.config import make_run_config
    from tokenrl.run.sft_checkpoints import STAGE as SFT_STAGE
    from tokenrl.run.trainer import run as train

    out = Path(bench.out)
    plan = json.loads((out / PLAN_FILE).read_text())
    if bench.run not in plan["runs"]:
        raise BenchmarkError(f"run={bench.run} is not in {out / PLAN_FILE}; start runs with experiments/benchmark.py")
    entry = plan["runs"][bench.run]
    spec = RunSpec(**{f.name: entry[f.name] for f in dataclasses.fields(RunSpec)})
    if gone := _launcher_gone():
        raise KeyboardInterrupt(f"{spec.key} not started: {gone}; rerun the benchmark command to continue")
    run_dir = out / spec.key
    with run_lock(run_dir):
        state = inspect_run(spec, out, retry_failed=True)
        if state.kind == "conflict":
            raise BenchmarkError(state.detail)
        if state.kind == "finished":
            say(f"[benchmark] {spec.key}: already finished")
            return "finished"
        resume = (run_dir / RUN_FILE).exists() and not (run_dir / ERROR_FILE).exists()
        resume = resume and bool(list_checkpoints(str(run_dir)) or list_checkpoints(str(run_dir), SFT_STAGE))
        if not resume:
            clear_outputs(run_dir)
            write_json(run_dir / RUN_FILE, spec.record())
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(spec.config))
        say(f"[benchmark] {spec.key}: {'resuming' if resume else 'starting'}; log {run_dir / LOG_FILE}")
        start = time.perf_counter()
        try:
            with (open(run_dir / LOG_FILE, "a" if resume else "w") as log, contextlib.redirect_stdout(log),
                  contextlib.redirect_stderr(log)):
                train(make_run_config({**spec.config, "resume": resume}), str(run_dir))
        except KeyboardInterrupt:
            say(f"[benchmark] {spec.key}: interrupted; it resumes from its newest checkpoint when the command is "
                "rerun")
            _end_job_process()
            raise
        except Exception as err:  # noqa: BLE001 - any failure of one run is recorded and the others go on
            summary = " ".join(f"{type(err).__name__}: {err}".split())  # one line: the leaderboard shows it
            (run_dir / ERROR_FILE).write_text(traceback.format_exc() + summary + "\n")
            say(f"[benchmark] {spec.key}: FAILED ({type(err).__name__}: {err}); see {run_dir / ERROR_FILE}")
            return "failed"
        say(f"[benchmark] {spec.key}: finished in {time.perf_counter() - start:.0f} s")
        return "finished"


# --------------------------------------------------------------------------------------------------
# Planning: grids, rounds, the dry run and its cost
# --------------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """A method's lr grid on a task and the results on it."""

    lrs: list[float]
    initial: int  # how many lrs the suite gave; the rest are extensions
    scores: dict[float, list[float | None]] = field(default_factory=dict)  # see choose_lr
    moved: dict[float, list[bool]] = field(default_factory=dict)  # lr -> per finished seed: best step > 0
    failed_elsewhere: dict[float, list[int]] = field(default_factory=dict)  # lr -> seeds outside lr_seeds that failed at it

    @property
    def flat(self) -> bool:
        """No lr improves on the start: every run finished and chose its step 0 (the start's weights)."""
        settled = self.chosen is not None and all(len(self.moved.get(lr, [])) == len(v) for lr, v in self.scores.items())
        return settled and not any(any(m) for m in self.moved.values())

    @property
    def chosen(self) -> float | None:
        """The chosen lr (None while pending, or when every lr failed). An lr at which a seed outside the grid's
        seeds failed is out, as one with a failed grid seed is (its mean over every seed would be a failure)."""
        return choose_lr({lr: v for lr, v in self.scores.items() if not self.failed_elsewhere.get(lr)})

    @property
    def at_edge(self) -> bool:
        """The chosen lr is not strictly inside the grid (a flat grid has no optimum to bracket: not an edge)."""
        return self.chosen is not None and not self.flat and not self.lrs[0] < self.chosen < self.lrs[-1]


def collect_grids(
    grids: dict[tuple[str, str], Grid], runs: list[RunSpec], states: dict[str, RunState], seeds: list[int]
) -> None:
    """Fill each grid's ``scores`` from the states of its runs on ``seeds`` (the seeds the lr is chosen on) and its
    ``failed_elsewhere`` from the failed runs of the other seeds."""
    for grid in grids.values():
        grid.scores = {lr: [] for lr in grid.lrs}
        grid.moved = {lr: [] for lr in grid.lrs}
        grid.failed_elsewhere = {}
    for run in runs:
        if run.seed not in seeds:
            if states[run.key].kind == "failed" and run.lr in grids[run.task, run.method].scores:
                grids[run.task, run.method].failed_elsewhere.setdefault(run.lr, []).append(run.seed)
            continue
        state = states[run.key]
        score = (state.metrics["selection"]["best_score"] if state.kind == "finished"
                 else math.nan if state.kind == "failed" else None)
        grids[run.task, run.method].scores[run.lr].append(score)
        if state.kind == "finished":
            grids[run.task, run.method].moved[run.lr].append(state.metrics["selection"].get("best_step", 1) > 0)


def extensions(suite: SuiteConfig, grids: dict[tuple[str, str], Grid]) -> dict[tuple[str, str], list[float]]:
    """The lrs each grid gains this round (a choice at an edge, within ``max_grid_extensions``; a flat grid
    extends downwards, below its smallest lr, even when that lr is out for a failed seed)."""
    new = {}
    for key, grid in grids.items():
        if len(grid.lrs) - grid.initial < suite.max_grid_extensions:
            target = grid.lrs[0] if grid.flat else grid.chosen
            added = [lr for lr in extend_grid(grid.lrs, target) if lr not in grid.lrs]
            if added:
                new[key] = added
    return new


def estimate_seconds(suite: SuiteConfig, runs: list[RunSpec], states: dict[str, RunState]) -> dict[tuple[str, str], tuple[float, str]]:
    """(task, method) -> (seconds per run, where the number comes from): the mean of its finished runs, else
    of the task's, else the task's ``seconds_per_run``."""
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        if states[run.key].kind == "finished":
            seconds[run.task, run.method].append(run_seconds(states[run.key].metrics))
    estimates = {}
    for task, spec in suite.tasks.items():
        task_runs = [s for (t, _), values in seconds.items() if t == task for s in values]
        for method in suite.methods:
            own = seconds.get((task, method))
            if own:
                estimates[task, method] = (sum(own) / len(own), f"mean of {len(own)} finished")
            elif task_runs:
                estimates[task, method] = (sum(task_runs) / len(task_runs), "mean of the task's finished runs")
            else:
                estimates[task, method] = (spec.seconds_per_run, "the task's seconds_per_run")
    return estimates


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _lrs_text(lrs: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


def plan_text(suite: SuiteConfig, grids: dict, runs: list[RunSpec], states: dict[str, RunState], n_jobs: int | None) -> str:
    """The grid per task and method with its state, and the estimated cost of the pending runs."""
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for run in runs:
        counts[run.task, run.method][states[run.key].kind] += 1
    estimates = estimate_seconds(suite, runs, states)
    total_pending = sum(c["pending"] for c in counts.values())
    lines = [f"suite {suite.name}: {len(suite.tasks)} task(s) x {len(suite.methods)} method(s), seeds "
             f"{list(suite.seeds)}, {len(runs)} runs: " + ", ".join(
                 f"{sum(c[k] for c in counts.values())} {k}" for k in ("finished", "failed", "pending"))]
    cost = 0.0
    for task, task_spec in suite.tasks.items():
        lines.append(f"task {task} ({' '.join(task_spec.overrides)}):")
        lines.append(f"  {'method':<18} {'lrs':<34} {'done':>5} {'fail':>5} {'todo':>5}  s/run (from)")
        for method in suite.methods:
            grid, c = grids[task, method], counts[task, method]
            seconds, source = estimates[task, method]
            cost += seconds * c["pending"]
            note = "" if grid.chosen is None else f"  chosen {grid.chosen:g}" + (
                " (at an edge)" if grid.at_edge else " (flat: no lr improves on the start)" if grid.flat else "")
            lines.append(f"  {method:<18} {_lrs_text(grid.lrs):<34} {c['finished']:>5} {c['failed']:>5} "
                         f"{c['pending']:>5}  {seconds:.0f} ({source}){note}")
    wall = f", ~{_duration(cost / n_jobs)} with {n_jobs} at once" if n_jobs and n_jobs > 0 else ""
    lines.append(f"estimated cost of the {total_pending} pending runs: {_duration(cost)} of one process{wall}; each "
                 f"method's grid may gain up to {suite.max_grid_extensions} lr(s) x {len(lr_seeds(suite))} seeds at an edge")
    others = [seed for seed in suite.seeds if seed not in lr_seeds(suite)]
    if others:
        lines.append(f"the lr grids run on seeds {lr_seeds(suite)}; seeds {others} then run at each method's chosen lr "
                     f"only ({len(others)} run(s) per method, not listed until its grid is settled)")
    return "\n".join(lines)


def plan_and_run(bench: BenchmarkConfig, forward: list[str], n_jobs: int | None) -> int:
    """The command: expand, skip what is done, launch the rest, extend grids at an edge, write the leaderboard.

    Args:
        bench: the composed benchmark config.
        forward: overrides for the launched multirun (the suite's and the launcher's).
        n_jobs: runs at once (for the wall-clock estimate; None if unknown).

    Returns:
        0 when every run is finished or failed (and the leaderboard is written; with ``dry_run``, always 0; with
        ``report``, the leaderboard of what is finished is written and it is 0), 1 when runs are still pending
        after the launch.
    """
    suite, out = bench.suite, Path(bench.out).resolve()
    check_suite(suite)
    grids = {(t, m): Grid(list(spec.lrs), len(spec.lrs)) for t in suite.tasks for m, spec in suite.methods.items()}
    chosen: dict[tuple[str, str], float] = {}  # settled grids' choices: their runs on the seeds outside lr_seeds
    unrun: dict[tuple[str, str], list[float]] = {}  # with report: the extensions a rerun would add (not run yet)
    while True:  # a round: expand, launch what is pending, extend the grids whose choice sits at an edge
        runs = expand(suite, {k: g.lrs for k, g in grids.items()}, chosen)
        runs += failures_elsewhere(suite, {k: g.lrs for k, g in grids.items()}, out, {r.key for r in runs})
        states = {run.key: inspect_run(run, out, bench.retry_failed) for run in runs}
        conflicts = [states[r.key].detail for r in runs if states[r.key].kind == "conflict"]
        if conflicts:
            raise BenchmarkError("run directories that hold something else:\n  " + "\n  ".join(conflicts))
        pending = [run for run in runs if states[run.key].kind == "pending"]
        if not bench.dry_run and not bench.report:
            print(plan_text(suite, grids, runs, states, n_jobs), flush=True)
            if pending:
                write_json(out / PLAN_FILE, {"suite": suite.name, "runs": {r.key: r.record() for r in runs}})
                for wave in sft_waves(pending, states, runs) if bench.sft_first else [pending]:
                    code = launch(wave, out, forward)
                    if code != 0:
                        raise BenchmarkError(f"the launched multirun exited with status {code} (see its output above); "
                                             "rerun the same command to continue")
                states = {run.key: inspect_run(run, out, bench.retry_failed) for run in runs}
        collect_grids(grids, runs, states, lr_seeds(suite))
        new = extensions(suite, grids)
        if bench.report:  # what is finished: an extension not run yet is counted (unrun), not added
            for key, lrs in list(new.items()):
                extra = expand(suite, {k: lrs if k == key else [] for k in grids})
                done = {r.lr for r in extra if inspect_run(r, out, bench.retry_failed).kind != "pending"}
                if missing := [lr for lr in lrs if lr not in done]:
                    unrun[key] = missing
                if added := [lr for lr in lrs if lr in done]:
                    new[key] = added
                else:
                    del new[key]
        for key, lrs in new.items():
            why = "no lr improves on the start (flat)" if grids[key].flat else f"the chosen lr {grids[key].chosen:g} is at the grid's edge"
            print(f"{key[0]}/{key[1]}: {why}; adding lr {_lrs_text(lrs)}")
            grids[key].lrs = sorted(grids[key].lrs + lrs)
        if new:
            continue
        settled = {key: g.chosen for key, g in grids.items() if g.chosen is not None and key not in new and not unrun.get(key)}
        if len(lr_seeds(suite)) == len(suite.seeds) or settled == chosen or bench.dry_run:
            break
        chosen = settled  # the next round runs the other seeds at the chosen lrs
    if bench.dry_run:
        print(plan_text(suite, grids, runs, states, n_jobs))
        return 0
    still = [run.key for run in runs if states[run.key].kind == "pending"]
    command = " ".join(["python experiments/benchmark.py", *forward, f"out={bench.out}"])
    board = leaderboard(suite, grids, runs, states, command)
    board["pending_runs"] = len(still) + sum(len(lrs) for lrs in unrun.values()) * len(lr_seeds(suite))
    write_leaderboard(board, out)
    print(f"leaderboard: {out / 'leaderboard.md'} (and .json, plots)")
    if bench.report:
        print(f"{board['pending_runs']} run(s) pending: the leaderboard holds what is finished", file=sys.stderr)
        return 0
    if still:
        print(f"{len(still)} run(s) still pending (e.g. {still[0]}); rerun the same command", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# The leaderboard
# --------------------------------------------------------------------------------------------------
def _interval_json(interval: Interval) -> dict[str, Any]:
    return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


def _per_seed(evals: dict[int, dict[str, Any]], key: str) -> dict[int, float]:
    return {seed: float(ev[key]) for seed, ev in evals.items() if isinstance(ev.get(key), (int, float))}


def leaderboard(suite: SuiteConfig, grids: dict[tuple[str, str], Grid], runs: list[RunSpec],
                states: dict[str, RunState], command: str) -> dict[str, Any]:
    """The leaderboard as data: per task, the lr grids, each method at its chosen lr (per-seed values, mean and
    95% t-interval per metric, paired difference to the reference), the teacher and the SFT start(s)."""
    keys = [key for key, _ in LEADERBOARD_METRICS]
    board: dict[str, Any] = {
        "suite": suite.name, "command": command, "seeds": list(suite.seeds), "lr_seeds": lr_seeds(suite),
        "protocol": list(suite.protocol),
        "selection_metric": suite.selection_metric, "max_grid_extensions": suite.max_grid_extensions,
        "reference": suite.reference, "tasks": {},
    }
    for task, task_spec in suite.tasks.items():
        methods: dict[str, Any] = {}
        teacher: dict[int, dict] = {}
        sft: dict[str, dict[int, dict]] = {}
        failed_runs = []
        for method in suite.methods:
            grid = grids[task, method]
            chosen = grid.chosen
            finals: dict[int, dict] = {}
            algo_config = None
            for run in runs:
                if (run.task, run.method) != (task, method):
                    continue
                state = states[run.key]
                algo_config = {k: v for k, v in run.config["algo"].items() if k != "lr"}
                if state.kind == "failed":
                    failed_runs.append({"run": run.key, "error": state.detail})
                if run.lr == chosen and state.kind == "finished":
                    finals[run.seed] = state.metrics["final_eval"]
                    teacher.setdefault(run.seed, state.metrics.get("teacher_eval") or {})
                    sft.setdefault(method, {})[run.seed] = state.metrics.get("sft_eval") or {}
            means = mean_scores(grid.scores)
            methods[method] = {
                "algo": algo_config,
                "grid": {f"{lr:g}": {"lr": lr, "scores": grid.scores[lr], "mean": means[lr],
                                     "failed_seeds": grid.failed_elsewhere.get(lr, [])} for lr in grid.lrs},
                "chosen_lr": chosen, "at_edge": grid.at_edge, "flat": grid.flat, "extensions": len(grid.lrs) - grid.initial,
                "values": {key: _per_seed(finals, key) for key in keys},
            }
        for info in methods.values():
            info["metrics"] = {key: _interval_json(t_interval(info["values"][key].values())) for key in keys}
        reference = methods.get(suite.reference) if suite.reference else None
        if reference is not None:
            for method, info in methods.items():
                if method != suite.reference:
                    info["paired"] = {key: _interval_json(paired_difference(info["values"][key], reference["values"][key]))
                                      for key in keys}
        starts = [{"methods": labels, "values": {key: _per_seed(evals, key) for key in keys}}
                  for labels, evals in report.sft_start_groups(sft)]
        board["tasks"][task] = {
            "overrides": list(task_spec.overrides), "methods": methods, "failed_runs": failed_runs,
            "teacher": {key: _per_seed(teacher, key) for key in keys}, "sft_starts": starts,
        }
    return board


def _cell(values: dict) -> Interval:
    return t_interval(values.values())


def _diff_cell(interval: dict[str, Any]) -> str:
    if interval["n"] == 0:
        return "–"
    if interval["n"] == 1:
        return f"{interval['mean']:+.3f} (n = 1)"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _titled(key: str, title: str) -> str:
    better = report.direction(key)
    return f"{title} {'↓' if better == 'lower' else '↑' if better == 'higher' else ''}".strip()


def leaderboard_markdown(board: dict[str, Any]) -> str:
    """``leaderboard.md``: per task the methods at their chosen lrs, the paired differences, the grids, failures."""
    n_seeds = len(board["seeds"])
    lines = [
        f"# Leaderboard: suite {board['suite']}", "",
        f"Command: `{board['command']}`. Protocol (every run): "
        f"`{' '.join(board['protocol'])}`, training seeds {board['seeds']}. Each method at the lr with the best mean "
        f"validation `{board['selection_metric']}` over the seeds"
        + ("" if board["lr_seeds"] == board["seeds"] else
           f" {board['lr_seeds']} (the lr grid runs on those seeds only; the other seeds at the chosen lr)")
        + " (lower is better; the grids are below). Cells: "
        f"mean ± half-width of the 95% t-interval over training seeds (n = {n_seeds} unless marked); ↓ lower is "
        "better, ↑ higher is better, response length has no direction (compare with the teacher's).", "",
    ]
    if board.get("pending_runs"):
        lines += [f"**Part-run: {board['pending_runs']} run(s) of the grid as far as it got are still pending**; "
                  "rerun the command to finish them (rows hold the seeds that finished, n says how many; a grid "
                  "with a pending lr has no choice yet; a choice at an edge whose extension has not run is "
                  "provisional).", ""]
    header_titles = [_titled(key, title) for key, title in LEADERBOARD_METRICS]
    for task, data in board["tasks"].items():
        lines += [f"## Task {task} (`{' '.join(data['overrides'])}`)", ""]
        lines += ["| method | lr | " + " | ".join(header_titles) + " | n |", "|---" * (len(header_titles) + 3) + "|"]

        def row(name: str, lr: str, values: dict[str, dict]) -> str:
            cells = [_cell(values[key]) for key, _ in LEADERBOARD_METRICS]
            n = max((c.n for c in cells), default=0)
            text = [c.format() if c.n in (0, 1, n) else f"{c.format()} (n = {c.n})" for c in cells]
            return f"| {name} | {lr} | " + " | ".join(text) + f" | {n} |"

        lines.append(row("teacher", "", data["teacher"]))
        for start in data["sft_starts"]:
            lines.append(row(report.sft_row_name(start["methods"], len(data["sft_starts"])), "", start["values"]))
        for method, info in data["methods"].items():
            if info["chosen_lr"] is None:
                state = "pending" if any(e["mean"] is None for e in info["grid"].values()) else "failed"
                lines.append(f"| {method} | – | " + " | ".join(state for _ in LEADERBOARD_METRICS) + " | 0 |")
                continue
            flag = " (edge)" if info["at_edge"] else " (flat)" if info.get("flat") else ""
            lines.append(row(method, f"{info['chosen_lr']:g}{flag}", info["values"]))
        if board["reference"] in data["methods"]:
            ref = board["reference"]
            lines += ["", f"Paired per-seed difference to {ref} (method − {ref}, same seed = same SFT start): mean "
                      "[95% t-interval]; an interval that excludes 0 is a difference beyond the seed noise.", ""]
            lines += ["| method | " + " | ".join(header_titles) + " |", "|---" * (len(header_titles) + 1) + "|"]
            for method, info in data["methods"].items():
                if "paired" in info and info["chosen_lr"] is not None:
                    lines.append(f"| {method} | " + " | ".join(_diff_cell(info["paired"][k]) for k, _ in LEADERBOARD_METRICS) + " |")
        lines += ["", f"lr grids: mean validation `{board['selection_metric']}` over seeds per lr (lower is better; "
                  "failed: a seed failed; out: another seed failed at the lr, which rules it out; pending: not run "
                  "yet).", "",
                  "| method | lr: score | chosen lr | note |", "|---|---|---|---|"]
        for method, info in data["methods"].items():
            cells = []
            for entry in info["grid"].values():
                mean = entry["mean"]
                cell = "pending" if mean is None else "failed" if math.isnan(mean) else f"{mean:.4f}"
                if entry.get("failed_seeds"):  # a seed outside the grid's failed at it: the lr is out
                    cell += f" (out: seed {', '.join(map(str, entry['failed_seeds']))} failed)"
                cells.append(f"{entry['lr']:g}: {cell}")
            chosen = "–" if info["chosen_lr"] is None else f"{info['chosen_lr']:g}"
            if info["chosen_lr"] is None:
                note = "no lr: " + ("pending runs" if any(e["mean"] is None for e in info["grid"].values()) else "every lr failed")
            elif info.get("flat"):
                note = (f"flat: no lr from {info['grid'][next(iter(info['grid']))]['lr']:g} up improves on the start "
                        f"(best validated step 0 at every lr and seed; {info['extensions']} of "
                        f"{board['max_grid_extensions']} extensions used), no optimum to bracket; the row is the start's weights")
            elif info["at_edge"]:
                note = "**at the grid's edge** " + ("(one lr: not tuned)" if len(info["grid"]) == 1 else
                                                    f"({info['extensions']} of {board['max_grid_extensions']} extensions used)")
            else:
                note = "inside the grid" + (f" after {info['extensions']} extension(s)" if info["extensions"] else "")
            lines.append(f"| {method} | {', '.join(cells)} | {chosen} | {note} |")
        if data["failed_runs"]:
            lines += ["", "Failed runs (their `error.txt`):", ""]
            lines += [f"- `{f['run']}`: {f['error']}" for f in data["failed_runs"]]
        lines += ["", f"![{task}](leaderboard_{task}.png)" if _plottable(data) else "(No plot: no method has a chosen lr yet.)", ""]
    return "\n".join(lines)


def _plottable(data: dict[str, Any]) -> bool:
    """A task's leaderboard has a row to plot (a part-run's may not: every grid still has a pending lr)."""
    return bool(data["sft_starts"]) or any(info["chosen_lr"] is not None for info in data["methods"].values())


def plot_task(board: dict[str, Any], task: str, path: Path) -> None:
    """The task's panel plot: one panel per leaderboard metric, each method at its chosen lr and the SFT start(s);
    none (and a stale one removed) while no method has a chosen lr."""
    data = board["tasks"][task]
    if not _plottable(data):
        path.unlink(missing_ok=True)
        return
    rows = []
    for start in data["sft_starts"]:
        rows.append(report.PlotRow(report.sft_row_name(start["methods"], len(data["sft_starts"])),
                                   {key: _cell(start["values"][key]) for key, _ in LEADERBOARD_METRICS}, baseline=True))
    for method, info in data["methods"].items():
        if info["chosen_lr"] is not None:
            rows.append(report.PlotRow(f"{method} (lr {info['chosen_lr']:g})",
                                       {key: _cell(info["values"][key]) for key, _ in LEADERBOARD_METRICS}))
    teacher = {key: _cell(data["teacher"][key]) for key, _ in LEADERBOARD_METRICS}
    report.plot_panels(rows, LEADERBOARD_METRICS, path, teacher=teacher,
                       title=f"suite {board['suite']}, task {task}: mean and 95% t-interval over training seeds")


def write_leaderboard(board: dict[str, Any], out: Path) -> None:
    """``leaderboard.md``, ``leaderboard.json`` and ``leaderboard_<task>.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(leaderboard_markdown(board))
    write_json(out / "leaderboard.json", board)
    for task in board["tasks"]:
        plot_task(board, task, out / f"leaderboard_{task}.png")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _forwarded_overrides() -> list[str]:
    """The command's overrides that the launched multirun needs: the suite's (not out, dry_run, report, run) and Hydra's
    (launcher, search path, logging; not the run or sweep directory, which the benchmark sets)."""
    overrides = HydraConfig.get().overrides
    task = [o for o in overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("out", "dry_run", "report", "run")]
    own = ("hydra.run.", "hydra.sweep.", "hydra.mode")
    return [*task, *(o for o in overrides.hydra if not o.lstrip("+~").startswith(own))]


register_benchmark_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="benchmark")
def main(cfg: DictConfig) -> str | int:
    bench: BenchmarkConfig = OmegaConf.to_object(cfg)
    if bench.run is not None:
        return run_job(bench)
    n_jobs = OmegaConf.select(HydraConfig.get().launcher, "n_jobs")
    try:
        code = plan_and_run(bench, _forwarded_overrides(), n_jobs)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)
    return code


def cli() -> None:
    """The command line: ``--dry-run`` is ``dry_run=true``; a launched multirun stops its jobs on SIGTERM."""
    if os.environ.get("TOKENRL_BENCHMARK_LAUNCH") == "1" and os.getpid() == os.getpgrp():
        os.environ[MULTIRUN_ENV] = f"{socket.gethostname()}:{os.getpid()}"  # inherited by the launcher's workers: see _launcher_gone
        _stop_group_on_sigterm()
    flags = {"--dry-run": "dry_run=true", "--report": "report=true"}
    sys.argv = [flags.get(arg, arg) for arg in sys.argv]
    main()


if __name__ == "__main__":
    # Run as the module `benchmark` (its folder is on sys.path), not as __main__: the launcher's worker processes
    # then import the schema classes and the job function by name instead of receiving pickled copies of them.
    import benchmark

    benchmark.cli()
