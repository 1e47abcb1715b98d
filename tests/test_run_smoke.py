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
    "task.corpus_sequences=24",
    "task.corpus_max_tokens=8",
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
    assert "algo.top_p=1.5: must be in (0, 1]" in proc.stderr + proc.stdout


STAGE_KEYS = ("time/rollout_s", "time/teacher_score_s", "time/batch_s", "time/update_s")


def _check_onpolicy_run(job, n_train_prompts=24):
    metrics = json.loads((job / "metrics.json").read_text())
    rollouts = metrics["rollouts"]
    # steps=6, rollout_every=3, rollout_prompts=4: collections at steps 0 and 3.
    assert rollouts["rollout/collections"] == 2 and rollouts["rollout/trajectories"] == 8
    assert rollouts["rollout/buffer_size"] == n_train_prompts + 8  # samples_per_prompt=1 teacher rows + rollouts
    for key in STAGE_KEYS:
        assert metrics["train"][key] > 0, key
    for key in ("final_eval", "sft_eval", "init_eval"):
        assert metrics[key]["eval/onpolicy_kl"] > 0 and "eval/kl_student_teacher" in metrics[key]
    assert metrics["teacher_eval"]["eval/onpolicy_kl"] == 0.0
    clocks = [v["train_clock_s"] for v in metrics["validation"]]
    assert len(clocks) >= 2 and clocks == sorted(clocks) and metrics["validation"][-1]["step"] == 6
    assert "val/onpolicy_kl" in metrics["validation"][-1] and "val/rougeL" in metrics["validation"][-1]
    return metrics


ONPOLICY = ["steps=6", "rollout_every=3", "rollout_prompts=4", "sft_steps=2", "eval.val_every_s=0.5"]


def test_minillm_and_gkd_runs_collect_rollouts_in_timed_stages(tmp_path):
    _, out = _run(tmp_path, "algo=minillm,gkd", *ONPOLICY, multirun=True)
    jobs = sorted(d for d in out.iterdir() if (d / "metrics.json").exists())
    stats = {m["algo"]: m["train"]["last_stats"] for m in map(_check_onpolicy_run, jobs)}
    assert stats["minillm"]["data/student_frac"] == 1.0  # every row from the newest rollouts
    assert stats["gkd"]["data/student_frac"] == 0.5  # lmbda = 0.5 of batch_size = 4


def test_online_sqil_run_collects_rollouts(tmp_path):
    _, out = _run(tmp_path, "algo=soft_q", "algo.reward=sqil", *ONPOLICY)
    _check_onpolicy_run(out)
