"""Issue 20, run directories: a directory belongs to one run (owner record, lock), nothing is written before the
config is checked, and files are readable as the umask says. Real processes of ``experiments/run.py``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from tests.test_resume import _snapshot
from tokenrl.run.checkpoint import ResumeError
from tokenrl.run.config import make_run_config, register_configs
from tokenrl.run.rundir import RunDirError, read_owner
from tokenrl.run.trainer import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
TINY = [
    "task.n_train_prompts=16", "task.samples_per_prompt=1", "task.n_val_prompts=2", "task.n_test_prompts=3",
    "task.max_new_tokens=6", "eval.seeds=[0]", "teacher_eval=false", "progress=false", "threads=1", "batch_size=4",
    "sft_steps=2", "steps=4", "checkpoint_every=2",
]
UMASK = 0o027


def _env(data) -> dict:
    env = dict(os.environ, TOKENRL_DATA_DIR=str(data), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _command(run_dir, *overrides) -> list[str]:
    return [sys.executable, RUN, *TINY, *overrides, f"hydra.run.dir={run_dir}"]


def _run(tmp, run_dir, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(run_dir, *overrides), cwd=tmp, env=_env(tmp / "data"), capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: os.umask(UMASK),
    )


def _config(tmp, *overrides):
    """The run config ``experiments/run.py`` would build from ``TINY`` and ``overrides`` (for in-process runs)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(ROOT, "experiments", "conf")):
        return make_run_config(compose(config_name="config", overrides=[*TINY, *overrides, f"data_dir={tmp / 'data'}"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ``iql_bd`` run, started with umask 027: ``(tmp, run_dir)``."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = _run(tmp, tmp / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, tmp / "run"


def test_another_run_in_a_finished_runs_directory_is_refused_and_changes_nothing(finished):
    """``algo=bc`` in a finished iql_bd run's directory used to exit 0 (its checkpoint rotation deleted that run's
    checkpoints); the same run again overwrote it; ``steps=-1`` (refused at start-up) still overwrote its
    config.yaml."""
    tmp, run_dir = finished
    before = _snapshot(run_dir)
    proc = _run(tmp, run_dir, "steps=-1")
    assert proc.returncode != 0 and "steps=-1: must be >= 0" in proc.stderr
    cases = [
        (["algo=bc"], RunDirError, ["belongs to another run", "algo.name: 'iql_bd' there vs 'bc' here", "owner.json"]),
        ([], RunDirError, ["already holds this run's outputs", "resume=true"]),
        (["algo=bc", "resume=true"], ResumeError, ["algo.name: recorded 'iql_bd' vs requested 'bc'"]),
    ]
    for overrides, error, expected in cases:
        with pytest.raises(error) as err:
            run(_config(tmp, *overrides), str(run_dir))
        assert all(text in str(err.value) for text in expected), (overrides, str(err.value))
    metrics = run(_config(tmp, "resume=true"), str(run_dir))  # the same run, finished: nothing to do
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("text, reason", [('{"identity_sha256": "ab', "Unterminated string"),
                                          ('{"config": {}}', "no identity_sha256 or config")])
def test_a_damaged_owner_record_is_named_with_the_fix(tmp_path, text, reason):
    assert read_owner(str(tmp_path)) is None
    (tmp_path / "owner.json").write_text(text)
    with pytest.raises(RunDirError, match=reason) as err:
        read_owner(str(tmp_path))
    assert str(tmp_path / "owner.json") in str(err.value) and "hydra.run.dir=" in str(err.value)


def test_a_refused_config_writes_nothing_in_a_new_directory(tmp_path):
    """Hydra creates the run directory before any code of the run runs; nothing else may appear in it (Hydra's
    .hydra/ copies are off, its log file opens at the first log line)."""
    proc = _run(tmp_path, tmp_path / "new", "micro_batch_size=0", "eval.val_every_s=-1")
    assert proc.returncode != 0
    assert "micro_batch_size=0" in proc.stderr and "eval.val_every_s=-1" in proc.stderr
    assert os.listdir(tmp_path / "new") == []


def test_outputs_are_readable_as_the_umask_says(finished):
    """safetensors files (shards, checkpoints, the student) were written 0600 whatever the umask."""
    tmp, run_dir = finished
    found = set()
    for top in (run_dir, tmp / "data"):
        for base, folders, files in os.walk(top):
            for name in folders + files:
                path = os.path.join(base, name)
                mode = stat.S_IMODE(os.stat(path).st_mode)
                expected = (0o777 if os.path.isdir(path) else 0o666) & ~UMASK
                assert mode == expected, (path, oct(mode))
                found.add(os.path.splitext(name)[1])
    assert {".safetensors", ".json", ".yaml"} <= found


def test_two_processes_cannot_write_one_run_directory_and_a_dead_holders_lock_is_free(tmp_path):
    """Two runs started at once in one directory both exited 0, the later one's outputs over the earlier's."""
    run_dir = tmp_path / "run"
    long_sft = ("sft_steps=1000000", "checkpoint_seconds=0", "checkpoint_every=0")
    first = subprocess.Popen(
        _command(run_dir, *long_sft), cwd=tmp_path, env=_env(tmp_path / "data"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "owner.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-3000:]
        with pytest.raises(RunDirError) as err:  # this test's process, the same run
            run(_config(tmp_path, *long_sft), str(run_dir))
        assert f"is in use by pid {first.pid} on" in str(err.value) and str(run_dir / ".owner.lock") in str(err.value)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the killed process's lock. Its run left no checkpoint, so another run may take the
    # directory over (resume=true of the killed run's own config would start it again).
    run(_config(tmp_path), str(run_dir))
    owner = json.loads((run_dir / "owner.json").read_text())
    assert owner["config"]["sft_steps"] == 2 and owner["resumes"] == []
