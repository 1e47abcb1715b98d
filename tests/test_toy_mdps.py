"""Toy MDP generators, the TabularMDP container and the TabularMDPEnv Gymnasium env."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs.toy_mdps as toy_mdps
from envs.toy_mdps import TabularMDP, TabularMDPEnv, random_mdp, random_token_mdp, token_prefixes
from tokenrl.theory.tabular import soft_optimal_policy, soft_value_iteration, top_p_support


def small_mdp() -> TabularMDP:
    return random_mdp(5, 3, np.random.default_rng(0), n_terminal=1)


def test_all_lists_the_public_names():
    assert sorted(toy_mdps.__all__) == [
        "TabularMDP",
        "TabularMDPEnv",
        "random_mdp",
        "random_token_mdp",
        "token_prefixes",
    ]


# ----------------------------------------------------------------------------------------------------------
# TabularMDP validation
# ----------------------------------------------------------------------------------------------------------


def test_tabular_mdp_validation_errors():
    mdp = small_mdp()
    bad_P = mdp.P_SAS.copy()
    bad_P[0, 0] *= 0.5
    with pytest.raises(ValueError, match="must sum to 1"):
        TabularMDP(mdp.r_SA, bad_P, 0.9)
    negative_P = mdp.P_SAS.copy()
    negative_P[0, 0, :2] = [-0.5, 1.5]
    negative_P[0, 0, 2:] = 0.0
    with pytest.raises(ValueError, match="non-negative"):
        TabularMDP(mdp.r_SA, negative_P, 0.9)
    with pytest.raises(ValueError, match=r"P_SAS must have shape \[S, A, S\]"):
        TabularMDP(mdp.r_SA, mdp.P_SAS[:, :2], 0.9)
    with pytest.raises(ValueError, match=r"\[S, A\]"):
        TabularMDP(mdp.r_SA[0], mdp.P_SAS, 0.9)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 1.0)
    with pytest.raises(ValueError, match="terminal_S must be a bool array of shape"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 0.9, terminal_S=np.zeros(5))
    with pytest.raises(ValueError, match="truncated_S must be a subset of terminal_S"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 0.9, truncated_S=np.eye(5, dtype=bool)[1])
    with pytest.raises(ValueError, match="teacher_SA"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 0.9, teacher_SA=np.full((5, 3), 0.5))
    with pytest.raises(ValueError, match=r"initial_S must have shape \(5,\)"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 0.9, initial_S=np.ones(4) / 4)
    with pytest.raises(ValueError, match="initial_S puts mass on a terminal state"):
        TabularMDP(mdp.r_SA, mdp.P_SAS, 0.9, terminal_S=np.eye(5, dtype=bool)[0])


# ----------------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------------


def test_random_mdp_structure():
    mdp = random_mdp(7, 4, np.random.default_rng(1), gamma=0.8, n_terminal=2)
    assert mdp.r_SA.shape == (7, 4) and mdp.P_SAS.shape == (7, 4, 7) and mdp.gamma == 0.8
    np.testing.assert_array_equal(mdp.terminal_S, [False] * 5 + [True] * 2)
    for s in (5, 6):  # terminal states are absorbing with reward 0
        np.testing.assert_array_equal(mdp.P_SAS[s, :, s], 1.0)
        np.testing.assert_array_equal(mdp.r_SA[s], 0.0)
    np.testing.assert_allclose(mdp.r_SA[:5], np.log(mdp.teacher_SA[:5]))
    np.testing.assert_allclose(mdp.initial_S, [0.2] * 5 + [0.0] * 2)
    again = random_mdp(7, 4, np.random.default_rng(1), gamma=0.8, n_terminal=2)
    np.testing.assert_array_equal(again.P_SAS, mdp.P_SAS)


def test_random_mdp_teacher_is_peaked():
    rng = np.random.default_rng(2)
    max_probs, set_sizes = [], []
    for _ in range(50):
        mdp = random_mdp(6, 8, rng)
        pi_star_SA = soft_optimal_policy(soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma)[0])
        max_probs.append(pi_star_SA.max(-1))
        set_sizes.append(top_p_support(pi_star_SA, 0.8).sum(-1))
    # A uniform policy over 8 actions has top probability 0.125 and a top-0.8 set of 7 actions.
    assert np.mean(max_probs) > 0.45
    assert np.mean(set_sizes) < 3.5


def test_token_prefixes_order():
    assert token_prefixes(3, 2) == [(), (1,), (2,), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert token_prefixes(3, 1, eos_id=2) == [(), (0,), (1,)]
    with pytest.raises(ValueError, match="vocab_size >= 2"):
        token_prefixes(1, 2)
    with pytest.raises(ValueError, match="eos_id"):
        token_prefixes(3, 2, eos_id=3)
    with pytest.raises(ValueError, match="states"):
        token_prefixes(50, 4)


@pytest.mark.parametrize("eos_id", [0, 2])
def test_random_token_mdp_structure(eos_id):
    vocab_size, max_len = 4, 3
    mdp = random_token_mdp(vocab_size, max_len, np.random.default_rng(3), eos_id=eos_id)
    prefixes = token_prefixes(vocab_size, max_len, eos_id)
    ended = len(prefixes)
    assert mdp.n_states == 1 + 3 + 9 + 27 + 1 == ended + 1
    assert mdp.n_actions == vocab_size
    np.testing.assert_array_equal(mdp.initial_S, np.eye(mdp.n_states)[0])
    for s, prefix in enumerate(prefixes):
        live = len(prefix) < max_len
        assert mdp.terminal_S[s] == (not live)
        assert mdp.truncated_S[s] == (len(prefix) == max_len)
        for a in range(vocab_size):
            if not live:
                expected = s
            elif a == eos_id:
                expected = ended
            else:
                expected = prefixes.index(prefix + (a,))
            assert mdp.P_SAS[s, a, expected] == 1.0
            assert mdp.r_SA[s, a] == (np.log(mdp.teacher_SA[s, a]) if live else 0.0)
    assert mdp.terminal_S[ended] and not mdp.truncated_S[ended]
    np.testing.assert_array_equal(mdp.P_SAS[ended, :, ended], 1.0)


def test_token_mdp_with_gamma_near_one_recovers_the_teacher():
    """With r = log teacher the soft value of every prefix is 0 at gamma = 1, so pi* = teacher."""
    mdp = random_token_mdp(4, 3, np.random.default_rng(4), gamma=1 - 1e-12, concentration=0.5)
    q_SA, _ = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, terminal_S=mdp.terminal_S)
    live_S = ~mdp.terminal_S
    np.testing.assert_allclose(soft_optimal_policy(q_SA)[live_S], mdp.teacher_SA[live_S], atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Gymnasium env
# ----------------------------------------------------------------------------------------------------------


def token_env(p: float | None = 0.8, max_episode_steps: int | None = None) -> TabularMDPEnv:
    mdp = random_token_mdp(4, 3, np.random.default_rng(5), concentration=0.5)
    support_SA = None
    if p is not None:
        q_star_SA, _ = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, terminal_S=mdp.terminal_S)
        support_SA = top_p_support(soft_optimal_policy(q_star_SA), p)
    return TabularMDPEnv(mdp, support_SA, max_episode_steps=max_episode_steps)


@pytest.mark.parametrize("p", [None, 0.8])
@pytest.mark.parametrize("max_episode_steps", [None, 2])
def test_check_env(p, max_episode_steps):
    check_env(token_env(p, max_episode_steps).unwrapped, skip_render_check=True)
    check_env(TabularMDPEnv(small_mdp(), max_episode_steps=max_episode_steps).unwrapped, skip_render_check=True)


def test_token_env_episode_terminates_on_eos_and_truncates_at_max_len():
    env = token_env(p=0.8)
    obs, info = env.reset(seed=0)
    assert obs == 0
    assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (4,)
    np.testing.assert_array_equal(info["action_mask"], env.support_SA[0])
    prefixes = token_prefixes(4, 3)
    for step, token in enumerate([1, 3, 2]):
        obs, reward, terminated, truncated, info = env.step(token)
        assert reward == env.mdp.r_SA[prefixes.index((1, 3, 2)[:step]), token]
        assert info["action_in_support"] == bool(env.support_SA[prefixes.index((1, 3, 2)[:step]), token])
        assert prefixes[obs] == (1, 3, 2)[: step + 1]
        assert not terminated and truncated == (step == 2)
    np.testing.assert_array_equal(info["action_mask"], 0)  # no actions past the length limit
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(1)

    env.reset(seed=0)
    env.step(2)
    obs, _, terminated, truncated, info = env.step(0)  # EOS
    assert (obs, terminated, truncated) == (len(prefixes), True, False)
    np.testing.assert_array_equal(info["action_mask"], 0)


def test_env_max_episode_steps_and_options():
    env = TabularMDPEnv(random_mdp(4, 2, np.random.default_rng(6)), max_episode_steps=3)
    obs, info = env.reset(seed=1, options={"state": 2})
    assert obs == 2 and info == {}  # no support given: no action mask
    flags = [env.step(0)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"start": 0})
    with pytest.raises(ValueError, match="live state"):
        env.reset(options={"state": 9})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not an action"):
        env.step(2)
    with pytest.raises(ValueError, match="max_episode_steps"):
        TabularMDPEnv(env.mdp, max_episode_steps=0)
    with pytest.raises(RuntimeError, match="before reset"):
        TabularMDPEnv(env.mdp).step(0)


def test_env_samples_transitions_from_P():
    mdp = random_mdp(3, 2, np.random.default_rng(7), transition_concentration=2.0)
    env = TabularMDPEnv(mdp)
    counts = np.zeros(3)
    for seed in range(2000):
        env.reset(seed=seed, options={"state": 1})
        counts[env.step(1)[0]] += 1
    np.testing.assert_allclose(counts / counts.sum(), mdp.P_SAS[1, 1], atol=0.04)


def test_env_rejects_bad_support():
    mdp = small_mdp()
    with pytest.raises(ValueError, match="bool array of shape"):
        TabularMDPEnv(mdp, np.ones((5, 2), dtype=bool))
    empty_SA = np.ones((5, 3), dtype=bool)
    empty_SA[0] = False
    with pytest.raises(ValueError, match="at least one action"):
        TabularMDPEnv(mdp, empty_SA)
