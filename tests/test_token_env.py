"""TokenGenerationEnv (the Gymnasium contract) and BatchedTokenGenerationEnv (lock-step rollouts)."""

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs.token_env import BatchedTokenGenerationEnv, TokenGenerationEnv
from tests.reference import sequence_logprob

V = 64
EOS = 0


def make_env(lang, max_new_tokens=6, **kwargs):
    return TokenGenerationEnv(
        lang.vocab_size,
        lang.eos_token_id,
        max_new_tokens,
        lang.config.prompt_len_max,
        prompt_sampler=lambda rng: lang.sample_prompts(1, rng)[0],
        **kwargs,
    )


def single_reward(tokens, action, terminated):
    """Depends on the state before the action, the action and termination (mirrored by batch_reward)."""
    return float(tokens.sum() % 7) + 0.5 * action - float(terminated)


def batch_reward(tokens_BL, lengths_B, actions_B, terminated_B):
    real_BT = torch.arange(tokens_BL.shape[1])[None, :] < lengths_B[:, None]
    return (tokens_BL * real_BT).sum(1) % 7 + 0.5 * actions_B - terminated_B.float()


def test_check_env_passes_without_warnings(lang):
    env = make_env(lang, reward_fn=single_reward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_eos_terminates_and_is_kept_as_last_token(lang):
    env = make_env(lang, pad_token_id=63)
    obs, info = env.reset(seed=0, options={"prompt": [3, 4, 5]})
    obs, reward, terminated, truncated, info = env.step(7)
    assert (terminated, truncated, reward) == (False, False, 0.0)
    obs, _, terminated, truncated, _ = env.step(EOS)
    assert terminated is True and truncated is False
    assert obs["length"] == 5 and obs["prompt_length"] == 3
    np.testing.assert_array_equal(obs["tokens"], [3, 4, 5, 7, EOS] + [63] * (env.max_len - 5))
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(1)


def test_max_new_tokens_truncates(lang):
    env = make_env(lang, max_new_tokens=3)
    env.reset(seed=0)
    flags = [env.step(5)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(5)


def test_eos_on_the_last_allowed_step_terminates_not_truncates(lang):
    env = make_env(lang, max_new_tokens=2)
    env.reset(seed=0)
    env.step(5)
    assert env.step(EOS)[2:4] == (True, False)


def test_options_prompt_passes_through(lang):
    env = make_env(lang)
    obs, info = env.reset(seed=1, options={"prompt": np.array([9, 8, 7, 6])})
    assert info == {"prompt_length": 4}
    np.testing.assert_array_equal(obs["tokens"][:4], [9, 8, 7, 6])
    assert (obs["tokens"][4:] == env.pad_token_id).all()
    assert obs["length"] == obs["prompt_length"] == 4
    np.testing.assert_array_equal(env.tokens, [9, 8, 7, 6])


def test_fixed_prompts_are_drawn_reproducibly():
    prompts = [[1, 2], [3, 4, 5], [6]]
    env = TokenGenerationEnv(V, EOS, 4, 3, prompts=prompts)

    def drawn_prompt(seed):
        obs, info = env.reset(seed=seed)
        return obs["tokens"][: info["prompt_length"]].tolist()

    drawn = [drawn_prompt(s) for s in range(20)]
    assert all(d in prompts for d in drawn) and len({tuple(d) for d in drawn}) == len(prompts)
    assert drawn == [drawn_prompt(s) for s in range(20)]


def test_reward_fn_sees_the_state_before_the_action():
    calls = []

    def reward_fn(tokens, action, terminated):
        calls.append((tokens.tolist(), action, terminated))
        return 1.5

    env = TokenGenerationEnv(V, EOS, 4, 3, reward_fn=reward_fn)
    env.reset(options={"prompt": [1, 2]})
    assert env.step(3)[1] == 1.5
    env.step(EOS)
    assert calls == [([1, 2], 3, False), ([1, 2, 3], EOS, True)]


@pytest.mark.parametrize(
    "prompt, match",
    [([], "at least one token"), ([1, 2, 3, 4], "more than max_prompt_len"), ([1, V], "token ids must be in"),
     ([1.5, 2.0], "integers"), ([[1, 2]], "flat")],
)
def test_bad_prompts_raise(prompt, match):
    env = TokenGenerationEnv(V, EOS, 4, 3)
    with pytest.raises(ValueError, match=match):
        env.reset(options={"prompt": prompt})


def test_misuse_raises_clear_errors():
    env = TokenGenerationEnv(V, EOS, 4, 3)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(1)
    with pytest.raises(ValueError, match="no prompt to start from"):
        env.reset()
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"promt": [1]})
    env.reset(options={"prompt": [1]})
    for action in (-1, V, 2.5):
        with pytest.raises(ValueError, match="not a token id"):
            env.step(action)
    with pytest.raises(ValueError, match="at most one"):
        TokenGenerationEnv(V, EOS, 4, 3, prompts=[[1]], prompt_sampler=lambda rng: [1])
    with pytest.raises(ValueError, match="pad_token_id"):
        TokenGenerationEnv(V, EOS, 4, 3, pad_token_id=V)
    with pytest.raises(ValueError, match="max_new_tokens"):
        TokenGenerationEnv(V, EOS, 0, 3)


