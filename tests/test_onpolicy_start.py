"""experiments/onpolicy_start.py on a tiny task: both studies run from one shared SFT start, resume without rerunning,
and print their tables; the floor mass is the teacher's exact smoothing share on its own samples."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import load_experiment

ops = load_experiment("onpolicy_start")
TINY = [
    "steps=4", "sft_steps=4", "batch_size=4", "rollout_every=2", "rollout_prompts=4", "task.n_train_prompts=24",
    "task.samples_per_prompt=1", "task.n_val_prompts=4", "task.n_test_prompts=6", "task.max_new_tokens=8",
    "task.corpus_sequences=16", "task.corpus_max_tokens=8", "eval.seeds=[0]",
]


def test_both_studies_run_resume_and_print_their_tables(tmp_path, capsys):
    data = f"data_dir={tmp_path / 'data'}"
    ops.main(["--study", "lr", "--runs", "minillm:1e-4,gkd:3e-5", "--val-every", "2", "--out", str(tmp_path / "lr"),
              "--", *TINY, data])
    table = capsys.readouterr().out
    metrics = json.loads((tmp_path / "lr" / "minillm_lr1e-4" / "metrics.json").read_text())
    assert [v["step"] for v in metrics["validation"]] == [0, 2, 4]  # step 0 = the SFT start
    assert metrics["config"]["algo"]["lr"] == 1e-4 and metrics["config"]["algo"]["pt_coef"] == 1.0  # shipped YAML
    gkd = json.loads((tmp_path / "lr" / "gkd_lr3e-5" / "metrics.json").read_text())
    assert gkd["sft_eval"] == metrics["sft_eval"]  # one SFT start
    assert "| minillm_lr1e-4 | 2 |" in table and "| SFT start |" in table
    assert (tmp_path / "lr" / "lr.md").read_text().startswith("python experiments/onpolicy_start.py --study lr")

    before = os.path.getmtime(tmp_path / "lr" / "gkd_lr3e-5" / "metrics.json")
    ops.main(["--study", "gkd_target", "--runs", "1.0:0.0:3e-5", "--out", str(tmp_path / "lr"), "--", *TINY, data])
    ops.main(["--study", "lr", "--runs", "gkd:3e-5", "--out", str(tmp_path / "lr"), "--", *TINY, data])
    assert os.path.getmtime(tmp_path / "lr" / "gkd_lr3e-5" / "metrics.json") == before  # not run again
    out = capsys.readouterr().out
    target = json.loads((tmp_path / "lr" / "gkd_p1.0_l0.0_lr3e-5" / "metrics.json").read_text())
    assert target["config"]["algo"]["lmbda"] == 0.0 and target["train"]["last_stats"]["data/student_frac"] == 0.0
    assert "| gkd_p1.0_l0.0_lr3e-5 |" in out and "floor mass: own states" in out

    # Overrides after -- beat the study's own settings.
    label, cfg = ops.run_config("lr", "minillm:1e-4", ["algo.pt_coef=0.0", "algo.lr=0.5"], 50)
    assert label == "minillm_lr1e-4" and cfg["algo"]["pt_coef"] == 0.0 and cfg["algo"]["lr"] == 0.5


def test_floor_mass_of_the_teacher_is_its_smoothing_share(tmp_path):
    from safetensors.torch import load_file

    ops.main(["--study", "lr", "--runs", "gkd:3e-5", "--out", str(tmp_path), "--", *TINY, f"data_dir={tmp_path / 'd'}"])
    metrics = json.loads((tmp_path / "gkd_lr3e-5" / "metrics.json").read_text())
    masses = ops.floor_masses(metrics, load_file(str(tmp_path / "gkd_lr3e-5" / "student.safetensors")))
    # Default language: every state spreads smoothing 0.02 over 64 tokens, 1 + Poisson(2) (<= 8) of them in support.
    assert 0.02 * 56 / 64 <= masses["teacher"] <= 0.02 * 63 / 64
    # An untrained-like student (4 SFT steps) spreads its mass nearly uniformly: most of it lands on the floor.
    assert masses["teacher_states"] > 0.5 and masses["own_states"] > 0.5
    assert set(masses) == {"teacher_states", "own_states", "teacher"}


@pytest.mark.parametrize("study", ["lr", "gkd_target"])
def test_default_grids(study):
    labels = [ops.run_config(study, spec, [], 50)[0] for spec in ops.STUDIES[study]]
    assert len(set(labels)) == len(labels)
