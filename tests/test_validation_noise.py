"""experiments/validation_noise.py: redrawn validation sets spread one student's scores, and paired differences
of a student with itself are exactly zero on every draw."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from safetensors.torch import save_model

from tokenrl.run.config import make_run_config
from tokenrl.run.inputs import build_student, build_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["task.n_train_prompts=8", "task.n_val_prompts=4", "task.n_test_prompts=4", "task.max_new_tokens=6"]


def test_table_spreads_levels_and_zeroes_self_differences(tmp_path):
    task = {"n_val_prompts": 4, "n_test_prompts": 4, "max_new_tokens": 6}
    cfg = make_run_config({"algo": {"name": "bc"}, "task": task})
    student = build_student(cfg.model, build_task(cfg), seed=0, device="cpu")
    path = tmp_path / "student.safetensors"
    save_model(student, str(path))  # as a run writes it
    cmd = [
        sys.executable, os.path.join(ROOT, "experiments", "validation_noise.py"), "--student", str(path),
        "--versus", str(path), "--replicates", "3", "--heldout", "6:1,6:2", "--sampled", "5:1", *TASK,
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600).stdout
    rows = {
        (m[0], m[1], m[2]): (float(m[3]), float(m[4]))
        for m in re.findall(r"^\| (.+?) \| (\d+) \| (.+?) \| (-?[\d.]+) \| ([\d.]+) \|", out, re.MULTILINE)
    }
    for key in ("teacher-forced kl_student_teacher", "teacher-forced kl_teacher_student"):
        for draws in ("1 held-out", "2 held-out"):
            mean, std = rows[(key, "6", draws)]
            assert mean > 0 and std > 0  # fresh prompts and samples per replicate move the score
            assert rows[(f"{key} (difference)", "6", draws)] == (0.0, 0.0)
    for key in ("val/teacher_nll", "val/rougeL", "val_p0.8/teacher_nll", "val/onpolicy_kl"):
        assert rows[(f"sampled {key}", "5", "1 seeds")][1] > 0
        assert rows[(f"sampled {key} (difference)", "5", "1 seeds")] == (0.0, 0.0)