def test_batched_env_matches_single_envs_in_lock_step():
    rng = np.random.default_rng(0)
    max_new, max_prompt = 6, 5
    prompts = [rng.integers(1, V, size=n).tolist() for n in (1, 5, 3, 2, 4)]
    actions_BT = torch.from_numpy(rng.integers(1, V, size=(len(prompts), max_new)))
    actions_BT[0, 0] = EOS  # ends at the first step
    actions_BT[2, 3] = EOS
    actions_BT[3, 5] = EOS  # EOS on the last allowed step: terminated, not truncated
    batched = BatchedTokenGenerationEnv(V, EOS, max_new, max_prompt, reward_fn=batch_reward, pad_token_id=63)
    singles = [
        TokenGenerationEnv(V, EOS, max_new, max_prompt, reward_fn=single_reward, pad_token_id=63) for _ in prompts
    ]
    obs, _ = batched.reset(prompts)
    for env, prompt in zip(singles, prompts):
        env.reset(options={"prompt": prompt})
    single_done = [False] * len(prompts)
    for t in range(max_new):
        obs, rewards_B, terminated_B, truncated_B, info = batched.step(actions_BT[:, t])
        for b, env in enumerate(singles):
            assert bool(info["active_B"][b]) == (not single_done[b])
            if single_done[b]:
                assert rewards_B[b] == 0 and info["actions_B"][b] == 63
                continue
            s_obs, s_reward, s_term, s_trunc, _ = env.step(int(actions_BT[b, t]))
            single_done[b] = s_term or s_trunc
            assert rewards_B[b].item() == pytest.approx(s_reward)
            assert (bool(terminated_B[b]), bool(truncated_B[b])) == (s_term, s_trunc)
            n = int(s_obs["length"])
            assert obs["lengths_B"][b] == n
            assert obs["tokens_BL"][b, :n].tolist() == s_obs["tokens"][:n].tolist()
            assert (obs["tokens_BL"][b, n:] == 63).all()
    assert all(single_done)
    assert terminated_B.tolist() == [True, False, True, True, False]
    assert truncated_B.tolist() == [False, True, False, False, True]
    with pytest.raises(RuntimeError, match="every row finished"):
        batched.step(actions_BT[:, 0])


def test_batched_step_validates_actions():
    env = BatchedTokenGenerationEnv(V, EOS, 3, 2)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(torch.zeros(2, dtype=torch.long))
    env.reset([[1], [2, 3]])
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        env.step(torch.zeros(2))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        env.step(torch.tensor([1, V]))
    env.step(torch.tensor([EOS, 4]))
    # Row 0 has finished: its action is ignored, even an invalid one.
    obs, *_ = env.step(torch.tensor([-100, 5]))
    assert obs["tokens_BL"].tolist() == [[1, EOS, EOS, EOS], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="prompt_sampler"):
        env.reset()


