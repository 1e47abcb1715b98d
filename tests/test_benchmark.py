"""experiments/benchmark.py and tokenrl.evaluation.stats: intervals against scipy, the lr rule, every suite's
expansion, and the tiny suite end to end through Hydra's joblib launcher (rerun, dry run, kill and rerun)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from tests.conftest import ROOT, load_experiment
from tokenrl.evaluation.stats import paired_difference, t_interval, t_quantile
from tokenrl.run.config import compose_config

CONF = os.path.join(ROOT, "experiments", "conf")
SCRIPT = os.path.join(ROOT, "experiments", "benchmark.py")


@pytest.fixture(scope="module")
def bench():
    module = load_experiment("benchmark")
    module.register_benchmark_configs()
    return module


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 29, 120])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_t_quantile_matches_scipy(df, confidence):
    assert t_quantile(confidence, df) == pytest.approx(scipy_stats.t.ppf((1 + confidence) / 2, df), rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_t_interval_and_paired_difference_match_scipy(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.5, 0.1, n), rng.normal(0.6, 0.1, n)
    interval = t_interval(a)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=a.mean(), scale=scipy_stats.sem(a))
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx((a.mean(), low, high, n))
    paired = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((ci.low, ci.high))
    assert paired.mean == pytest.approx((a - b).mean())


def test_intervals_of_one_or_no_value_and_unpaired_seeds():
    one = t_interval([0.25])
    assert one.mean == 0.25 and math.isnan(one.low) and one.format() == "0.250 (n = 1)"
    assert t_interval([]).format() == "–"
    assert t_interval([1.0, 2.0]).format() == f"1.500 ± {scipy_stats.t.ppf(0.975, 1) * 0.5:.3f}"
    # Only seeds both have are paired.
    assert paired_difference({0: 1.0, 1: 2.0, 2: 9.0}, {0: 0.5, 1: 1.0}).values == (0.5, 1.0)


# --------------------------------------------------------------------------------------------------
# The lr rule
# --------------------------------------------------------------------------------------------------
def test_choose_lr_by_mean_score_failed_and_pending(bench):
    nan = math.nan
    assert bench.choose_lr({1e-4: [0.5, 0.7], 3e-4: [0.55, 0.6], 1e-3: [0.8, 0.9]}) == 3e-4  # means .6, .575, .85
    assert bench.choose_lr({1e-4: [0.5, 0.5], 3e-4: [0.5, 0.5]}) == 1e-4  # a tie: the smaller lr
    assert bench.choose_lr({1e-4: [0.6, 0.6], 3e-4: [0.1, nan]}) == 1e-4  # a failed seed rules its lr out
    assert bench.choose_lr({1e-4: [nan, 0.1], 3e-4: [nan, nan]}) is None  # every lr failed
    assert bench.choose_lr({1e-4: [0.1, 0.1], 3e-4: [0.2, None]}) is None  # still pending: no choice yet


def test_extend_grid_at_either_edge_with_the_grid_spacing(bench):
    grid = [1e-4, 3e-4, 1e-3]
    assert bench.extend_grid(grid, 3e-4) == []
    assert bench.extend_grid(grid, 1e-4) == [3.2e-5]  # 10^-4.5 to two digits
    assert bench.extend_grid(grid, 1e-3) == [3.2e-3]
    assert bench.extend_grid([3.2e-5, 1e-4, 3e-4, 1e-3], 3.2e-5) == [1e-5]  # the spacing stays half a decade
    assert bench.extend_grid([1e-3, 1e-2], 1e-2) == [0.1]
    assert bench.extend_grid([1e-3], 1e-3) == [] and bench.extend_grid(grid, None) == []


def test_extensions_go_on_until_inside_within_the_budget(bench):
    """Synthetic validation scores with their minimum at lr 1e-5: the grid walks down one point per round."""
    suite = bench.SuiteConfig(name="s", tasks={"t": bench.TaskSpec()}, methods={"m": bench.MethodSpec("bc", [1e-4, 1e-3])},
                              seeds=[0, 1], max_grid_extensions=2)

    def score(lr):
        return (math.log10(lr) + 5.0) ** 2

    grid = bench.Grid([1e-4, 1e-3], 2)
    added = []
    for _ in range(5):
        grid.scores = {lr: [score(lr), score(lr) + 0.01] for lr in grid.lrs}
        new = bench.extensions(suite, {("t", "m"): grid})
        if not new:
            break
        added += new["t", "m"]
        grid.lrs = sorted(grid.lrs + new["t", "m"])
    assert added == [1e-5, 1e-6]  # after 1e-5 was added the choice sat at the edge of [1e-5, 1e-3]: one more
    assert grid.chosen == 1e-5 and not grid.at_edge
    grid = bench.Grid([1e-4, 1e-3], 2)
    grid.scores = {lr: [score(lr)] * 2 for lr in grid.lrs}
    suite.max_grid_extensions = 0
    assert bench.extensions(suite, {("t", "m"): grid}) == {} and grid.at_edge  # no budget: flagged, not extended


def test_a_grid_where_no_lr_improves_on_the_start_is_flat_not_an_edge(bench):
    """Every run chose its step 0 (the start's weights): every lr ties at the start's score and the tie-break picks
    the smallest lr. Such a grid is flat, not an edge; it still extends downwards (a smaller lr may yet improve);
    one lr whose run moved (best step > 0) makes it an ordinary grid again."""
    suite = bench.SuiteConfig(name="s", tasks={"t": bench.TaskSpec(overrides=["task=synthetic"])},
                              methods={"m": bench.MethodSpec("bc", [1e-4, 3e-4, 1e-3])}, seeds=[0, 1], reference=None,
                              protocol=["selection=best"])
    runs = bench.expand(suite, {("t", "m"): [1e-4, 3e-4, 1e-3]})
    start = 0.589

    def states(moved_lr=None):
        return {r.key: bench.RunState("finished", metrics={"selection": {
            "best_step": 100 if r.lr == moved_lr else 0, "best_score": start - (0.002 if r.lr == moved_lr else 0.0)}})
            for r in runs}

    grid = bench.Grid([1e-4, 3e-4, 1e-3], 3)
    bench.collect_grids({("t", "m"): grid}, runs, states(), [0, 1])
    assert grid.chosen == 1e-4 and grid.flat and not grid.at_edge
    assert bench.extensions(suite, {("t", "m"): grid}) == {("t", "m"): [3.2e-5]}
    grid.lrs = [3.2e-5, *grid.lrs]  # the round adds the lr before the next collect_grids scores it
    assert grid.flat and not grid.at_edge
    grid.lrs = grid.lrs[1:]
    bench.collect_grids({("t", "m"): grid}, runs, states(moved_lr=1e-4), [0, 1])
    assert grid.chosen == 1e-4 and not grid.flat and grid.at_edge
    pending = {**states(), runs[0].key: bench.RunState("pending")}
    bench.collect_grids({("t", "m"): grid}, runs, pending, [0, 1])
    assert grid.chosen is None and not grid.flat  # nothing is flat before every run of the grid finished


def test_lr_seeds_run_the_grid_on_some_seeds_and_the_rest_at_the_chosen_lr(bench):
    """suite.lr_seeds: the grid on seed 0 only; seeds 1, 2 join at the chosen lr once the grid is settled, and only
    the grid's seeds count for the choice."""
    suite = bench.SuiteConfig(name="s", tasks={"t": bench.TaskSpec(overrides=["task=synthetic"])},
                              methods={"m": bench.MethodSpec("bc", [1e-4, 1e-3])}, seeds=[0, 1, 2], lr_seeds=[0], reference=None,
                              protocol=["selection=best"])
    bench.check_suite(suite)
    grid_runs = bench.expand(suite, {("t", "m"): [1e-4, 1e-3]})
    runs = bench.expand(suite, {("t", "m"): [1e-4, 1e-3]}, {("t", "m"): 1e-3})
    assert [(r.lr, r.seed) for r in grid_runs] == [(1e-4, 0), (1e-3, 0)]
    assert [(r.lr, r.seed) for r in runs] == [(1e-4, 0), (1e-3, 0), (1e-3, 1), (1e-3, 2)]
    finished = {r.key: bench.RunState("finished", metrics={"selection": {"best_score": {0: 0.5, 1: 0.1, 2: 0.1}[r.seed] + r.lr}})
                for r in runs}
    grid = bench.Grid([1e-4, 1e-3], 2)
    bench.collect_grids({("t", "m"): grid}, runs, finished, bench.lr_seeds(suite))
    assert grid.scores == {1e-4: [0.5 + 1e-4], 1e-3: [0.5 + 1e-3]} and grid.chosen == 1e-4
    with pytest.raises(bench.BenchmarkError, match="lr_seeds must be a non-empty subset"):
        bench.check_suite(bench.SuiteConfig(**{**vars(suite), "lr_seeds": [5]}))


def test_a_seed_that_fails_at_the_chosen_lr_rules_the_lr_out(bench, tmp_path):
    """With lr_seeds=[0]: seed 1 fails at the lr chosen on seed 0. That lr is out (as under the full rule, where the
    failed seed makes its mean a failure): the next best lr is chosen, its other seeds join the plan, and the failed
    run stays in the plan (found in its directory once the choice has moved) so the choice does not move back."""
    suite = bench.SuiteConfig(name="s", tasks={"t": bench.TaskSpec(overrides=["task=synthetic"])},
                              methods={"m": bench.MethodSpec("bc", [1e-4, 1e-3, 1e-2])}, seeds=[0, 1, 2], lr_seeds=[0],
                              reference=None, protocol=["selection=best"])
    lrs = {("t", "m"): [1e-4, 1e-3, 1e-2]}
    runs = bench.expand(suite, lrs, {("t", "m"): 1e-3})
    score = {1e-4: 0.52, 1e-3: 0.50, 1e-2: 0.51}
    states = {r.key: bench.RunState("finished", metrics={"selection": {"best_score": score[r.lr], "best_step": 5}})
              for r in runs}
    failed = next(r for r in runs if (r.lr, r.seed) == (1e-3, 1))
    states[failed.key] = bench.RunState("failed", "DivergenceError: ...")
    grid = bench.Grid(list(lrs["t", "m"]), 3)
    bench.collect_grids({("t", "m"): grid}, runs, states, [0])
    assert grid.failed_elsewhere == {1e-3: [1]} and grid.chosen == 1e-2 and grid.at_edge
    assert grid.scores[1e-3] == [0.50]  # the grid's own score is unchanged; the lr is out, not rescored
    # The next round's plan: the other seeds at 1e-2; the failed run at 1e-3 comes back from its directory.
    (tmp_path / failed.key).mkdir(parents=True)
    (tmp_path / failed.key / bench.ERROR_FILE).write_text("DivergenceError: ...\n")
    nxt = bench.expand(suite, lrs, {("t", "m"): 1e-2})
    found = bench.failures_elsewhere(suite, lrs, tmp_path, {r.key for r in nxt})
    assert [(r.lr, r.seed) for r in found] == [(1e-3, 1)] and found[0].id == failed.id
    assert not bench.failures_elsewhere(suite, lrs, tmp_path, {r.key for r in nxt + found})
    states = {r.key: states.get(r.key, bench.RunState("pending")) for r in nxt + found}
    bench.collect_grids({("t", "m"): grid}, nxt + found, states, [0])
    assert grid.chosen == 1e-2 and grid.failed_elsewhere == {1e-3: [1]}


# --------------------------------------------------------------------------------------------------
# Suites: composition and expansion
# --------------------------------------------------------------------------------------------------
def _suite(bench, name: str, overrides: tuple[str, ...] = (), conf: str = CONF, first_lr_only: bool = False):
    """The suite's config and its expanded runs (``first_lr_only``: each method's first lr, the first seed)."""
    bench_cfg = OmegaConf.to_object(compose_config(conf, [f"suite={name}", *overrides], config_name="benchmark"))
    suite = bench_cfg.suite
    bench.check_suite(suite)
    grids = {(t, m): list(spec.lrs) for t in suite.tasks for m, spec in suite.methods.items()}
    if first_lr_only:  # composing a run takes 0.1-0.5 s: every method once, not the whole grid
        grids = {key: lrs[:1] for key, lrs in grids.items()}
        suite = bench.SuiteConfig(**{**vars(suite), "seeds": suite.seeds[:1]})
    return bench_cfg, bench.expand(suite, grids)


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(CONF, "suite").glob("*.yaml")))
def test_every_suite_composes_and_expands(bench, name):
    cfg, runs = _suite(bench, name, first_lr_only=True)
    suite = cfg.suite
    assert len(runs) == len(suite.tasks) * len(suite.methods)
    assert len({r.key for r in runs}) == len({r.id for r in runs}) == len(runs)
    for run in runs:
        assert run.config["algo"]["lr"] == run.lr and run.config["seed"] == run.seed
        assert run.config["algo"]["preset"] == suite.methods[run.method].algo  # the algorithm or its preset
        assert run.config["selection"]["every"] > 0 and run.config["selection"]["metric"] == suite.selection_metric
    if name == "default":
        assert set(suite.methods) == {"bc", "kd", "iql_bd", "iql_bd_math", "iql_bd_released", "soft_q", "minillm",
                                      "gkd", "sqil", "bd_kd", "kd_pbc", "iql_bd_online", "iql_bd_online_free"}
        sqil = next(r for r in runs if r.method == "sqil")
        assert sqil.config["algo"]["name"] == "soft_q" and sqil.config["algo"]["reward"] == "sqil"
        assert sqil.config["sft_steps"] == 3000 and sqil.config["steps"] == 1000 and sqil.config["threads"] == 1


