"""The fair protocol (tokenrl.run.selection): best-checkpoint bookkeeping, SFT early stopping and the SFT cache."""

from __future__ import annotations

import math

import pytest
import torch

from tokenrl.run.config import make_run_config
from tokenrl.run.selection import BestCheckpoint, check_selection
from tokenrl.run.trainer import build_task, data_location, run

TINY = {
    "algo": {"name": "bc"},
    "steps": 4,
    "batch_size": 4,
    "task": {"n_train_prompts": 24, "samples_per_prompt": 1, "n_val_prompts": 4, "n_test_prompts": 4, "max_new_tokens": 8},
    "eval": {"seeds": [0]},
    "teacher_eval": False,
    "init_eval": False,
    "progress": False,
}


def test_best_checkpoint_keeps_and_restores_the_best_weights():
    model = torch.nn.Linear(2, 1)
    # The score is the weights' distance to a target: the tracker must keep the closest weights it saw.
    target = torch.tensor([[1.0, -1.0]])
    best = BestCheckpoint(model, lambda m: float((m.weight.detach() - target).norm()))
    for step, w in enumerate([[3.0, 3.0], [1.5, -1.0], [float("nan"), 0.0], [2.0, 2.0]]):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([w]))
        best.consider(step)
    assert best.best_step == 1 and best.best_score == pytest.approx(0.5)
    best.restore()
    assert torch.equal(model.weight, torch.tensor([[1.5, -1.0]]))
    assert [s for s, _ in best.summary()["history"]] == [0, 1, 2, 3]
    assert math.isnan(best.summary()["history"][2][1])  # NaN is recorded but never wins


def test_references_do_not_depend_on_the_students_decoding():
    base = build_task(make_run_config({**TINY, "eval": {"decode_top_p": [1.0]}}))
    other = build_task(make_run_config({**TINY, "eval": {"decode_top_p": [0.8, 1.0], "temperature": 0.5}}))
    assert base.test_references == other.test_references and base.val_references == other.val_references
    assert base.heldout == other.heldout
    assert base.eval_sampler(base.test_prompts, 0) == other.eval_sampler(other.test_prompts, 0)


@pytest.mark.parametrize("bad", [{"metric": "accuracy"}, {"every": -1}, {"sft_patience": 0}])
def test_bad_selection_settings_fail_naming_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        check_selection(make_run_config({**TINY, "selection": bad}))


def test_sft_stops_early_keeps_its_best_and_is_reused_from_the_cache(tmp_path):
    cfg = {
        **TINY,
        "data_dir": str(tmp_path / "data"),
        "sft_steps": 40,
        "sft_lr": 0.3,  # large enough that validation soon gets worse and early stopping triggers
        "selection": {"sft_eval_every": 2, "sft_patience": 1, "sft_cache": True, "every": 2},
    }
    first = run(make_run_config(cfg), str(tmp_path / "a"))
    sft = first["sft"]
    scores = [score for _, score in sft["history"]]
    assert not sft["cached"] and sft["steps_run"] < 40
    assert sft["best_score"] == min(scores) and sft["history"][-1][1] >= sft["best_score"]
    # The SFT start that the algorithm and the SFT row see is the best validated one.
    assert first["sft_eval"]["eval/kl_student_teacher"] == pytest.approx(sft["best_score"], rel=1e-9)
    sel = first["selection"]
    assert [s for s, _ in sel["history"]] == [0, 2, 4] and sel["history"][0][1] == pytest.approx(sft["best_score"])
    assert first["final_eval"]["eval/kl_student_teacher"] == pytest.approx(sel["best_score"], rel=1e-9)

    second = run(make_run_config({**cfg, "algo": {"name": "kd"}}), str(tmp_path / "b"))
    assert second["sft"]["cached"] and second["sft"]["best_step"] == sft["best_step"]
    assert second["sft_eval"] == first["sft_eval"]  # the same start for every method
    again = run(make_run_config(cfg), str(tmp_path / "c"))
    assert again["final_eval"] == first["final_eval"]  # a cached start continues exactly as the trained one


def test_later_language_options_keep_the_default_data_key():
    default = build_task(make_run_config(TINY))
    lm = build_task(make_run_config({**TINY, "task": {**TINY["task"], "language": {"transitions": "last_token"}}}))
    assert "transitions" not in default.manifest["teacher"] and lm.manifest["teacher"]["transitions"] == "last_token"
    assert data_location(make_run_config(TINY), default) != data_location(make_run_config(TINY), lm)
