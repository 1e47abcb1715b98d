"""Checkpoints and resume (issue 9): a killed run resumes bit-identically, whatever the moment of the kill;
a damaged checkpoint falls back to the previous one; resume refuses another config, a missing checkpoint and
a finished run; SIGTERM checkpoints; a diverging run stops after saving its last good state."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from algorithms.iql_bd import BellmanDistill
from tests.conftest import algo_options
from tokenrl.run.checkpoint import (
    WRITE_DELAY_ENV,
    CheckpointError,
    ResumeError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tokenrl.run.config import make_run_config
from tokenrl.core.divergence import DivergenceError
from tokenrl.run.trainer import run


def _config(data_dir, **top) -> dict:
    base = {
        "algo": {"name": "iql_bd"}, "steps": 6, "checkpoint_every": 2, "sft_steps": 2, "batch_size": 4,
        "task": {"n_train_prompts": 16, "samples_per_prompt": 1, "n_val_prompts": 2, "n_test_prompts": 3, "max_new_tokens": 6},
        "eval": {"seeds": [0]}, "teacher_eval": False, "progress": False, "data_dir": str(data_dir),
    }
    return {**base, **top}


def _cfg(data_dir, **top):
    return make_run_config(_config(data_dir, **top))


def _snapshot(directory) -> dict[str, tuple[bytes, int]]:
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def _assert_same_student(a_dir, b_dir):
    a = load_file(os.path.join(a_dir, "student.safetensors"))
    b = load_file(os.path.join(b_dir, "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_metrics(a: dict, b: dict):
    for key in ("final_eval", "sft_eval", "init_eval", "algo", "seed"):
        assert a.get(key) == b.get(key), key
    assert a["train"]["steps"] == b["train"]["steps"] and a["train"]["last_stats"] == b["train"]["last_stats"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: ``(data_dir, out_dir, metrics)``."""
    root = tmp_path_factory.mktemp("straight")
    metrics = run(_cfg(root / "data"), str(root / "run"))
    return root / "data", root / "run", metrics


class Killed(RuntimeError):
    pass


