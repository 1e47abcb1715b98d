"""Exact tabular operators: oracles for every kernel, and Propositions 1-4 checked on random MDPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from envs.toy_mdps import TabularMDP, random_mdp, random_token_mdp
from tokenrl.theory.tabular import (
    contraction_modulus,
    kappa,
    project_policy,
    soft_bellman,
    soft_bellman_eval,
    soft_optimal_policy,
    soft_policy_evaluation,
    soft_value,
    soft_value_iteration,
    sparse_soft_value_iteration,
    top_p_support,
)

P_VALUES = (0.5, 0.8, 0.95, 1.0)
GAMMA = 0.9
TOL = 1e-8


# ----------------------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------------------


def warper_support(probs_SA: np.ndarray, p: float) -> np.ndarray:
    """Per-state oracle: the tokens transformers' TopPLogitsWarper does not filter."""
    warper = TopPLogitsWarper(top_p=p, min_tokens_to_keep=1, filter_value=float("nan"))
    rows = []
    with np.errstate(divide="ignore"):
        logits_SA = np.log(probs_SA)
    for logits_A in logits_SA:
        out = warper(None, torch.from_numpy(logits_A)[None])[0]
        rows.append(~torch.isnan(out).numpy())
    return np.stack(rows)


def slow_soft_value(q_SA, support_SA, terminal_S):
    v_S = np.zeros(q_SA.shape[0])
    for s in range(q_SA.shape[0]):
        if not terminal_S[s]:
            v_S[s] = np.log(sum(np.exp(q_SA[s, a]) for a in range(q_SA.shape[1]) if support_SA[s, a]))
    return v_S


def slow_bellman(q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S, pi_SA=None):
    """Per-pair loop of B_p (pi_SA None) or B_p^pi."""
    n_states, n_actions = q_SA.shape
    next_v_S = np.zeros(n_states)
    for s2 in range(n_states):
        if terminal_S[s2]:
            continue
        if pi_SA is None:
            next_v_S[s2] = slow_soft_value(q_SA[s2 : s2 + 1], support_SA[s2 : s2 + 1], [False])[0]
        else:
            mass = sum(pi_SA[s2, b] for b in range(n_actions) if support_SA[s2, b])
            for a2 in range(n_actions):
                if support_SA[s2, a2] and pi_SA[s2, a2] > 0:
                    proj = pi_SA[s2, a2] / mass
                    next_v_S[s2] += proj * (q_SA[s2, a2] - np.log(proj))
    out_SA = np.zeros_like(q_SA)
    for s in range(n_states):
        for a in range(n_actions):
            out_SA[s, a] = r_SA[s, a] + gamma * sum(P_SAS[s, a, s2] * next_v_S[s2] for s2 in range(n_states))
    return out_SA


def random_support(rng, n_states, n_actions, terminal_S):
    support_SA = rng.random((n_states, n_actions)) < 0.5
    support_SA[np.arange(n_states), rng.integers(n_actions, size=n_states)] = True
    support_SA[terminal_S] = False
    return support_SA


# ----------------------------------------------------------------------------------------------------------
# Kernels against oracles
# ----------------------------------------------------------------------------------------------------------


def tie_rows() -> np.ndarray:
    return np.array(
        [
            [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],
            [0.4, 0.2, 0.2, 0.2, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.3, 0.1, 0.3, 0.1, 0.1],
            [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1 / 6] * 6,
        ]
    )


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.3, 0.5, 0.6, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_support_matches_transformers_warper(p):
    rng = np.random.default_rng(0)
    peaked_SA = rng.dirichlet(np.full(6, 0.3), size=40)
    flat_SA = rng.dirichlet(np.full(6, 3.0), size=40)
    probs_SA = np.concatenate([peaked_SA, flat_SA, tie_rows()])
    support_SA = top_p_support(probs_SA, p)
    assert support_SA.dtype == np.bool_ and support_SA.shape == probs_SA.shape
    np.testing.assert_array_equal(support_SA, warper_support(probs_SA, p))


def test_top_p_support_semantics():
    probs_SA = np.array([[0.5, 0.3, 0.2], [0.2, 0.0, 0.8]])
    np.testing.assert_array_equal(top_p_support(probs_SA, 1.0), [[True, True, True], [True, False, True]])
    np.testing.assert_array_equal(top_p_support(probs_SA, 1e-9), [[True, False, False], [False, False, True]])
    # Thresholds away from the cumulative masses: exactly at one, the float rounding of the cumsum decides.
    np.testing.assert_array_equal(top_p_support(probs_SA, 0.75), [[True, True, False], [False, False, True]])
    np.testing.assert_array_equal(top_p_support(probs_SA, 0.85), [[True, True, True], [True, False, True]])