def test_rollout_calls_policy_once_per_step_and_fills_trajectories():
    calls = []

    def policy_fn(tokens_BL, lengths_B):
        calls.append(tokens_BL.shape)
        # Rows 0-2 emit EOS once their responses have 0, 1, 2 tokens; row 3 never does and truncates.
        response_len_B = lengths_B - torch.tensor([2, 1, 3, 2])
        return torch.where(response_len_B == torch.tensor([0, 1, 2, -1]), EOS, 10 + lengths_B)

    env = BatchedTokenGenerationEnv(V, EOS, 4, 3, reward_fn=lambda t, n, a, term: a.float())
    traj = env.rollout(policy_fn, prompts=[[1, 2], [3], [4, 5, 6], [7, 8]])
    assert len(calls) == 4 and calls[0] == (4, 3)
    assert traj.prompts == [[1, 2], [3], [4, 5, 6], [7, 8]]
    assert traj.responses == [[EOS], [11, EOS], [13, 14, EOS], [12, 13, 14, 15]]
    assert traj.terminated == [True, True, True, False] and traj.truncated == [False, False, False, True]
    assert traj.rewards == [[0.0], [11.0, 0.0], [13.0, 14.0, 0.0], [12.0, 13.0, 14.0, 15.0]]
    assert traj.response_ids_BT.tolist() == [[0, 0, 0, 0], [11, 0, 0, 0], [13, 14, 0, 0], [12, 13, 14, 15]]
    assert traj.response_mask_BT.sum(1).tolist() == [1, 2, 3, 4]
    assert traj.rewards_BT.shape == (4, 4) and traj.rewards_BT.dtype == torch.float32


def test_rollout_is_reproducible_with_a_seed(lang):
    env = BatchedTokenGenerationEnv(V, EOS, 8, 8, batch_size=16, prompt_sampler=lang.sample_prompts)
    first = env.rollout(lang.next_token_logits, seed=3)
    assert first == env.rollout(lang.next_token_logits, seed=3)
    assert first != env.rollout(lang.next_token_logits, seed=4)


def test_rollout_sampling_the_teacher_matches_its_own_sampler(lang):
    """Sampling from SyntheticLanguage's logits through the env has the statistics of its own sampler."""
    max_new, n = 16, 2000
    prompts = lang.sample_prompts(n, np.random.default_rng(0))
    env = BatchedTokenGenerationEnv(V, EOS, max_new, lang.config.prompt_len_max)
    traj = env.rollout(lang.next_token_logits, prompts=prompts, seed=0)
    reference = lang.sample_continuations(prompts, max_new, np.random.default_rng(1))

    for response, terminated, truncated in zip(traj.responses, traj.terminated, traj.truncated):
        assert 1 <= len(response) <= max_new and terminated != truncated
        assert (response[-1] == EOS) == terminated and EOS not in response[:-1]
        assert truncated == (len(response) == max_new and response[-1] != EOS)

    def nll_per_token(responses):
        tokens_BL = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(p + r) for p, r in zip(prompts, responses)], batch_first=True
        )
        lengths_B = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
        start_B = torch.tensor([len(p) for p in prompts])
        return -sequence_logprob(lang, tokens_BL, start_B, lengths_B).sum().item() / sum(map(len, responses))

    env_term = np.mean(traj.terminated)
    ref_term = np.mean([term for _, term in reference])
    # Tolerances are ~3.5 standard errors of the difference at n = 2000 (seeded, so deterministic).
    assert abs(env_term - ref_term) < 0.05
    assert abs(np.mean([len(r) for r in traj.responses]) - np.mean([len(r) for r, _ in reference])) < 0.6
    assert abs(nll_per_token(traj.responses) - nll_per_token([r for r, _ in reference])) < 0.08
