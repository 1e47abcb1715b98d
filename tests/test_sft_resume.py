"""Issue 20, the SFT warm start as protected as training: its cache is verified on every load and a damaged one is
named; SFT checkpoints on SIGTERM/SIGINT and every ``checkpoint_every``; a killed SFT resumes bit-identically."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest

from algorithms.bc import BC
from tests.test_resume import _assert_same_metrics, _assert_same_student
from tokenrl.run.checkpoint import list_checkpoints
from tokenrl.run.config import make_run_config
from tokenrl.run.selection import sft_cache_path
from tokenrl.run.inputs import build_task, data_location
from tokenrl.run.trainer import run
from tokenrl.tasks.manifest import DataIntegrityError


def _config(data_dir, **top) -> dict:
    base = {
        "algo": {"name": "iql_bd"}, "steps": 2, "sft_steps": 8, "batch_size": 4, "checkpoint_every": 2,
        "selection": {"sft_eval_every": 2, "sft_patience": 10},  # validations and best weights inside the SFT loop
        "task": {"n_train_prompts": 16, "samples_per_prompt": 1, "n_val_prompts": 2, "n_test_prompts": 3, "max_new_tokens": 6},
        "eval": {"seeds": [0]}, "teacher_eval": False, "progress": False, "data_dir": str(data_dir),
    }
    return {**base, **top}


def _cfg(data_dir, **top):
    return make_run_config(_config(data_dir, **top))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: ``(data_dir, out_dir, metrics)``."""
    root = tmp_path_factory.mktemp("straight_sft")
    metrics = run(_cfg(root / "data"), str(root / "run"))
    return root / "data", root / "run", metrics


def _assert_same_sft(a: dict, b: dict) -> None:
    assert a["sft"] == b["sft"] and a["sft_eval"] == b["sft_eval"]


def test_sigterm_during_sft_writes_a_checkpoint_and_resume_is_bit_identical(straight, tmp_path, monkeypatch):
    """SIGTERM during a long SFT saved nothing, and the resume said "no checkpoint"."""
    data, straight_dir, straight_metrics = straight
    out = tmp_path / "terminated"
    original, calls = BC.compute_loss, {"n": 0}

    def compute_loss(self, batch):  # one micro-batch per update here
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(BC, "compute_loss", compute_loss)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at SFT step 5"):
        run(_cfg(data), str(out))
    monkeypatch.setattr(BC, "compute_loss", original)
    assert [step for step, _ in list_checkpoints(str(out), "sft")] == [5, 4, 2]
    assert list_checkpoints(str(out)) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = run(_cfg(data, resume=True), str(out))
    _assert_same_sft(straight_metrics, resumed)
    _assert_same_metrics(straight_metrics, resumed)
    _assert_same_student(straight_dir, out)
    assert resumed["resumes"] == [{"from_step": 0, "from_sft_step": 5, "changed": {}, "schedule_steps": 2}]
    assert list_checkpoints(str(out), "sft") == []  # the algorithm's step-0 checkpoint replaced them


def _child_run(config: dict, out: str) -> None:
    run(make_run_config(config), out)


def test_sigkill_during_sft_then_resume_equals_an_uninterrupted_run(straight, tmp_path):
    """A run killed with SIGKILL after its first SFT checkpoint (every 2 SFT steps) resumes from it."""
    data, straight_dir, straight_metrics = straight
    out = tmp_path / "killed"
    config = {**_config(data), "sft_steps": 8}
    proc = multiprocessing.get_context("fork").Process(target=_child_run, args=(config, str(out)))
    proc.start()
    deadline = time.monotonic() + 300
    while proc.is_alive() and not list_checkpoints(str(out), "sft") and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.is_alive()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    newest = list_checkpoints(str(out), "sft")[0][0]
    assert newest < 8 and list_checkpoints(str(out)) == []
    resumed = run(_cfg(data, resume=True), str(out))
    assert resumed["resumes"][0]["from_sft_step"] == newest
    _assert_same_sft(straight_metrics, resumed)
    _assert_same_metrics(straight_metrics, resumed)
    _assert_same_student(straight_dir, out)


def _flip_bit(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)  # inside the tensors
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_bit, _truncate])
def test_a_damaged_sft_cache_is_refused_naming_it_and_the_fix_restores_it(tmp_path, damage):
    """One flipped bit in the SFT cache gave exit 0, "cached": true and other results; a truncated cache an
    ``OSError: [Errno 22]`` without the file's name."""
    data = tmp_path / "data"
    top = {"selection": {"sft_cache": True}, "checkpoint_every": 0}
    first = run(_cfg(data, **top), str(tmp_path / "first"))
    cfg = _cfg(data, **top)
    path = sft_cache_path(cfg, build_task(cfg), data_location(cfg, build_task(cfg)))
    assert not first["sft"]["cached"] and os.path.exists(path)
    damage(path)
    with pytest.raises(DataIntegrityError) as err:
        run(_cfg(data, algo={"name": "kd"}, **top), str(tmp_path / "second"))
    assert f"SFT start {path} fails verification" in str(err.value) and "delete it and rerun" in str(err.value)
    os.remove(path)  # the fix: the next run trains the start again, identically, and caches it
    again = run(_cfg(data, **top), str(tmp_path / "third"))
    assert not again["sft"]["cached"] and again["sft_eval"] == first["sft_eval"]
    cached = run(_cfg(data, algo={"name": "kd"}, **top), str(tmp_path / "fourth"))
    assert cached["sft"]["cached"] and cached["sft_eval"] == first["sft_eval"]
    assert json.loads((tmp_path / "fourth" / "metrics.json").read_text())["sft"]["cached"]