def test_soft_value_is_a_stable_masked_logsumexp():
    rng = np.random.default_rng(1)
    q_SA = rng.normal(size=(7, 5)) * 3
    terminal_S = np.array([False] * 6 + [True])
    support_SA = random_support(rng, 7, 5, terminal_S)
    np.testing.assert_allclose(
        soft_value(q_SA, support_SA, terminal_S), slow_soft_value(q_SA, support_SA, terminal_S), atol=1e-12
    )
    np.testing.assert_allclose(soft_value(q_SA), np.log(np.exp(q_SA).sum(-1)), atol=1e-12)
    # exp(1000) overflows: a naive logsumexp gives inf.
    np.testing.assert_allclose(soft_value(np.array([[1000.0, 1000.0, -1000.0]])), [1000.0 + np.log(2.0)])


@pytest.mark.parametrize("with_terminal", [False, True])
def test_soft_bellman_operators_match_slow_loops(with_terminal):
    rng = np.random.default_rng(2)
    for _ in range(5):
        mdp = random_mdp(6, 4, rng, gamma=0.8, n_terminal=2 if with_terminal else 0)
        support_SA = random_support(rng, 6, 4, mdp.terminal_S)
        q_SA = rng.normal(size=(6, 4)) * 2
        pi_SA = rng.dirichlet(np.ones(4), size=6)
        pi_SA[0, :] = 0.0
        pi_SA[0, np.flatnonzero(support_SA[0])[0]] = 1.0  # a deterministic row: 0 log 0 terms must vanish
        pi_SA[mdp.terminal_S] = 0.0  # rows of terminal states are never read, so need not be distributions
        args = (mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA, mdp.terminal_S)
        np.testing.assert_allclose(soft_bellman(q_SA, *args), slow_bellman(q_SA, *args), atol=1e-12)
        np.testing.assert_allclose(
            soft_bellman_eval(q_SA, pi_SA, *args), slow_bellman(q_SA, *args, pi_SA=pi_SA), atol=1e-12
        )


def test_unrestricted_operators_equal_restricted_ones_with_full_support():
    rng = np.random.default_rng(3)
    mdp = random_mdp(5, 3, rng)
    q_SA = rng.normal(size=(5, 3))
    pi_SA = rng.dirichlet(np.ones(3), size=5)
    full_SA = np.ones((5, 3), dtype=bool)
    np.testing.assert_array_equal(
        soft_bellman(q_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma),
        soft_bellman(q_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma, full_SA),
    )
    np.testing.assert_allclose(
        soft_bellman_eval(q_SA, pi_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma),
        slow_bellman(q_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma, full_SA, np.zeros(5, bool), pi_SA=pi_SA),
        atol=1e-12,
    )


def test_project_policy_and_soft_optimal_policy():
    pi_SA = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    support_SA = np.array([[True, True, False], [False, False, True], [False, False, False]])
    np.testing.assert_allclose(project_policy(pi_SA, support_SA), [[0.625, 0.375, 0], [0, 0, 1], [0, 0, 0]])
    q_SA = np.log(pi_SA) + 7.0
    np.testing.assert_allclose(soft_optimal_policy(q_SA), pi_SA, atol=1e-12)
    np.testing.assert_allclose(soft_optimal_policy(q_SA, support_SA), project_policy(pi_SA, support_SA), atol=1e-12)


def test_kappa_values():
    assert kappa(0.8, 0.99) == pytest.approx(-0.99 * np.log(0.8) / 0.01)
    assert kappa(0.8, 0.99) == pytest.approx(22.09, abs=0.005)
    assert kappa(1.0, 0.99) == 0.0
    assert kappa(0.5, 0.0) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Propositions 1-4 on random MDPs
# ----------------------------------------------------------------------------------------------------------