@pytest.mark.parametrize("launcher", ["joblib_local", "joblib", "submitit_slurm"])
def test_benchmark_config_composes_with_each_launcher(bench, launcher):
    """The default launcher's settings live in its own option, so another launcher composes without them."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="benchmark", overrides=["suite=tiny", f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert ("Slurm" if launcher == "submitit_slurm" else "Joblib") in target
    assert cfg.hydra.launcher.get("n_jobs") == {"joblib_local": 2, "joblib": -1, "submitit_slurm": None}[launcher]


def test_run_id_ignores_execution_keys_and_order(bench):
    _, runs = _suite(bench, "tiny")
    run = runs[0]
    same = bench.RunSpec(run.task, run.method, run.lr, run.seed,
                         [*reversed(run.overrides), "threads=4", "progress=true"], run.config)
    assert same.id == run.id
    other = bench.RunSpec(run.task, run.method, run.lr, run.seed, [*run.overrides, "steps=5"], run.config)
    assert other.id != run.id


def _interruptible_jobs(bench, tmp_path) -> tuple[dict, object]:
    """The kd run of the tiny suite (checkpoints every 2 steps, of the SFT too) planned in two benchmark folders,
    ``straight`` and ``killed``, sharing one data folder (the SFT start one of them caches, the other reads)."""
    _, runs = _suite(bench, "tiny", first_lr_only=True)
    spec = next(r for r in runs if r.method == "kd")
    extra = {"checkpoint_every": 2, "data_dir": str(tmp_path / "data")}
    spec = bench.RunSpec(spec.task, spec.method, spec.lr, spec.seed, [*spec.overrides, "checkpoint_every=2"],
                         {**spec.config, **extra})
    jobs = {}
    for name in ("straight", "killed"):
        out = tmp_path / name
        out.mkdir()
        bench.write_json(out / bench.PLAN_FILE, {"suite": "tiny", "runs": {spec.key: spec.record()}})
        jobs[name] = types.SimpleNamespace(out=str(out), run=spec.key)
    return jobs, spec


def _kill_at_loss(monkeypatch, cls, n: int):
    """Raise KeyboardInterrupt at the ``n``-th loss of ``cls`` (one micro-batch per update); returns the original."""
    original, calls = cls.compute_loss, {"n": 0}

    def compute_loss(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(cls, "compute_loss", compute_loss)
    return original


def _assert_same_run(a_dir, b_dir, cached: tuple[bool, bool]):
    """Two runs ended alike: selection, final evaluation, SFT summary (but whether the start came from the cache,
    ``cached`` for a and b) and student."""
    from safetensors.torch import load_file

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    assert a["selection"] == b["selection"] and a["final_eval"] == b["final_eval"]
    assert (a["sft"].pop("cached"), b["sft"].pop("cached")) == cached and a["sft"] == b["sft"]
    students = [load_file(d / "student.safetensors") for d in (a_dir, b_dir)]
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_an_interrupted_run_resumes_from_its_checkpoint(bench, tmp_path, monkeypatch, capsys):
    """A job whose earlier attempt was interrupted after a checkpoint resumes it (the best checkpoint so far is in
    the checkpoint) and ends as the uninterrupted run."""
    from algorithms.kd import KD

    jobs, spec = _interruptible_jobs(bench, tmp_path)
    assert bench.run_job(jobs["straight"]) == "finished"
    original = _kill_at_loss(monkeypatch, KD, 3)  # the update after the checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        bench.run_job(jobs["killed"])
    monkeypatch.setattr(KD, "compute_loss", original)
    capsys.readouterr()
    assert bench.run_job(jobs["killed"]) == "finished" and "resuming" in capsys.readouterr().out
    # The straight run trained the SFT start and cached it; the killed one's first attempt read that cache.
    _assert_same_run(tmp_path / "straight" / spec.key, tmp_path / "killed" / spec.key, cached=(False, True))


def test_a_run_interrupted_in_its_sft_resumes_from_the_sft_checkpoint(bench, tmp_path, monkeypatch, capsys):
    """A job interrupted during its SFT warm start, after an SFT checkpoint, resumes the SFT from it and ends as a
    run that read the finished start from the cache."""
    from algorithms.bc import BC
    from tokenrl.run.checkpoint import list_checkpoints

    jobs, spec = _interruptible_jobs(bench, tmp_path)
    killed = tmp_path / "killed" / spec.key
    original = _kill_at_loss(monkeypatch, BC, 3)  # the SFT update after its checkpoint at SFT step 2
    with pytest.raises(KeyboardInterrupt):
        bench.run_job(jobs["killed"])
    monkeypatch.setattr(BC, "compute_loss", original)
    assert [s for s, _ in list_checkpoints(str(killed), "sft")] == [2] and not list_checkpoints(str(killed))
    capsys.readouterr()
    assert bench.run_job(jobs["killed"]) == "finished" and "resuming" in capsys.readouterr().out
    assert bench.run_job(jobs["straight"]) == "finished"
    _assert_same_run(killed, tmp_path / "straight" / spec.key, cached=(False, True))


_ORPHAN_SCRIPT = """
import os, socket, sys, time
sys.path.insert(0, {experiments!r})
import benchmark
os.setsid()  # as the launched multirun: a process-group leader, its host:pid in its jobs' environment
os.environ[benchmark.MULTIRUN_ENV] = f"{{socket.gethostname()}}:{{os.getpid()}}"
multirun = os.getpid()
print("multirun", benchmark._launcher_gone(), flush=True)  # the basic launcher runs jobs in the multirun itself
if os.fork() == 0:  # a launcher worker: the same group, the multirun its parent
    print("worker", benchmark._launcher_gone(), flush=True)
    while os.getppid() == multirun:  # until the multirun has stopped
        time.sleep(0.05)
    with open({report!r}, "w") as f:
        f.write(str(benchmark._launcher_gone()))
    os._exit(0)
