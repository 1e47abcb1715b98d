"""benchmarks/paper_scale.py: the parameter counts against the released models', the plan's arithmetic against a
hand computation of one row, and the section replacement in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import paper_scale  # noqa: E402

COSTS = {
    "shapes": {"student": "s", "teacher": "t", "generation": "g"},
    "ops": {
        "train step (sft)": {"s_per_token": 1e-3, "flops_per_token": 6e7},
        "train step (iql_bd)": {"s_per_token": 1e-3, "flops_per_token": 6e7},
        "teacher forward (no grad)": {"s_per_token": 5e-4, "flops_per_token": 1e8},
        "dense top-p mask (released recipe)": {"s_per_token": 2e-4, "flops_per_token": None},
        "decode, transformers generate": {"s_per_token": 2e-3, "flops_per_token": 8e7},
        "decode, TeacherSampler + top-p cache": {"s_per_token": 2e-3, "flops_per_token": 8e7},
    },
    "ratios": {"iql_bd step / sft step": 1.0, "TeacherSampler + cache / generate": 1.0},
    "meta": {"date": "d", "threads": 1, "repeats": 1, "torch": "t", "load_average": 0.0},
}


@pytest.mark.parametrize("name, params", [("Qwen2.5-0.5B", 494_032_768), ("GPT-2", 124_439_808), ("Qwen2.5-3B", 3_085_938_688)])
def test_parameter_counts_are_the_released_models(name, params):
    assert paper_scale.model_sizes(name)["params"] == params


def test_offline_training_row_is_six_n_per_token_at_the_assumed_utilisation():
    rows, _ = paper_scale.plan(COSTS)
    row = next(r for r in rows if r.startswith("| GPT-2 XL -> GPT-2 | offline BD") and "| 1 |" in r)
    training_h = float(row.split("|")[5])
    s = paper_scale.model_sizes("GPT-2")
    tokens = paper_scale.TRAIN["iterations"] * paper_scale.TRAIN["batch"] * 512
    expected = 6 * s["matmul"] * tokens / (paper_scale.GPU["peak_tflops"] * 1e12 * paper_scale.ASSUMED["mfu_train"]) / 3600
    assert training_h == pytest.approx(expected, abs=0.006)
    assert len(rows) == 2 * 3 * 2  # settings x methods x (1, 8) GPUs


def test_memory_of_a_single_gpu_student_is_states_activations_and_the_vocabulary_chunk():
    s, t = paper_scale.model_sizes("GPT-2"), paper_scale.model_sizes("GPT-2 XL")
    expected = (16 * s["params"] + 34 * s["hidden"] * s["layers"] * 8 * 512 + 12 * 1024 * s["vocab"]) / 2**30
    assert paper_scale.memory_gib(s, t, 1, 8, holds_teacher=False, dense_logits=False) == pytest.approx(expected)
    # FSDP (one group at the root) shards only what is not gathered for the step.
    assert paper_scale.memory_gib(s, t, 8, 8, False, False) < expected


def test_section_replaces_its_block_and_refuses_a_file_without_one(tmp_path, monkeypatch):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS))
    target = tmp_path / "B.md"
    target.write_text("head\n<!-- paper scale -->\nold\n<!-- /paper scale -->\ntail\n")
    monkeypatch.setattr(sys, "argv", ["paper_scale.py", "--costs", str(costs), "--out", str(target)])
    paper_scale.main()
    text = target.read_text()
    assert text.startswith("head\n<!-- paper scale -->\n## The paper's scale") and text.endswith("<!-- /paper scale -->\ntail\n")
    assert "\nold\n" not in text
    assert "dist.strategy=fsdp" in text and "not measured" in text
    bare = tmp_path / "bare.md"
    bare.write_text("nothing\n")
    monkeypatch.setattr(sys, "argv", ["paper_scale.py", "--costs", str(costs), "--out", str(bare)])
    with pytest.raises(SystemExit, match="paper scale"):
        paper_scale.main()
