"""The Gymnasium face of the envs: registered ids, the VectorEnv adapter, and an outside library (MaskablePPO)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs  # noqa: F401  (registers the ids)
from envs.distill import MemoTeacher, make_distill_env, make_distill_vector_env, synthetic_source
from envs.gym_compat import ENV_IDS, TokenGenerationVectorEnv
from envs.token_env import TokenGenerationEnv
from tokenrl.core.top_p import top_p_mask

TOKEN_KW = dict(vocab_size=5, eos_token_id=0, max_new_tokens=4, max_prompt_len=3)
MAKE_KW = {
    "tokenrl/TokenGeneration-v0": dict(TOKEN_KW, prompts=[[1, 2], [3]]),
    "tokenrl/RandomMDP-v0": dict(top_p=0.8),
    "tokenrl/RandomTokenMDP-v0": dict(top_p=0.8),
    "tokenrl/ToyTokenGeneration-v0": dict(top_p=0.8),
    "tokenrl/SyntheticDistill-v0": dict(top_p=0.8),
}
# A small synthetic task: episodes end within 5 tokens, 16 actions.
SMALL_TASK = {
    "language": {"vocab_size": 16, "n_topics": 4, "n_local_states": 4, "max_support": 4, "prompt_len_min": 2,
                 "prompt_len_max": 3},
    "max_new_tokens": 5, "n_train_prompts": 20, "n_val_prompts": 4, "n_test_prompts": 4, "n_references": 1,
}


def test_every_registered_id_is_checked():
    assert set(MAKE_KW) | {"tokenrl/HFDistill-v0"} == set(ENV_IDS)  # HFDistill-v0: tests/test_hf_env.py


@pytest.mark.parametrize("env_id", sorted(MAKE_KW))
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


def _without_unwrapped_warning(check, env):
    """check_env on the env as ``gymnasium.make`` returns it (wrappers included) warns that it is wrapped."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unwrapped.*")
        check(env, skip_render_check=True)


def _teacher_logp(lang, tokens):
    """log pi*(.|tokens) of the synthetic teacher, float64 ``[V]`` (the oracle of masks and rewards)."""
    return torch.log_softmax(lang.next_token_logits(torch.as_tensor(tokens)[None], torch.tensor([len(tokens)])).double(), -1)[0]


def test_synthetic_distill_id_alone_is_a_masked_rewarded_env_that_passes_check_env():
    env = gym.make("tokenrl/SyntheticDistill-v0")
    _without_unwrapped_warning(check_env, env)
    lang = synthetic_source().teacher  # the default task's teacher
    obs, info = env.reset(seed=3)
    rng = np.random.default_rng(0)
    strict_subset, steps = False, 0
    while True:
        tokens = obs["tokens"][: obs["length"]]
        logp_V = _teacher_logp(lang, tokens)
        expected = top_p_mask(logp_V, 0.8).numpy()
        assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (64,)
        np.testing.assert_array_equal(info["action_mask"].astype(bool), expected)
        np.testing.assert_array_equal(env.get_wrapper_attr("action_masks")(), expected)
        strict_subset |= bool(expected.sum() < 64)
        action = int(rng.choice(np.flatnonzero(expected)))
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        assert reward == pytest.approx(float(logp_V[action]), abs=1e-6) and reward < 0
        if terminated or truncated:
            break
    assert strict_subset and steps <= 32
    if terminated:
        assert info["action_mask"].sum() == 0  # no action after EOS


