"""Subprocess smoke run of experiments/run.py per registered algorithm (tiny step counts), and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from algorithms import REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "steps=4",
    "batch_size=4",
    "task.n_train_prompts=24",
    "task.samples_per_prompt=1",
    "task.n_val_prompts=4",
    "task.n_test_prompts=6",
    "task.max_new_tokens=8",
    "eval.seeds=[0]",
    "progress=false",
    "log_every=1",
]


def _run(tmp_path, *overrides, check=True, multirun=False):
    env = dict(os.environ, TOKENRL_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    out = tmp_path / ("multirun" if multirun else "run")
    where = [f"hydra.sweep.dir={out}", "-m"] if multirun else [f"hydra.run.dir={out}"]
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), *TINY, *overrides, *where]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_multirun_over_every_algorithm_writes_artifacts(tmp_path):
    """One Hydra multirun (a subprocess) runs each registered algorithm end to end."""
    algos = sorted(REGISTRY)
    proc, out = _run(tmp_path, f"algo={','.join(algos)}", "sft_steps=2", multirun=True)
    job_dirs = sorted(d for d in out.iterdir() if (d / "metrics.json").exists())
    assert len(job_dirs) == len(algos)
    seen = set()
    for job in job_dirs:
        metrics = json.loads((job / "metrics.json").read_text())
        seen.add(metrics["algo"])
        for key in ("final_eval", "init_eval", "teacher_eval", "sft_eval"):
            assert "eval/teacher_nll" in metrics[key]
        assert metrics["train"]["steps"] == 4
        assert (job / "student.safetensors").exists() and (job / "student" / "config.json").exists()
        assert (job / "config.yaml").exists() and (job / "checkpoints" / "step-00000004.safetensors").exists()
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(job / "tb"))
    assert seen == set(algos)
    assert proc.stdout.count("teacher_nll") >= len(algos)  # each job prints its summary


def test_second_run_reuses_cached_data_and_resume_continues(tmp_path):
    _run(tmp_path, "algo=bc")
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert first["data"]["data/cached"] is False
    proc, out = _run(tmp_path, "algo=bc", "steps=6", "resume=true")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["data/cached"] is True
    assert metrics["train"]["steps"] == 6
    assert "init_eval" in metrics  # carried over from the interrupted run's state


def test_bad_override_names_the_problem(tmp_path):
    proc, _ = _run(tmp_path, "algo=iql_bd", "algo.top_p=1.5", check=False)
    assert proc.returncode != 0
    assert "p must be in (0, 1]" in proc.stderr + proc.stdout
