"""Checkpoints and resume (issue 9): a killed run resumes bit-identically, whatever the moment of the kill;
a damaged checkpoint falls back to the previous one; resume refuses another config, a missing checkpoint and
a finished run; SIGTERM checkpoints; a diverging run stops after saving its last good state."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from algorithms.iql_bd import BellmanDistill
from tests.conftest import algo_options
from tokenrl.run.checkpoint import (
    deferred_signals,
    WRITE_DELAY_ENV,
    CheckpointError,
    ResumeError,
    checkpoint_path,
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
    """Run ``action`` when the algorithm's ``n``-th update asks for its loss (one micro-batch per update here)."""
    calls = {"n": 0}
    original = BellmanDistill.compute_loss

    def compute_loss(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(self, batch)

    monkeypatch.setattr(BellmanDistill, "compute_loss", compute_loss)
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
    monkeypatch.setattr(BellmanDistill, "compute_loss", original)
    checkpoints = list_checkpoints(str(out))
    assert [step for step, _ in checkpoints] == [4, 2, 0]  # step 0: the start of training
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
    monkeypatch.setattr(BellmanDistill, "compute_loss", original)
    assert [step for step, _ in list_checkpoints(str(out))] == [3, 2, 0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only installed while training
    _assert_same_metrics(straight_metrics, run(_cfg(data, resume=True), str(out)))
    _assert_same_student(straight_dir, out)


def test_a_signal_the_block_does_not_act_on_is_delivered_again():
    """deferred_signals records a signal; when its block ends without acting on it (no KeyboardInterrupt), the
    signal goes on to the handler that was there before (an enclosing block, the default) instead of vanishing."""
    outer: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: outer.append(signum))
    try:
        with deferred_signals((signal.SIGUSR1,)) as received:
            signal.raise_signal(signal.SIGUSR1)
            assert received == [signal.SIGUSR1] and outer == []
        assert outer == [signal.SIGUSR1]
        with pytest.raises(KeyboardInterrupt), deferred_signals((signal.SIGUSR1,)) as received:
            signal.raise_signal(signal.SIGUSR1)
            raise KeyboardInterrupt  # the block acted on it: checkpointed and stopped
        assert outer == [signal.SIGUSR1]
        with deferred_signals((signal.SIGUSR1,)) as enclosing:
            with deferred_signals((signal.SIGUSR1,)):
                signal.raise_signal(signal.SIGUSR1)
            assert enclosing == [signal.SIGUSR1]
            enclosing.clear()
        assert outer == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_while_the_warm_start_reads_its_cache_stops_the_run(tmp_path, monkeypatch):
    """A SIGINT that arrives while the SFT start is read from the cache (no SFT update to check it after) stops
    the run before its first update instead of being dropped with the warm start's signal handler."""
    from tokenrl.run import selection

    data, cached = tmp_path / "data", {"selection": {"sft_cache": True}}
    assert not run(_cfg(data, **cached), str(tmp_path / "caches"))["sft"]["cached"]
    original = selection.read_sft_start

    def read_and_interrupt(path):
        signal.raise_signal(signal.SIGINT)
        return original(path)

    monkeypatch.setattr(selection, "read_sft_start", read_and_interrupt)
    out = tmp_path / "interrupted"
    # Python's own SIGINT handler, as in an interactive or foreground process (a job a non-interactive shell puts
    # in the background starts with SIGINT ignored, and an ignored signal stays ignored: see the next test).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(data, **cached), str(out))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not list_checkpoints(str(out)) and not (out / "metrics.json").exists()


def test_an_ignored_signal_stays_ignored():
    """A signal the process ignores (SIG_IGN, e.g. SIGINT of a background job) is not caught by deferred_signals:
    it neither stops the run nor is recorded, and the block leaves it ignored."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with deferred_signals((signal.SIGUSR1,)) as received:
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            signal.raise_signal(signal.SIGUSR1)
        assert received == [] and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


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
    monkeypatch.setattr(BellmanDistill, "compute_loss", original)
    resumed = run(_cfg(data, resume=True, **overrides), str(tmp_path / "killed"))
    assert "loss/lm" in resumed["train"]["last_stats"] and resumed["corpus"]["corpus/cached"]
    _assert_same_student(tmp_path / "straight", tmp_path / "killed")
    _assert_same_metrics(straight, resumed)


def test_resume_with_best_checkpoint_selection_is_bit_identical(straight, tmp_path, monkeypatch):
    """selection.every: the best checkpoint so far (its scores and weights) is in the train state, so a run killed
    after the checkpoint that holds its best step resumes to the same selection, student and metrics."""
    data, _, _ = straight
    # lr 0.1 makes the last validation the worst: the chosen weights are the ones the checkpoint at step 4 holds.
    overrides = {"algo": {"name": "iql_bd", "lr": 0.1}, "selection": {"every": 2}, "init_eval": False}
    straight_metrics = run(_cfg(data, **overrides), str(tmp_path / "straight"))
    assert straight_metrics["selection"]["best_step"] == 4
    original = _kill_at_update(monkeypatch, 5, _raise_killed)  # after the checkpoint at step 4
    with pytest.raises(Killed):
        run(_cfg(data, **overrides), str(tmp_path / "killed"))
    monkeypatch.setattr(BellmanDistill, "compute_loss", original)
    resumed = run(_cfg(data, resume=True, **overrides), str(tmp_path / "killed"))
    _assert_same_student(tmp_path / "straight", tmp_path / "killed")
    _assert_same_metrics(straight_metrics, resumed)
    assert [step for step, _ in resumed["selection"]["history"]] == [0, 2, 4, 6]
    for key in ("selection", "sft"):
        assert resumed[key] == straight_metrics[key], key


@pytest.mark.parametrize(
    "change, named",
    [
        ({"algo": {"name": "kd"}}, "algo.name: recorded 'iql_bd' vs requested 'kd'"),
        ({"seed": 5}, "seed: recorded 0 vs requested 5"),
        ({"task": {**_config("")["task"], "samples_per_prompt": 2}}, "task.samples_per_prompt"),
    ],
)
def test_resume_refuses_a_changed_config(straight, change, named):
    data, straight_dir, _ = straight
    before = _snapshot(straight_dir)
    with pytest.raises(ResumeError) as err:
        run(_cfg(data, resume=True, steps=8, **change), str(straight_dir))
    assert named in str(err.value) and "steps" not in str(err.value).split("(only")[0]
    assert str(straight_dir / "owner.json") in str(err.value)
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


def _max_abs_weight(checkpoint: str) -> float:
    return max(float(t.abs().max()) for t in load_checkpoint(checkpoint)["algo"]["policy"].values())


def test_an_update_that_wrecks_the_weights_stops_at_the_last_good_state_and_the_fix_resumes(straight, tmp_path):
    """algo.lr=1e9: the first update's loss and gradient norm look ordinary, its weights do not (max|w| ~ 1e9).
    It used to pass the guard, and the checkpoint then saved as "the last good state (step 1)" held those weights;
    on_divergence=skip went on to skip 29 of 30 updates and exit 0 with them; the fixes the message suggested were
    refused by resume."""
    data, straight_dir, straight_metrics = straight
    out = tmp_path / "lr1e9"
    wrecking = dict(algo={"name": "iql_bd", "lr": 1e9}, checkpoint_every=1)
    for on_divergence in ("skip", "stop"):  # skip cannot undo an update already applied: both stop
        shutil.rmtree(out, ignore_errors=True)
        with pytest.raises(DivergenceError) as err:
            run(_cfg(data, on_divergence=on_divergence, **wrecking), str(out))
        message = str(err.value)
        assert err.value.term == "weights/norm" and "after update 1" in message
        assert str(checkpoint_path(str(out), 0)) in message and "(the start of training)" in message
        assert "resume=true" in message and "algo.lr=1e+08" in message
        assert ("cannot undo" in message) == (on_divergence == "skip")
        assert [step for step, _ in list_checkpoints(str(out))] == [0]  # nothing after the sign is saved
        assert not (out / "metrics.json").exists()
    assert _max_abs_weight(checkpoint_path(str(out), 0)) < 10  # the start: the SFT weights
    # The suggested fix (a lower lr) is accepted by resume, takes effect from the last good state as if the run
    # had started with it, and is recorded.
    resumed = run(_cfg(data, resume=True, checkpoint_every=1), str(out))
    _assert_same_student(straight_dir, out)
    _assert_same_metrics(straight_metrics, resumed)
    assert resumed["resumes"] == [{"from_step": 0, "changed": {"algo.lr": [1e9, 1e-3]}, "schedule_steps": 6}]
    assert json.loads((out / "owner.json").read_text())["resumes"][0]["changed"] == {"algo.lr": [1e9, 1e-3]}


def test_skip_stops_past_its_budget_and_sets_aside_the_checkpoints_after_the_first_skip(straight, tmp_path, monkeypatch):
    """From update 5 on every loss spikes: skip drops updates 5, 6 and 7, and the third is more than
    max_skipped_fraction=0.1 of 20. The checkpoints written after the first skip are set aside; rotation
    (keep_checkpoints=2) kept the last one before it."""
    data, _, _ = straight
    original = BellmanDistill.compute_loss
    calls = {"n": 0}

    def spiking(self, batch):
        loss, stats = original(self, batch)
        calls["n"] += 1
        return (loss * 1e4 if calls["n"] > 4 else loss), stats

    monkeypatch.setattr(BellmanDistill, "compute_loss", spiking)
    out = tmp_path / "skip"
    cfg = _cfg(data, steps=30, checkpoint_every=1, keep_checkpoints=2, on_divergence="skip")
    with pytest.raises(DivergenceError) as err:
        run(cfg, str(out))
    message = str(err.value)
    assert "dropped 3 of the 7 updates" in message and "max_skipped_fraction=0.1" in message
    assert str(checkpoint_path(str(out), 4)) in message and "renamed *.diverged" in message
    assert [step for step, _ in list_checkpoints(str(out))] == [4]
    assert sorted(p.name for p in (out / "checkpoints").glob("*.diverged")) == [
        "step-00000005.safetensors.diverged", "step-00000006.safetensors.diverged",
    ]
    assert load_checkpoint(checkpoint_path(str(out), 4))["guard"]["first_skip"] is None


def test_resume_with_more_steps_keeps_the_schedule_length_and_records_it(straight, tmp_path):
    """Resuming with more steps used to re-stretch the cosine schedule mid-run (the lr jumped back up)."""
    data, _, _ = straight
    out = tmp_path / "extend"
    algo = {"name": "iql_bd", "warmup_steps": 0}
    run(_cfg(data, algo=algo, steps=4, checkpoint_every=1), str(out))
    metrics = run(_cfg(data, algo=algo, steps=6, checkpoint_every=1, resume=True), str(out))
    assert metrics["resumes"] == [{"from_step": 4, "changed": {"steps": [4, 6]}, "schedule_steps": 4}]
    for step in (5, 6):  # past the schedule's end: its floor, min_lr_ratio * lr (re-stretched: 1.6e-4 at step 5)
        scheduler = load_checkpoint(checkpoint_path(str(out), step))["algo"]["scheduler"]
        assert scheduler["_last_lr"][0] == pytest.approx(1e-3 * 0.1, rel=1e-12)


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
