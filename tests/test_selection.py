"""The fair protocol (tokenrl.run.selection): best-checkpoint bookkeeping, the SFT stopping rule, the SFT cache and
the split between validation and test."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenrl.evaluation.metrics import teacher_forced_kl
from tokenrl.run.config import make_run_config
from tokenrl.run.checks import check_config
from tokenrl.run.inputs import build_student, build_task, data_location
from tokenrl.run.selection import BestCheckpoint, PlateauStop, sft_cache_path
from tokenrl.run.trainer import run

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


@pytest.mark.parametrize(
    "bad",
    [
        {"metric": "accuracy"}, {"every": -1}, {"sft_eval_every": -2}, {"sft_patience": 0}, {"sft_smoothing": 1.0},
        {"sft_smoothing": -0.1}, {"sft_min_improvement": 1.5}, {"sft_min_improvement": -0.01},
    ],
)
def test_bad_selection_settings_fail_naming_the_key(bad):
    with pytest.raises(ValueError, match=f"selection.{next(iter(bad))}"):
        check_config(make_run_config({**TINY, "selection": bad}))


def stop_step(rule: PlateauStop, scores) -> int | None:
    """The index of the validation at which ``rule`` stops on ``scores`` (None: it never does)."""
    return next((i for i, score in enumerate(scores) if rule.update(float(score))), None)


def protocol_rule() -> PlateauStop:
    sel = make_run_config({**TINY, "selection": {"sft_eval_every": 50}}).selection
    return PlateauStop(sel.sft_patience, sel.sft_smoothing, sel.sft_min_improvement)


@pytest.mark.parametrize("seed", range(5))
def test_smoothed_rule_runs_on_while_a_noisy_curve_still_falls(seed):
    # A slow fall (0.3% of the level per validation) under validation noise three times as large per step: the
    # raw scores often go several validations without a new best, the moving average does not.
    noise = np.random.default_rng(seed).normal(0.0, 0.006, 60)
    falling = 0.7 * (1 - 0.003 * np.arange(60)) + noise
    assert stop_step(protocol_rule(), falling) is None
    assert stop_step(PlateauStop(patience=3), falling) is not None  # the rule before: stops on noise


@pytest.mark.parametrize("seed", range(5))
def test_smoothed_rule_stops_on_a_noisy_plateau_and_after_a_minimum(seed):
    rng = np.random.default_rng(seed)
    # A fast fall to a plateau at 0.6: the rule stops on it (25-30 validations in, on these seeds; the moving
    # average keeps finding small new lows for a while, which costs steps, never the best weights).
    plateau = np.concatenate([np.linspace(1.5, 0.6, 20), np.full(60, 0.6)]) + rng.normal(0.0, 0.006, 80)
    stop = stop_step(protocol_rule(), plateau)
    assert stop is not None and 20 < stop < 60
    # A curve that rises after its minimum (as BC's validation KL does when it overfits) stops after the minimum.
    valley = 0.6 + 0.0002 * (np.arange(80) - 40) ** 2 + rng.normal(0.0, 0.006, 80)
    stop = stop_step(protocol_rule(), valley)
    assert stop is not None and 40 < stop < 60


def test_rule_on_exact_scores_with_patience_and_nan():
    # Without smoothing and minimum improvement the rule is plain patience on the raw scores.
    rule = PlateauStop(patience=2)
    assert [rule.update(x) for x in [3.0, 2.0, 2.5, 1.0, 1.5, 1.2]] == [False, False, False, False, False, True]
    # A NaN score keeps the average and counts as a validation without improvement.
    rule = PlateauStop(patience=2, smoothing=0.5)
    assert [rule.update(x) for x in [float("nan"), 4.0, 2.0, float("nan"), float("nan")]] == [
        False, False, False, False, True
    ]
    assert rule.smoothed[1:] == [4.0, 3.0, 3.0, 3.0] and math.isnan(rule.smoothed[0])
    # The minimum improvement is relative to the best's magnitude, so negated scores (rougeL) work alike.
    rule = PlateauStop(patience=1, min_improvement=0.1)
    assert [rule.update(x) for x in [-50.0, -54.0]] == [False, True]  # 8% better: not enough
    rule = PlateauStop(patience=1, min_improvement=0.1)
    assert [rule.update(x) for x in [-50.0, -56.0, -57.0]] == [False, False, True]
    with pytest.raises(ValueError, match="smoothing"):
        PlateauStop(patience=1, smoothing=1.0)


def test_sft_cache_key_changes_with_the_stopping_rule_and_the_validation_set(tmp_path):
    base = make_run_config({**TINY, "selection": {"sft_eval_every": 2}})
    task = build_task(base)
    path = sft_cache_path(base, task, str(tmp_path))
    for change in ({"sft_smoothing": 0.5}, {"sft_min_improvement": 0.0}, {"sft_patience": 2}, {"sft_eval_every": 3}):
        other = dataclasses.replace(base, selection=dataclasses.replace(base.selection, **change))
        assert sft_cache_path(other, task, str(tmp_path)) != path, change
    more_val = make_run_config(
        {**TINY, "task": {**TINY["task"], "n_val_prompts": 5}, "selection": {"sft_eval_every": 2}}
    )
    assert sft_cache_path(more_val, build_task(more_val), str(tmp_path)) != path


def test_validation_split_is_apart_from_training_and_test():
    small = build_task(make_run_config(TINY))
    large = build_task(make_run_config({**TINY, "task": {**TINY["task"], "n_val_prompts": 12}}))
    # The validation split's size changes neither the training prompts (the offline data) nor the test split.
    assert small.train_prompts == large.train_prompts and small.test_prompts == large.test_prompts
    assert small.test_references == large.test_references and small.test_heldout == large.test_heldout
    assert small.val_prompts == large.val_prompts[:4] and len(large.heldout[1]) == 12
    assert small.heldout[0] == small.val_prompts and small.test_heldout[0] == small.test_prompts
    assert small.heldout[1] != small.test_heldout[1][: len(small.heldout[1])]


def test_sft_stops_early_keeps_its_best_and_is_reused_from_the_cache(tmp_path):
    cfg = {
        **TINY,
        "data_dir": str(tmp_path / "data"),
        "sft_steps": 60,
        "sft_lr": 0.3,  # large enough that validation soon gets worse and the rule stops SFT
        "selection": {"sft_eval_every": 2, "sft_patience": 3, "sft_smoothing": 0.5, "sft_cache": True, "every": 2},
    }
    first = run(make_run_config(cfg), str(tmp_path / "a"))
    sft = first["sft"]
    scores = [score for _, score in sft["history"]]
    assert not sft["cached"] and sft["steps_run"] < 60
    assert sft["best_score"] == min(scores) and sft["history"][-1][1] >= sft["best_score"]
    assert len(sft["smoothed"]) == len(scores) and sft["smoothed"][0] == scores[0]
    # The SFT start that the algorithm starts from is the best validated one: step 0 of its selection scores it.
    sel = first["selection"]
    assert [s for s, _ in sel["history"]] == [0, 2, 4] and sel["history"][0][1] == pytest.approx(sft["best_score"])

    # The evaluation's teacher-forced KL is the saved student's on the test split's held-out samples.
    run_cfg = make_run_config(cfg)
    task = build_task(run_cfg)
    student = build_student(run_cfg.model, task, run_cfg.seed, "cpu")
    student.load_state_dict(load_file(os.path.join(tmp_path, "a", "student.safetensors")), strict=False)
    on_test = teacher_forced_kl(student, task.teacher, *task.test_heldout, vocab_size=task.vocab_size)
    on_val = teacher_forced_kl(student, task.teacher, *task.heldout, vocab_size=task.vocab_size)
    assert first["final_eval"]["eval/kl_student_teacher"] == pytest.approx(on_test["kl_student_teacher"], rel=1e-9)
    assert on_val["kl_student_teacher"] == pytest.approx(sel["best_score"], rel=1e-9)

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