def check_propositions(mdp: TabularMDP, rng: np.random.Generator) -> None:
    """Assert Propositions 1-4 for one MDP at every p in P_VALUES."""
    r_SA, P_SAS, gamma, terminal_S = mdp.r_SA, mdp.P_SAS, mdp.gamma, mdp.terminal_S
    q_star_SA, _ = soft_value_iteration(r_SA, P_SAS, gamma, terminal_S=terminal_S, tol=1e-12)
    pi_star_SA = soft_optimal_policy(q_star_SA)
    # Q* is also the soft Q-function of its own Boltzmann policy.
    np.testing.assert_allclose(
        soft_policy_evaluation(pi_star_SA, r_SA, P_SAS, gamma, terminal_S=terminal_S), q_star_SA, atol=TOL
    )
    for p in P_VALUES:
        support_SA = top_p_support(pi_star_SA, p)
        live_SA = support_SA & ~terminal_S[:, None]

        def opt(q_SA):
            return soft_bellman(q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)

        def ev(q_SA):
            return soft_bellman_eval(q_SA, pi_star_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)

        # Prop. 1: contraction, tight for a constant shift (every backup then moves by exactly gamma * c,
        # except next to terminal states, where it moves by less).
        q1_SA = rng.normal(size=r_SA.shape) * 5
        pairs = [q1_SA + rng.normal(size=r_SA.shape), q1_SA + 3.0, q1_SA + 3.0 * (rng.random(r_SA.shape) < 0.2)]
        for q2_SA in pairs:
            if not np.any((q1_SA != q2_SA) & support_SA):
                continue
            for op in (opt, ev):
                assert contraction_modulus(op, q1_SA, q2_SA, support_SA) <= gamma + 1e-9
        if not terminal_S.any():
            assert contraction_modulus(opt, q1_SA, q1_SA + 3.0, support_SA) == pytest.approx(gamma, abs=1e-9)
            assert contraction_modulus(ev, q1_SA, q1_SA + 3.0, support_SA) == pytest.approx(gamma, abs=1e-9)

        q_p_SA, _ = soft_value_iteration(r_SA, P_SAS, gamma, support_SA, terminal_S, tol=1e-12)
        assert np.max(np.abs(opt(q_p_SA) - q_p_SA)) < 1e-10
        q_proj_SA = soft_policy_evaluation(pi_star_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)
        assert np.max(np.abs(ev(q_proj_SA) - q_proj_SA)) < 1e-9

        # Props. 2-3: the sandwich on supported pairs.
        assert np.all(q_proj_SA[live_SA] <= q_p_SA[live_SA] + TOL)
        assert np.all(q_p_SA[live_SA] <= q_star_SA[live_SA] + TOL)
        # Prop. 4: the gap bound.
        gap = np.max(np.abs(q_star_SA - q_p_SA)[live_SA])
        assert gap <= kappa(p, gamma) + TOL
        if p == 1.0:
            np.testing.assert_allclose(q_p_SA, q_star_SA, atol=TOL)
            np.testing.assert_allclose(q_proj_SA, q_star_SA, atol=TOL)


def test_propositions_on_random_mdps():
    rng = np.random.default_rng(4)
    for i in range(100):
        mdp = random_mdp(int(rng.integers(2, 8)), int(rng.integers(2, 6)), rng, gamma=GAMMA, n_terminal=i % 2)
        check_propositions(mdp, rng)


def test_propositions_on_random_token_mdps():
    rng = np.random.default_rng(5)
    for i in range(30):
        vocab_size, max_len = [(3, 3), (4, 2), (4, 3), (5, 2)][i % 4]
        mdp = random_token_mdp(vocab_size, max_len, rng, gamma=GAMMA, concentration=[0.1, 0.5][i % 2])
        check_propositions(mdp, rng)


def test_sandwich_is_not_vacuous():
    """At p < 1 the sets are strictly smaller somewhere and both inequalities are strict somewhere."""
    rng = np.random.default_rng(6)
    mdp = random_mdp(6, 5, rng, gamma=GAMMA, teacher_concentration=1.0)
    q_star_SA, _ = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma)
    pi_star_SA = soft_optimal_policy(q_star_SA)
    support_SA = top_p_support(pi_star_SA, 0.5)
    assert support_SA.sum() < support_SA.size
    q_p_SA, _ = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA)
    q_proj_SA = soft_policy_evaluation(pi_star_SA, mdp.r_SA, mdp.P_SAS, mdp.gamma, support_SA)
    assert np.max(q_star_SA - q_p_SA) > 1e-3
    assert np.max(q_p_SA - q_proj_SA) > 1e-3


def test_value_iteration_matches_exact_evaluation_and_counts_iterations():
    rng = np.random.default_rng(7)
    mdp = random_mdp(5, 3, rng, gamma=0.5)
    q_SA, n_iters = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, tol=1e-12)
    # Q* is the soft Q of its Boltzmann policy, which the linear solve computes independently.
    exact_SA = soft_policy_evaluation(soft_optimal_policy(q_SA), mdp.r_SA, mdp.P_SAS, mdp.gamma)
    np.testing.assert_allclose(q_SA, exact_SA, atol=1e-10)
    assert 10 < n_iters < 200
    _, n_gamma0 = soft_value_iteration(mdp.r_SA, mdp.P_SAS, 0.0)
    assert n_gamma0 == 2  # B Q_0 is the fixed point; one more backup confirms it