def test_distill_options_no_mask_no_reward_and_errors():
    source = synthetic_source(SMALL_TASK)
    env = make_distill_env(source, top_p=None, reward="none")
    _, info = env.reset(seed=0)
    assert "action_mask" not in info and env.action_masks().all()
    assert env.step(1)[1] == 0.0
    vec = make_distill_vector_env(source, 3, top_p=None, reward="none")
    _, info = vec.reset(seed=0)
    assert "action_mask" not in info and vec.action_masks().all()
    with pytest.raises(ValueError, match="reward must be one of"):
        make_distill_env(source, reward="kl")
    with pytest.raises(ValueError, match="top_p must be in"):
        make_distill_vector_env(source, 2, top_p=0.0)
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_source(SMALL_TASK, split="dev")
    with pytest.raises(ValueError, match=r"unknown task keys \['vocab'\]"):
        synthetic_source({"vocab": 3})
    with pytest.raises(ValueError, match="autoreset_mode"):
        make_distill_vector_env(source, 2, autoreset_mode="Disabled")


class CountingTeacher:
    """The synthetic teacher, counting its ``next_token_logits`` calls."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, 0
        self.vocab_size, self.eos_token_id = teacher.vocab_size, teacher.eos_token_id

    def next_token_logits(self, tokens_BT, lengths_B):
        self.calls += 1
        return self.teacher.next_token_logits(tokens_BT, lengths_B)


def test_one_teacher_call_per_step_for_mask_and_reward():
    source = synthetic_source(SMALL_TASK)
    counting = CountingTeacher(source.teacher)
    source.teacher = counting
    env = make_distill_env(source)
    env.reset(seed=0)
    steps = 0
    for _ in range(4):
        _, _, terminated, truncated, _ = env.step(3)
        steps += 1
        if terminated or truncated:
            break
    assert counting.calls == 1 + steps
    memo = MemoTeacher(counting)
    tokens_BT, lengths_B = torch.tensor([[1, 2, 9], [4, 5, 6]]), torch.tensor([2, 3])
    first = memo.next_token_logits(tokens_BT, lengths_B)
    padded_differently = torch.tensor([[1, 2, 0, 0], [4, 5, 6, 0]])
    torch.testing.assert_close(memo.next_token_logits(padded_differently, lengths_B), first)
    calls = counting.calls
    memo.next_token_logits(tokens_BT, torch.tensor([3, 3]))  # another prefix: asks the teacher
    assert counting.calls == calls + 1


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_masked_vector_env_equals_sync_vector_env_of_wrapped_single_envs(mode):
    """Batched masks, rewards, flags and autoresets equal Gymnasium's SyncVectorEnv over TopPActionWrapper envs."""
    import dataclasses

    n = 3
    source = dataclasses.replace(synthetic_source(SMALL_TASK), prompts=[[2, 7, 5]])
    ours = make_distill_vector_env(source, n, autoreset_mode=mode.value)
    ref = SyncVectorEnv([lambda: make_distill_env(source) for _ in range(n)], autoreset_mode=mode)
    assert ours.metadata["autoreset_mode"] == ref.metadata["autoreset_mode"] == mode
    obs_a, info_a = ours.reset(seed=0)
    obs_b, info_b = ref.reset(seed=0)
    rng = np.random.default_rng(0)
    ends = np.zeros(2, dtype=int)
    for _ in range(40):
        for key in obs_b:
            np.testing.assert_array_equal(obs_a[key], obs_b[key])
        np.testing.assert_array_equal(info_a["action_mask"], info_b["action_mask"])
        np.testing.assert_array_equal(ours.action_masks(), info_b["action_mask"].astype(bool))
        # Half the rows act inside the mask, the others anywhere (EOS included), so both flags occur.
        legal = [rng.choice(np.flatnonzero(m)) if m.any() else 0 for m in info_b["action_mask"]]
        actions = np.where(rng.random(n) < 0.5, legal, rng.integers(0, 16, size=n))
        obs_a, r_a, term_a, trunc_a, info_a = ours.step(actions)
        obs_b, r_b, term_b, trunc_b, info_b = ref.step(actions)
        np.testing.assert_allclose(r_a, r_b, rtol=0, atol=0)
        np.testing.assert_array_equal(term_a, term_b)
        np.testing.assert_array_equal(trunc_a, trunc_b)
        if mode == AutoresetMode.SAME_STEP and (term_b | trunc_b).any():
            np.testing.assert_array_equal(info_a["_final_obs"], info_b["_final_obs"])
            for row in np.flatnonzero(info_b["_final_obs"]):
                for key in obs_b:
                    np.testing.assert_array_equal(info_a["final_obs"][row][key], info_b["final_obs"][row][key])
            np.testing.assert_array_equal(
                info_a["final_info"]["action_mask"][info_b["_final_obs"]],
                info_b["final_info"]["action_mask"][info_b["_final_obs"]],
            )
        ends += int(term_b.sum()), int(trunc_b.sum())
    assert (ends > 0).all(), "both termination and truncation must be exercised"