time.sleep(0.5)
os._exit(0)
"""


def test_a_job_of_a_stopped_multirun_does_not_start(bench, tmp_path):
    """A launcher worker's job may start while its multirun lives and refuses once the multirun has stopped (an
    orphaned worker holding queued jobs); the multirun's own jobs (the basic launcher) and jobs outside a local
    multirun (a cluster job, a test) always may."""
    report = tmp_path / "orphan.txt"
    code = _ORPHAN_SCRIPT.format(experiments=os.path.dirname(SCRIPT), report=str(report))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["multirun None", "worker None"], proc.stdout + proc.stderr
    deadline = time.monotonic() + 30
    while not (report.exists() and report.read_text()):
        assert time.monotonic() < deadline, "the orphaned worker did not report"
        time.sleep(0.05)
    assert "has stopped" in report.read_text()
    assert bench._launcher_gone() is None  # this test process: no multirun in its environment


def test_unknown_suite_key_fails_at_compose_time(bench, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "suite" / "tiny.yaml").read_text().replace("  kd: {algo: kd,", "  kd: {algo: kd, lr_grid: [1.0],")
    (conf / "suite" / "bad.yaml").write_text(text)
    with pytest.raises(ConfigCompositionException) as err:
        _suite(bench, "bad", conf=str(conf))
    assert "lr_grid" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException, match="seedz"):
        _suite(bench, "tiny", ("suite.seedz=[0]",))
    with pytest.raises(bench.BenchmarkError, match="strictly increasing"):
        _suite(bench, "tiny", ("suite.methods.kd.lrs=[0.01,0.001]",))
    with pytest.raises(bench.BenchmarkError, match="tiny/kd do not compose.*top_pp"):
        _suite(bench, "tiny", ("suite.methods.kd.overrides=['algo.top_pp=0.5']",))


# --------------------------------------------------------------------------------------------------
# The tiny suite end to end (subprocesses through the joblib launcher)
# --------------------------------------------------------------------------------------------------
def _benchmark(out: Path, data: Path, *overrides: str, suite: str = "tiny", wait: bool = True):
    env = dict(os.environ, TOKENRL_DATA_DIR=str(data), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, SCRIPT, f"suite={suite}", f"out={out}", "hydra.launcher.n_jobs=2", *overrides]
    if not wait:  # its own process group; output to a file (a pipe nobody reads could fill and block it)
        with open(out.parent / "background.log", "w") as log:
            return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def _failing_suite(root: Path) -> list[str]:
    """A suite outside experiments/conf (Hydra's search path): the tiny one plus a method whose runs fail in the
    trainer's start-up checks (KD at top-p 0.9 over the task's top-0.8 cache)."""
    (root / "suite").mkdir(parents=True)
    text = Path(CONF, "suite", "tiny.yaml").read_text()
    text += "  broken: {algo: kd, lrs: [1.0e-3], overrides: [algo.top_p=0.9]}\n"
    (root / "suite" / "tiny_failing.yaml").write_text(text)
    return [f"hydra.searchpath=[file://{root}]"]


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".hydra" not in p.parts
            and p.name not in ("benchmark.log", "plan.json") and not p.name.startswith("leaderboard")}


def _processes_with(text: str) -> list[int]:
    """The pids of the processes whose environment holds ``text`` (a test's data folder: the command and every
    process it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """The tiny suite plus a method whose runs fail, stopped by SIGTERM to the command's process alone after its
    first finished run, then run again to the end: ``(out, data, overrides, metrics.json mtimes at the kill, the
    rerun)``. The command forwards the signal to the launched multirun's process group; no job may start after it
    and every process the command started must end (a launcher worker used to take its next queued job)."""
    root = tmp_path_factory.mktemp("bench")
    out, data = root / "out", root / "data"
    overrides = (*_failing_suite(root / "conf"), "suite.max_grid_extensions=0", "sft_first=false")
    proc = _benchmark(out, data, *overrides, suite="tiny_failing", wait=False)
    deadline = time.monotonic() + 600
    while not list(out.rglob("metrics.json")):
        assert proc.poll() is None and time.monotonic() < deadline, (root / "background.log").read_text()[-3000:]
        time.sleep(0.2)
    signalled = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    log = (root / "background.log").read_text()
    assert "interrupted by signal 15" in log, log[-3000:]
    deadline = time.monotonic() + 120
    while _processes_with(str(data)):
        assert time.monotonic() < deadline, f"still running after the command stopped: {_processes_with(str(data))}"
        time.sleep(0.5)
    started = {str(p.parent): p.stat().st_mtime for p in out.rglob("run.json")}
    assert all(t < signalled + 2.0 for t in started.values()), (started, signalled)  # none started after it
    killed = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    rerun = _benchmark(out, data, *overrides, suite="tiny_failing")
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    return out, data, overrides, killed, rerun


def test_killed_benchmark_is_completed_without_redoing_finished_runs(tiny_benchmark):
    out, _, _, killed, rerun = tiny_benchmark
    assert 1 <= len(killed) < 8
    # Jobs of the killed command stop after their current update; one may still have finished its run meanwhile.
    done, failed = map(int, re.search(r"10 runs: (\d+) finished, (\d+) failed", rerun.stdout).groups())
    assert len(killed) <= done < 8 and f"launching {10 - done - failed} run(s)" in rerun.stdout
    assert "Joblib.Parallel(n_jobs=2" in rerun.stdout + rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in killed} == killed


