"""A run killed mid-training and resumed from its checkpoint ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from algorithms.iql_bd import BellmanDistill
from tokenrl.checkpoint import list_checkpoints
from tokenrl.config import make_run_config, register_configs
from tokenrl.trainer import run

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "conf")


def _cfg(tmp_path, *extra):
    register_configs()
    overrides = [
        "algo=iql_bd", "steps=6", "checkpoint_every=2", "sft_steps=2", "batch_size=4",
        "task.n_train_prompts=16", "task.samples_per_prompt=1", "task.n_val_prompts=2", "task.n_test_prompts=3",
        "task.max_new_tokens=6", "eval.seeds=[0]", "progress=false", f"data_dir={tmp_path / 'data'}", *extra,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return make_run_config(compose(config_name="config", overrides=overrides))


class Killed(RuntimeError):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    run(cfg, str(tmp_path / "straight"))

    calls = {"n": 0}
    original = BellmanDistill.update

    def dying_update(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 4
            raise Killed("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(BellmanDistill, "update", dying_update)
    with pytest.raises(Killed):
        run(cfg, str(tmp_path / "killed"))
    assert [step for step, _ in list_checkpoints(str(tmp_path / "killed"))] == [4, 2]
    monkeypatch.setattr(BellmanDistill, "update", original)
    resumed = run(_cfg(tmp_path, "resume=true"), str(tmp_path / "killed"))

    a = load_file(tmp_path / "straight" / "student.safetensors")
    b = load_file(tmp_path / "killed" / "student.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["train"]["steps"] == 6