def _kill_at_update(monkeypatch, n: int, action):
    calls = {"n": 0}
    original = BellmanDistill.update

    def update(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(self, batch)

    monkeypatch.setattr(BellmanDistill, "update", update)
    return original


def _raise_killed():
    raise Killed("simulated kill")


def test_checkpoint_round_trip_keeps_types_and_values(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied, as embeddings often are: safetensors refuses shared storage
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "model": model.state_dict(), "rng": torch.get_rng_state(), "step": 3,
             "history": {"loss/total": [1.5, float("inf")]}}
    path = save_checkpoint(str(tmp_path), state, 3, keep=2)
    loaded = load_checkpoint(path)
    assert set(loaded["optimizer"]["state"]) == {0, 1, 2}  # parameter indices stay ints: AdamW matches them by key
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["history"] == state["history"] and loaded["step"] == 3
    for step in (5, 7):
        save_checkpoint(str(tmp_path), state, step, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [7, 5]  # keep the last k


def test_resume_after_kill_is_bit_identical_and_a_damaged_checkpoint_falls_back(straight, tmp_path, monkeypatch):
    data, straight_dir, straight_metrics = straight
    out = tmp_path / "killed"
    original = _kill_at_update(monkeypatch, 5, _raise_killed)  # after the checkpoint at step 4
    with pytest.raises(Killed):
        run(_cfg(data), str(out))
    monkeypatch.setattr(BellmanDistill, "update", original)
    checkpoints = list_checkpoints(str(out))
    assert [step for step, _ in checkpoints] == [4, 2]
    # 256 overwritten bytes in the newest checkpoint used to give a completed run with changed results.
    newest = checkpoints[0][1]
    with open(newest, "r+b") as f:
        f.seek(os.path.getsize(newest) // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes())
    orphan = out / "checkpoints" / "step-00000006.safetensors.tmp-999999999"
    orphan.write_bytes(b"left by a killed writer")
    with pytest.warns(UserWarning, match="step-00000004.safetensors fails verification"):
        resumed = run(_cfg(data, resume=True), str(out))
    assert os.path.exists(newest + ".damaged") and not orphan.exists()
    _assert_same_student(straight_dir, out)
    _assert_same_metrics(straight_metrics, resumed)


def test_sigterm_writes_a_checkpoint_then_resume_is_bit_identical(straight, tmp_path, monkeypatch):
    data, straight_dir, straight_metrics = straight
    out = tmp_path / "terminated"
    original = _kill_at_update(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at step 3"):
        run(_cfg(data), str(out))
    monkeypatch.setattr(BellmanDistill, "update", original)
    assert [step for step, _ in list_checkpoints(str(out))] == [3, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only installed while training
    _assert_same_metrics(straight_metrics, run(_cfg(data, resume=True), str(out)))
    _assert_same_student(straight_dir, out)


def test_resume_with_pre_training_batches_is_bit_identical(tmp_path, monkeypatch):
    """An algorithm that draws a corpus batch with every batch (iql_bd_math: its LM term on the corpus) resumes
    bit-identically too: the corpus rows come from the checkpointed batch generator."""
    overrides = {
        "algo": algo_options("iql_bd_math"),
        "task": {**_config("")["task"], "corpus_sequences": 16, "corpus_max_tokens": 6},
    }
    data = tmp_path / "data"
    straight = run(_cfg(data, **overrides), str(tmp_path / "straight"))
    original = _kill_at_update(monkeypatch, 5, _raise_killed)  # after the checkpoint at step 4
    with pytest.raises(Killed):
        run(_cfg(data, **overrides), str(tmp_path / "killed"))
    monkeypatch.setattr(BellmanDistill, "update", original)
    resumed = run(_cfg(data, resume=True, **overrides), str(tmp_path / "killed"))
    assert "loss/lm" in resumed["train"]["last_stats"] and resumed["corpus"]["corpus/cached"]
    _assert_same_student(tmp_path / "straight", tmp_path / "killed")
    _assert_same_metrics(straight, resumed)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"algo": {"name": "kd"}}, "algo.name: checkpoint 'iql_bd' vs requested 'kd'"),
        ({"seed": 5}, "seed: checkpoint 0 vs requested 5"),
        ({"task": {**_config("")["task"], "samples_per_prompt": 2}}, "task.samples_per_prompt"),
    ],
)
def test_resume_refuses_a_changed_config(straight, change, named):
    data, straight_dir, _ = straight
    before = _snapshot(straight_dir)
    with pytest.raises(ResumeError) as err:
        run(_cfg(data, resume=True, steps=8, **change), str(straight_dir))
    assert named in str(err.value) and "steps" not in str(err.value).split("(only")[0]
    assert _snapshot(straight_dir) == before


def test_resume_without_checkpoint_says_where_it_looked(straight, tmp_path):
    data, _, _ = straight
    with pytest.raises(CheckpointError) as err:
        run(_cfg(data, resume=True), str(tmp_path / "mistyped"))
    assert str(tmp_path / "mistyped" / "checkpoints") in str(err.value) and "hydra.run.dir" in str(err.value)
    assert not (tmp_path / "mistyped").exists()


def test_resuming_a_finished_run_changes_nothing(straight, capsys):
    data, straight_dir, straight_metrics = straight
    before = _snapshot(straight_dir)
    metrics = run(_cfg(data, resume=True), str(straight_dir))
    assert "already finished" in capsys.readouterr().out
    assert metrics == json.loads((straight_dir / "metrics.json").read_text())
    assert metrics["train"]["last_stats"] == straight_metrics["train"]["last_stats"]
    assert _snapshot(straight_dir) == before


def test_divergence_stops_after_saving_the_last_good_state(straight, tmp_path):
    """algo.lr=1e3 algo.grad_clip=0 used to finish with exit 0 and a uniform student."""
    data, _, _ = straight
    overrides = dict(algo={"name": "iql_bd", "lr": 1e3, "grad_clip": 0.0}, steps=5, sft_steps=0, init_eval=False)
    with pytest.raises(DivergenceError) as err:
        run(_cfg(data, **overrides), str(tmp_path / "stop"))
    message = str(err.value)
    assert "loss/total" in message and "at update 2" in message and "algo.lr" in message
    assert err.value.term == "loss/total"
    assert [step for step, _ in list_checkpoints(str(tmp_path / "stop"))] == [1]
    assert not (tmp_path / "stop" / "metrics.json").exists()

    metrics = run(_cfg(data, on_divergence="skip", **overrides), str(tmp_path / "skip"))
    assert metrics["train"]["skipped_steps"] >= 1
    assert metrics["train"]["last_stats"]["train/skipped_steps"] == metrics["train"]["skipped_steps"]


def _newest_step(out) -> int:
    found = list_checkpoints(str(out))
    return found[0][0] if found else -1


def _tmp_files(out) -> list[str]:
    directory = out / "checkpoints"
    return [n for n in os.listdir(directory) if ".tmp-" in n] if directory.exists() else []


def _child_run(config: dict, out: str) -> None:
    os.environ[WRITE_DELAY_ENV] = "0.1"  # widens the write so that kills land inside it
    run(make_run_config(config), out)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Several runs killed with SIGKILL (one inside a checkpoint write), each resumed, end as one straight run.

    The runs are forked from the test process (already past its imports), so each costs only its training.
    """
    config = _config(tmp_path / "data", steps=16, checkpoint_every=1, keep_checkpoints=2, init_eval=False)
    straight_metrics = run(make_run_config(config), str(tmp_path / "straight"))
    out = tmp_path / "killed"
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills, killed_in_write = 0, 0
    for attempt in range(8):
        proc = fork.Process(target=_child_run, args=({**config, "resume": _newest_step(out) >= 0}, str(out)))
        proc.start()
        if kills == 3:
            proc.join(timeout=600)
            assert proc.exitcode == 0
            break
        start = _newest_step(out)
        while proc.is_alive() and _newest_step(out) <= start:
            time.sleep(0.01)
        if kills == 1:  # this kill lands inside a checkpoint write: its temporary file is already on disk
            while proc.is_alive() and not _tmp_files(out):
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        if not proc.is_alive():  # finished before the kill: the run is complete
            assert proc.exitcode == 0
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
        killed_in_write += bool(_tmp_files(out))
    assert kills == 3 and killed_in_write >= 1
    assert not _tmp_files(out)  # the orphans of killed writers were removed
    _assert_same_student(tmp_path / "straight", out)
    _assert_same_metrics(straight_metrics, json.loads((out / "metrics.json").read_text()))


def test_checkpoint_writes_tensors_in_place_and_copies_only_what_safetensors_refuses(tmp_path):
    """Whole contiguous tensors are written from their own memory (no second copy of the state while writing);
    tied, view and non-contiguous tensors are copied and still round-trip."""
    from tokenrl.run.checkpoint import _writable

    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "whole": base,
        "tied": base,  # shares storage with "whole" (tied embeddings)
        "row": base[1],  # a view of a larger storage
        "transposed": base.t(),  # not contiguous
        "moment": torch.randn(5, dtype=torch.float64),
        "step": torch.tensor(3.0),
        "empty": torch.zeros(0),
    }
    writable = _writable(dict(state))
    assert writable["moment"] is state["moment"] and writable["step"] is state["step"]
    ptrs = [t.untyped_storage().data_ptr() for t in writable.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # no two written tensors share memory
    path = save_checkpoint(str(tmp_path), state, step=1, keep=1)
    loaded = load_checkpoint(path)
    for key, tensor in state.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