def test_tiny_suite_runs_end_to_end_and_writes_the_leaderboard(tiny_benchmark):
    out = tiny_benchmark[0]
    metrics = sorted(out.rglob("metrics.json"))
    assert len(metrics) == 8
    for path in metrics:
        record = json.loads((path.parent / "run.json").read_text())
        assert json.loads(path.read_text())["config"]["algo"]["lr"] == record["lr"]
        assert any((path.parent / "tb_hparams").iterdir())  # the trainer's add_hparams
    errors = sorted(out.glob("tiny/broken/*/*/error.txt"))
    assert len(errors) == 2 and "cache_top_p" in errors[0].read_text()

    board = json.loads((out / "leaderboard.json").read_text())
    methods = board["tasks"]["tiny"]["methods"]
    assert methods["broken"]["chosen_lr"] is None and len(board["tasks"]["tiny"]["failed_runs"]) == 2
    for name in ("bc", "kd"):
        info = methods[name]
        means = {float(lr): e["mean"] for lr, e in info["grid"].items()}
        assert info["chosen_lr"] == min(means, key=means.get) and info["at_edge"]  # two lrs: always an edge
        assert info["metrics"]["eval/kl_student_teacher"]["n"] == 2
    scores = {s: json.loads((out / f"tiny/bc/lr{methods['bc']['chosen_lr']:g}/s{s}/metrics.json").read_text())
              for s in (0, 1)}
    kl = [scores[s]["final_eval"]["eval/kl_student_teacher"] for s in (0, 1)]
    assert methods["bc"]["metrics"]["eval/kl_student_teacher"]["mean"] == pytest.approx(np.mean(kl))
    assert "paired" in methods["bc"] and "paired" not in methods["kd"]
    text = (out / "leaderboard.md").read_text()
    assert "| broken | – | failed |" in text and "**at the grid's edge**" in text and "SFT start (of every row)" in text
    assert "Paired per-seed difference to kd" in text and "cache_top_p" in text
    assert (out / "leaderboard_tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_runs_nothing_and_dry_run_plans_the_extension(tiny_benchmark):
    out, data, overrides, _, _ = tiny_benchmark
    before = _mtimes(out)
    proc = _benchmark(out, data, *overrides, suite="tiny_failing")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10 runs: 8 finished, 2 failed, 0 pending" in proc.stdout and "launching" not in proc.stdout
    assert _mtimes(out) == before
    # With one extension allowed, the dry run adds each method's next lr beyond its edge and runs nothing.
    proc = _benchmark(out, data, *overrides, "suite.max_grid_extensions=1", "--dry-run", suite="tiny_failing")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "14 runs: 8 finished, 2 failed, 4 pending" in proc.stdout and "estimated cost of the 4 pending" in proc.stdout
    assert "bc                 0.001, 0.01, 0.1" in proc.stdout
    assert "launching" not in proc.stdout and _mtimes(out) == before
    # --report: the leaderboard of what is finished, the extension's 4 runs counted as pending; nothing runs.
    proc = _benchmark(out, data, *overrides, "suite.max_grid_extensions=1", "--report", suite="tiny_failing")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching" not in proc.stdout and _mtimes(out) == before
    text = (out / "leaderboard.md").read_text()
    assert "Part-run: 4 run(s)" in text and "| bc | – |" not in text  # the provisional choice, at the edge
    assert "(0 of 1 extensions used)" in text
    command = next(line for line in text.splitlines() if line.startswith("Command: "))
    assert "max_grid_extensions=1" in command and "report" not in command  # the command that finishes it
    proc = _benchmark(out, data, *overrides, suite="tiny_failing")  # the full leaderboard again, nothing run
    assert proc.returncode == 0 and "Part-run" not in (out / "leaderboard.md").read_text()