def test_make_vec_vector_entry_point_emits_the_teachers_top_p_masks():
    env = gym.make_vec(
        "tokenrl/SyntheticDistill-v0", num_envs=4, vectorization_mode="vector_entry_point", task=SMALL_TASK, top_p=0.9
    )
    assert isinstance(env, TokenGenerationVectorEnv)
    lang = env.teacher.teacher
    obs, info = env.reset(seed=1)
    terminated = np.zeros(4, dtype=bool)
    rng = np.random.default_rng(1)
    for _ in range(12):
        masks = env.action_masks()
        assert masks.shape == (4, 16) and masks.dtype == bool
        np.testing.assert_array_equal(info["action_mask"].astype(bool), masks)
        for row in range(4):
            tokens = obs["tokens"][row, : obs["length"][row]]
            expected = top_p_mask(_teacher_logp(lang, tokens), 0.9).numpy() & ~terminated[row]
            np.testing.assert_array_equal(masks[row], expected)
        actions = np.array([rng.choice(np.flatnonzero(m)) if m.any() else 0 for m in masks])
        obs, rewards, terminated, truncated, info = env.step(actions)
        assert np.all(rewards <= 0.0)
    assert not env.action_masks().all(), "the top-p sets must restrict something"


def test_maskable_ppo_learns_on_the_masked_vector_env():
    """sb3-contrib's MaskablePPO on the registered synthetic teacher env, batched (make_vec + SB3VecEnv).

    Every action it samples lies in the batched mask of its state (the masks are strict subsets of the
    vocabulary), and a few updates raise the return, the response's teacher log-likelihood: from about -7 to
    about -3.4 over 128 sampled episodes (standard error about 0.7 before, 0.3 after).
    """
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from sb3_contrib.common.maskable.evaluation import evaluate_policy
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecMonitor

    from envs.sb3 import SB3VecEnv

    def make(n):
        return VecMonitor(SB3VecEnv(gym.make_vec(
            "tokenrl/SyntheticDistill-v0", num_envs=n, vectorization_mode="vector_entry_point", autoreset_mode="SameStep",
        )))

    class CheckMasks(BaseCallback):
        restricted = 0

        def _on_step(self) -> bool:
            masks, actions = self.locals["action_masks"], self.locals["actions"]
            assert masks.shape == (16, 64) and actions.shape == (16,)
            assert masks[np.arange(16), actions].all(), "an action outside its state's top-p set"
            self.restricted += int((masks.sum(1) < 64).sum())
            return True

    env, evaluation = make(16), make(16)
    model = sb3_contrib.MaskablePPO("MultiInputPolicy", env, n_steps=32, batch_size=128, seed=0, device="cpu")
    evaluation.seed(7)
    before, _ = evaluate_policy(model, evaluation, n_eval_episodes=128, deterministic=False)
    check = CheckMasks()
    model.learn(total_timesteps=4096, callback=check)
    evaluation.seed(7)
    after, _ = evaluate_policy(model, evaluation, n_eval_episodes=128, deterministic=False)
    assert check.restricted > 0
    assert after > before + 1.0, (before, after)
    with pytest.raises(ValueError, match="SameStep"):
        SB3VecEnv(gym.make_vec("tokenrl/SyntheticDistill-v0", num_envs=2, vectorization_mode="vector_entry_point"))
