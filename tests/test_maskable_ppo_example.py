"""experiments/maskable_ppo.py: its token policies are the policies they wrap, and the example runs end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("sb3_contrib")

from envs.distill import synthetic_source  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tokenrl.evaluation.onpolicy import student_token_logprobs  # noqa: E402

# experiments/ is not a package: load the script as a module.
_spec = importlib.util.spec_from_file_location(
    "experiments_maskable_ppo", Path(__file__).resolve().parents[1] / "experiments" / "maskable_ppo.py"
)
example = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = example
_spec.loader.exec_module(example)

SMALL_TASK = {
    "language": {"vocab_size": 16, "n_topics": 4, "n_local_states": 4, "max_support": 4, "prompt_len_min": 2,
                 "prompt_len_max": 3},
    "max_new_tokens": 6, "n_train_prompts": 64, "n_val_prompts": 8, "n_test_prompts": 12, "n_references": 1,
}


@pytest.fixture(scope="module")
def source():
    return synthetic_source(SMALL_TASK, split="test")


def test_the_teachers_own_samples_have_on_policy_kl_zero(source):
    metrics = example.evaluate_token_policy(example.teacher_token_policy(source), source, source.prompts, [0, 1])
    assert abs(metrics["eval/onpolicy_kl"]) < 1e-6
    assert 0 < metrics["eval/teacher_nll"] and 1 <= metrics["eval/response_len"] <= 6


def test_a_students_recorded_log_probs_are_its_teacher_forced_ones(source):
    """The log-probs kept while sampling equal the zoo's teacher-forced scoring of the same responses."""
    model = tiny_llama(16, seed=2)
    policy = example.causal_lm_token_policy(model, source)
    responses, logp_BT, mask_BT = example.rollout_token_policy(policy, source, source.prompts, seed=3)
    assert [len(r) for r in responses] == mask_BT.sum(1).tolist()
    reference_BT, reference_mask_BT = student_token_logprobs(model, source.prompts, responses, source.pad_token_id)
    assert torch.equal(mask_BT, reference_mask_BT)
    torch.testing.assert_close(logp_BT, reference_BT, rtol=0, atol=1e-5)


def test_the_ppo_token_policy_is_sb3s_masked_distribution_at_the_envs_observations(source):
    from envs.sb3 import SB3VecEnv
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.utils import get_action_masks

    vector_env = gym.make_vec(
        "tokenrl/SyntheticDistill-v0", num_envs=4, vectorization_mode="vector_entry_point", task=SMALL_TASK,
        autoreset_mode="SameStep",
    )
    env = SB3VecEnv(vector_env)
    model = MaskablePPO("MultiInputPolicy", env, n_steps=16, batch_size=32, seed=0, device="cpu")
    model.learn(64)  # any weights will do; a few updates move them off the initialisation
    policy = example.ppo_token_policy(model, source, 0.8)
    obs = env.reset()
    for _ in range(10):
        masks = get_action_masks(env)
        obs_t, _ = model.policy.obs_to_tensor(obs)
        with torch.no_grad():
            logits = model.policy.get_distribution(obs_t, action_masks=masks).distribution.logits
        batched = vector_env.batched
        width = int(batched.lengths_B.max())
        ours = policy({
            "tokens_BL": batched.tokens_BL[:, :width].clone(), "lengths_B": batched.lengths_B.clone(),
            "prompt_lengths_B": batched.prompt_lengths_B.clone(),
        })
        torch.testing.assert_close(ours.exp(), torch.softmax(logits.double(), -1), rtol=0, atol=1e-12)
        assert (ours.exp()[~torch.as_tensor(masks)] < 1e-12).all()
        actions, _ = model.predict(obs, action_masks=masks)
        obs, _, _, _ = env.step(actions)


def test_the_example_runs_end_to_end_and_refuses_a_stale_sft_start(tmp_path, capsys):
    args = [
        "--out", str(tmp_path / "out"), "--timesteps", "128", "--n-envs", "4", "--n-steps", "16", "--batch-size", "32",
        "--set", "sft_steps=3", "eval.seeds=[0]", "eval.n_prompts=8", f"data_dir={tmp_path / 'data'}",
        *[f"task.{key}={value}" for key, value in SMALL_TASK.items() if key != "language"],
        *[f"task.language.{key}={value}" for key, value in SMALL_TASK["language"].items()],
    ]
    result = example.main(args)
    names = [row["policy"] for row in result["rows"]]
    assert names == ["teacher", "untrained student", "SFT start (3 bc steps)", "MaskablePPO (128 steps)"]
    for row in result["rows"]:
        assert all(np.isfinite(v) for v in row["ours"].values())
    # The example draws a student's samples as the zoo's evaluation does: same seed, same responses.
    untrained = result["rows"][1]
    assert untrained["ours"]["eval/teacher_nll"] == pytest.approx(untrained["zoo"]["eval/teacher_nll"], abs=1e-9)
    assert untrained["ours"]["eval/response_len"] == untrained["zoo"]["eval/response_len"]
    printed = capsys.readouterr().out
    assert "| MaskablePPO (128 steps) |" in printed and "| teacher | " in printed
    assert json.loads((tmp_path / "out" / "maskable_ppo.json").read_text())["table"] in printed
    stale = ["sft_steps=4" if arg == "sft_steps=3" else arg for arg in args]
    with pytest.raises(SystemExit, match=r"another config \(keys \['sft_steps'\]\)"):
        example.main(stale)
