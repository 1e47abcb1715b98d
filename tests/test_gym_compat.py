"""The Gymnasium face of the envs: registered ids, the VectorEnv adapter, and an outside library (MaskablePPO)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs  # noqa: F401  (registers the ids)
from envs.gym_compat import ENV_IDS, TokenGenerationVectorEnv
from envs.token_env import TokenGenerationEnv

TOKEN_KW = dict(vocab_size=5, eos_token_id=0, max_new_tokens=4, max_prompt_len=3)
MAKE_KW = {
    "tokenrl/TokenGeneration-v0": dict(TOKEN_KW, prompts=[[1, 2], [3]]),
    "tokenrl/RandomMDP-v0": dict(top_p=0.8),
    "tokenrl/RandomTokenMDP-v0": dict(top_p=0.8),
    "tokenrl/ToyTokenGeneration-v0": dict(top_p=0.8),
}


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_registered_ids_make_envs_that_pass_check_env(env_id):
    env = gym.make(env_id, **MAKE_KW[env_id])
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    if "top_p" in MAKE_KW[env_id]:
        mask = env.get_wrapper_attr("action_masks")()
        assert mask.dtype == bool and mask.shape == (env.action_space.n,)
        assert np.array_equal(mask, info["action_mask"].astype(bool))


def _reward_single(tokens, action, terminated):
    return float(action == 2) - 0.5 * float(terminated)


def _reward_batched(tokens_BT, lengths_B, actions_B, terminated_B):
    return (actions_B == 2).float() - 0.5 * terminated_B.float()


def test_vector_env_equals_sync_vector_env_of_single_envs():
    """Same actions, same prompt: the adapter and Gymnasium's SyncVectorEnv agree step by step, resets included."""
    n, prompt = 3, [1, 4]
    ours = TokenGenerationVectorEnv(n, **TOKEN_KW, prompts=[prompt], reward_fn=_reward_batched)
    ref = SyncVectorEnv(
        [lambda: TokenGenerationEnv(**TOKEN_KW, prompts=[prompt], reward_fn=_reward_single) for _ in range(n)],
        autoreset_mode=AutoresetMode.NEXT_STEP,
    )
    assert ours.metadata["autoreset_mode"] == ref.metadata["autoreset_mode"]
    assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space
    obs_a, _ = ours.reset(seed=0)
    obs_b, _ = ref.reset(seed=0)
    rng = np.random.default_rng(0)
    resets = 0
    for _ in range(40):
        for key in obs_b:
            np.testing.assert_array_equal(obs_a[key], obs_b[key])
        assert ours.observation_space.contains(obs_a)
        actions = rng.integers(0, 5, size=n)
        obs_a, r_a, term_a, trunc_a, _ = ours.step(actions)
        obs_b, r_b, term_b, trunc_b, _ = ref.step(actions)
        np.testing.assert_allclose(r_a, r_b)
        np.testing.assert_array_equal(term_a, term_b)
        np.testing.assert_array_equal(trunc_a, trunc_b)
        resets += int((term_a | trunc_a).sum())
    assert resets > n, "the episode ends (and autoresets) must be exercised"


def test_vector_env_seeding_and_errors():
    def sampler(k, rng):
        return [list(rng.integers(1, 5, size=2)) for _ in range(k)]

    env = TokenGenerationVectorEnv(4, **TOKEN_KW, prompt_sampler=sampler)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(4, dtype=np.int64))
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="exactly one"):
        TokenGenerationVectorEnv(2, **TOKEN_KW)
    obs, _ = env.reset(options={"prompts": [[1], [2], [3], [4]]})
    assert obs["length"].tolist() == [1, 1, 1, 1]


def test_maskable_ppo_trains_on_top_p_toy_token_env():
    """sb3-contrib's MaskablePPO, unchanged, learns on the top-p-wrapped toy env through action_masks().

    ``on_outside="raise"`` makes any action outside the teacher's set an error, so finishing training proves
    the library read the wrapper's mask (the sets are strict subsets of the vocabulary, checked below).
    """
    sb3_contrib = pytest.importorskip("sb3_contrib")
    env = gym.make("tokenrl/ToyTokenGeneration-v0", top_p=0.8, on_outside="raise")
    torch.manual_seed(0)
    model = sb3_contrib.MaskablePPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    obs, info = env.reset(seed=1)
    strict_subset = False
    for _ in range(30):
        mask = env.get_wrapper_attr("action_masks")()
        strict_subset |= bool(mask.sum() < mask.size)
        action, _ = model.predict(obs, action_masks=mask, deterministic=False)
        assert mask[int(action)]
        obs, _, terminated, truncated, info = env.step(int(action))
        assert info["action_in_top_p"]
        if terminated or truncated:
            obs, info = env.reset()
    assert strict_subset