def test_value_iteration_warns_when_not_converged():
    mdp = random_mdp(4, 3, np.random.default_rng(8), gamma=0.99)
    with pytest.warns(RuntimeWarning, match="did not converge in 3 iterations"):
        _, n_iters = soft_value_iteration(mdp.r_SA, mdp.P_SAS, mdp.gamma, max_iters=3)
    assert n_iters == 3


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def test_validation_errors():
    rng = np.random.default_rng(9)
    mdp = random_mdp(4, 3, rng)
    q_SA = np.zeros((4, 3))
    bad_P = mdp.P_SAS.copy()
    bad_P[1, 2, 0] += 1e-6
    with pytest.raises(ValueError, match=r"row 5 sums to"):
        soft_bellman(q_SA, mdp.r_SA, bad_P, 0.9)
    with pytest.raises(ValueError, match=r"P_SAS must have shape \[S, A, S\]"):
        soft_bellman(q_SA, mdp.r_SA, mdp.P_SAS[:, :, :3], 0.9)
    with pytest.raises(ValueError, match="same shape"):
        soft_bellman(np.zeros((4, 2)), mdp.r_SA, mdp.P_SAS, 0.9)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        soft_value_iteration(mdp.r_SA, mdp.P_SAS, 1.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        kappa(0.8, -0.1)
    empty_SA = np.ones((4, 3), dtype=bool)
    empty_SA[2] = False
    with pytest.raises(ValueError, match=r"at least one action in every non-terminal state; empty at states \[2\]"):
        soft_value(q_SA, empty_SA)
    soft_value(q_SA, empty_SA, terminal_S=np.array([False, False, True, False]))  # fine at a terminal state
    with pytest.raises(ValueError, match="bool array"):
        soft_value(q_SA, empty_SA.astype(int))
    with pytest.raises(ValueError, match="terminal_S must be a bool array"):
        soft_value(q_SA, terminal_S=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match=r"\[S, A\]"):
        soft_value(np.zeros(4))
    for p in (0.0, -0.2, 1.5, "x"):
        with pytest.raises(ValueError, match=r"p must be .*\(0, 1\]"):
            top_p_support(np.full((2, 3), 1 / 3), p)
        with pytest.raises(ValueError, match=r"p must be .*\(0, 1\]"):
            kappa(p, 0.9)
    with pytest.raises(ValueError, match="must sum to 1"):
        top_p_support(np.full((2, 3), 0.3), 0.5)
    with pytest.raises(ValueError, match="zero mass on the support at states"):
        project_policy(np.array([[1.0, 0.0]]), np.array([[False, True]]))
    with pytest.raises(ValueError, match="agree on every supported pair"):
        contraction_modulus(lambda q: q, q_SA, q_SA)


@pytest.mark.parametrize("with_terminal", [False, True])
def test_sparse_value_iteration_matches_dense_top_p_value_iteration(with_terminal):
    # A deterministic MDP whose top-p sets are small: the sparse solver sees only the set members.
    rng = np.random.default_rng(3)
    n_states, n_actions, gamma = 12, 40, 0.9
    next_SA = rng.integers(0, n_states, size=(n_states, n_actions))
    P_SAS = np.zeros((n_states, n_actions, n_states))
    P_SAS[np.arange(n_states)[:, None], np.arange(n_actions), next_SA] = 1.0
    r_SA = rng.normal(size=(n_states, n_actions))
    probs_SA = rng.dirichlet(np.full(n_actions, 0.05), size=n_states)
    support_SA = top_p_support(probs_SA, 0.8)
    terminal_S = np.zeros(n_states, dtype=bool)
    if with_terminal:
        terminal_S[[2, 7]] = True
        support_SA[2] = False  # a terminal state may have an empty set
    q_SA, _ = soft_value_iteration(r_SA, P_SAS, gamma, support_SA, terminal_S)

    width = support_SA.sum(-1).max()
    ids_SK = np.argsort(~support_SA, axis=-1, kind="stable")[:, :width]
    valid_SK = np.take_along_axis(support_SA, ids_SK, -1)
    r_SK = np.take_along_axis(r_SA, ids_SK, -1)
    next_SK = np.take_along_axis(next_SA, ids_SK, -1)
    q_SK, _ = sparse_soft_value_iteration(r_SK, next_SK, valid_SK, gamma, terminal_S)

    # Both stop within gamma / (1 - gamma) * 1e-10 of the same fixed point.
    np.testing.assert_allclose(q_SK[valid_SK], np.take_along_axis(q_SA, ids_SK, -1)[valid_SK], rtol=0, atol=1e-8)
    assert np.all(q_SK[~valid_SK] == 0)


def test_sparse_value_iteration_rejects_empty_sets_and_bad_next_states():
    r_SK, valid_SK = np.zeros((2, 2)), np.array([[True, False], [False, False]])
    with pytest.raises(ValueError, match="empty action set"):
        sparse_soft_value_iteration(r_SK, np.zeros((2, 2), dtype=int), valid_SK, 0.9)
    with pytest.raises(ValueError, match="outside"):
        sparse_soft_value_iteration(r_SK, np.full((2, 2), 5), np.ones((2, 2), dtype=bool), 0.9)
