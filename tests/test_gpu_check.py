"""The prepared GPU check (benchmarks/gpu_check.sh) runs end to end on the CPU (--cpu-dry-run), so it cannot rot
between the sessions that have a GPU; and it stops at once, naming the package and the fix, when one is missing."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["## Machine", "## CUDA tests (TOKENRL_TEST_DEVICE=cpu)", "## Training step cost", "## Teacher-data generation",
            "## One-process torchrun", "## README main job", "## Stages"]


def test_cpu_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--budget", "900", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    text = out.read_text()
    assert done.returncode == 0, done.stderr[-3000:] + text[-3000:]
    assert "FAILED" not in text
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    stages = text.split("## Stages")[1]
    for stage in ("preflight", "cuda-tests", "steps", "generate", "torchrun", "main-job", "main-job-table"):
        assert f"| {stage} | ok |" in stages
    # Every step variant and generation variant has its row at both shapes.
    assert text.count("| iql_bd default (sparse, q_shift=set, ce_coef=1) |") == 2
    assert "| tokenrl sampler + top-p cache (generate.py) |" in text
    assert "fsdp: accumulated update" in text
    assert " passed, 2 deselected" in text.split("## CUDA tests")[1].split("##")[0]  # all but the compile tests


def test_preflight_names_a_missing_package_and_the_fix(monkeypatch, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    monkeypatch.setitem(gpu_check.REQUIRED, "tokenrl_no_such_module", "no-such-dist")
    args = argparse.Namespace(out=str(tmp_path / "out.md"), cpu_dry_run=True, peak_tflops=None)
    assert gpu_check.stage_preflight(args) == 2
    message = capsys.readouterr().err
    assert "no-such-dist" in message and "--download-wheels" in message and "--wheels" in message
    assert not (tmp_path / "out.md").exists()


@pytest.mark.parametrize("name, expected", [("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peak_table_matches_device_names(name, expected):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    assert next(peak for key, peak in gpu_check.PEAK_BF16_TFLOPS.items() if key in name) == expected
