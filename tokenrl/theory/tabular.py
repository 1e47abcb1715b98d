"""Exact tabular soft-RL operators of the top-p MDP (numpy, float64).

These are the reference implementations of Section 3 of the Bellman Distill notes: the top-p soft Bellman
optimality and policy-evaluation operators, their fixed points, and the quantities of Propositions 1-4
(gamma-contraction, the sandwich ``Q^{proj_p pi*} <= Q_p* <= Q*`` and the gap bound ``kappa(p)``). They are
small and exact so that tests can check the theory to machine precision on random MDPs.

Conventions (shape suffixes: ``S`` states, ``A`` actions):

- ``P_SAS[s, a, s']`` is the probability of moving to ``s'`` after taking ``a`` in ``s``.
- ``support_SA[s, a]`` is True when ``a`` is in the action set ``A_p(s)``; None means every action.
  Every non-terminal state must keep at least one action; rows of terminal states are never read.
- ``terminal_S[s]`` is True when ``s`` ends the episode: its soft value is 0 whatever the Q-values there.
- Entropy temperature is 1: ``V_p(s) = log sum_{a in A_p(s)} exp Q(s, a)``.
- "Supported pairs" are the ``(s, a)`` with ``support_SA[s, a]``; sup-norms in the propositions run over them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from tokenrl.core.distributions import project_to_set, soft_value as masked_soft_value
from tokenrl.core.top_p import check_p, top_p_mask
from tokenrl.theory.checks import (
    _check_distribution_rows,
    _check_gamma,
    _check_operator,
    _check_q,
    _check_support,
    _check_terminal,
)

__all__ = [
    "contraction_modulus",
    "kappa",
    "project_policy",
    "soft_bellman",
    "soft_bellman_eval",
    "soft_optimal_policy",
    "soft_policy_evaluation",
    "soft_value",
    "soft_value_iteration",
    "sparse_soft_value_iteration",
    "top_p_support",
]

def _soft_value(q_SA: np.ndarray, support_SA: np.ndarray, terminal_S: np.ndarray) -> np.ndarray:
    # The shared formula of the token losses, on float64 tables (empty rows give -inf, overwritten at terminals).
    v_S = masked_soft_value(torch.from_numpy(q_SA), torch.from_numpy(support_SA)).numpy()
    return np.where(terminal_S, 0.0, v_S)


def _project_policy(pi_SA: np.ndarray, support_SA: np.ndarray) -> np.ndarray:
    kept_SA = np.where(support_SA, pi_SA, 0.0)
    mass_S = kept_SA.sum(-1)
    starved_S = (mass_S <= 0) & support_SA.any(-1)
    if np.any(starved_S):
        raise ValueError(
            f"pi_SA puts zero mass on the support at states {np.flatnonzero(starved_S)[:10].tolist()}; "
            "it cannot be projected there"
        )
    return kept_SA / np.where(mass_S > 0, mass_S, 1.0)[:, None]


def _projected_on_nonterminal(pi_SA: np.ndarray, support_SA: np.ndarray, terminal_S: np.ndarray) -> np.ndarray:
    # Terminal rows are never read, so neither their policy rows nor their (possibly empty) action sets are
    # checked, e.g. soft_optimal_policy gives all-zero rows where a set is empty.
    pi_SA = np.asarray(pi_SA, dtype=np.float64)
    if pi_SA.shape != support_SA.shape:
        raise ValueError(f"pi_SA must have shape {support_SA.shape}, got {pi_SA.shape}")
    _check_distribution_rows(np.where(terminal_S[:, None], 1.0 / pi_SA.shape[1], pi_SA), "pi_SA")
    return _project_policy(pi_SA, support_SA & ~terminal_S[:, None])


def _policy_soft_value(q_SA: np.ndarray, proj_SA: np.ndarray, terminal_S: np.ndarray) -> np.ndarray:
    # E_{a ~ proj}[Q(s, a) - log proj(a|s)], with 0 log 0 = 0 for actions the projection never takes.
    log_proj_SA = np.log(np.where(proj_SA > 0, proj_SA, 1.0))
    return np.where(terminal_S, 0.0, (proj_SA * (q_SA - log_proj_SA)).sum(-1))


def _backup(r_SA: np.ndarray, P_SAS: np.ndarray, gamma: float, v_S: np.ndarray) -> np.ndarray:
    return r_SA + gamma * (P_SAS @ v_S)


def _iterate_to_fixed_point(
    step: Callable[[np.ndarray], np.ndarray], q_SX: np.ndarray, tol: float, max_iters: int, name: str
) -> tuple[np.ndarray, int]:
    # The value-iteration loop of both solvers (X = A dense, K sparse): apply `step` until the sup-norm
    # increment is <= tol.
    for n_iters in range(1, max_iters + 1):
        q_next_SX = step(q_SX)
        delta = np.max(np.abs(q_next_SX - q_SX))
        q_SX = q_next_SX
        if delta <= tol:
            return q_SX, n_iters
    warnings.warn(
        f"{name} did not converge in {max_iters} iterations "
        f"(last increment {delta:.3g} > tol {tol:g}); raise max_iters or tol",
        RuntimeWarning,
        stacklevel=3,
    )
    return q_SX, max_iters


def top_p_support(probs_SA: np.ndarray, p: float) -> np.ndarray:
    """Top-p (nucleus) action set of every state.

    Same rule and tie-breaking as :func:`tokenrl.core.top_p.top_p_mask` (hence transformers' ``TopPLogitsWarper``
    with ``min_tokens_to_keep=1``): the shortest descending prefix of each row whose mass is ``>= p``.
    ``p = 1`` keeps exactly the actions with non-zero probability.

    Args:
        probs_SA: ``[S, A]`` probabilities, each row summing to 1.
        p: threshold in (0, 1].

    Returns:
        ``[S, A]`` bool array, True for actions in ``A_p(s)``.

    Raises:
        ValueError: on a bad shape, rows that are not distributions, or ``p`` outside (0, 1].
    """
    p = check_p(p)
    probs_SA = _check_distribution_rows(probs_SA, "probs_SA")
    with np.errstate(divide="ignore"):
        logits_SA = np.log(probs_SA)
    return top_p_mask(torch.from_numpy(logits_SA), p).numpy()


def soft_value(
    q_SA: np.ndarray, support_SA: np.ndarray | None = None, terminal_S: np.ndarray | None = None
) -> np.ndarray:
    """Soft value ``V_p(s) = log sum_{a in A_p(s)} exp Q(s, a)``, 0 at terminal states.

    Args:
        q_SA: ``[S, A]`` finite Q-values.
        support_SA: ``[S, A]`` bool action sets; None keeps every action.
        terminal_S: ``[S]`` bool terminal flags; None means no terminal state.

    Returns:
        ``[S]`` soft values (a numerically stable log-sum-exp).

    Raises:
        ValueError: on bad shapes or a non-terminal state with an empty action set.
    """
    q_SA = _check_q(q_SA)
    terminal_S = _check_terminal(terminal_S, q_SA.shape[0])
    support_SA = _check_support(support_SA, q_SA.shape, terminal_S)
    return _soft_value(q_SA, support_SA, terminal_S)


def project_policy(pi_SA: np.ndarray, support_SA: np.ndarray) -> np.ndarray:
    """Projection onto the action sets: ``proj(pi)(a|s) = pi(a|s) 1[a in A_p(s)] / sum_{b in A_p(s)} pi(b|s)``.

    Args:
        pi_SA: ``[S, A]`` policy, each row a distribution.
        support_SA: ``[S, A]`` bool action sets. A row with no action (a terminal state) comes back all zero.

    Returns:
        ``[S, A]`` projected policy: rows with a non-empty set sum to 1 and vanish outside it.

    Raises:
        ValueError: on bad shapes, rows that are not distributions, or a state whose set has zero mass under
            ``pi_SA``.
    """
    pi_SA = _check_distribution_rows(pi_SA, "pi_SA")
    support_SA = np.asarray(support_SA)
    if support_SA.shape != pi_SA.shape or support_SA.dtype != np.bool_:
        raise ValueError(
            f"support_SA must be a bool array of shape {pi_SA.shape}, got {support_SA.dtype} {support_SA.shape}"
        )
    return _project_policy(pi_SA, support_SA)


def soft_optimal_policy(q_SA: np.ndarray, support_SA: np.ndarray | None = None) -> np.ndarray:
    """Soft-optimal (Boltzmann) policy ``pi(a|s) = exp(Q(s, a) - V_p(s))`` on the action sets.

    Args:
        q_SA: ``[S, A]`` finite Q-values.
        support_SA: ``[S, A]`` bool action sets; None keeps every action. A row with no action comes back
            all zero.

    Returns:
        ``[S, A]`` policy, zero outside the action sets.
    """
    q_SA = _check_q(q_SA)
    if support_SA is None:
        support_SA = np.ones(q_SA.shape, dtype=bool)
    # Empty rows are allowed here (terminal states), so check only shape and dtype.
    support_SA = _check_support(support_SA, q_SA.shape, terminal_S=np.ones(q_SA.shape[0], dtype=bool))
    return project_to_set(torch.from_numpy(q_SA), torch.from_numpy(support_SA), log=False).numpy()


def soft_bellman(
    q_SA: np.ndarray,
    r_SA: np.ndarray,
    P_SAS: np.ndarray,
    gamma: float,
    support_SA: np.ndarray | None = None,
    terminal_S: np.ndarray | None = None,
) -> np.ndarray:
    """Top-p soft Bellman optimality operator ``(B_p Q)(s, a) = r(s, a) + gamma sum_s' P(s'|s, a) V_p(s')``.

    Args:
        q_SA: ``[S, A]`` Q-values.
        r_SA: ``[S, A]`` rewards.
        P_SAS: ``[S, A, S]`` transition probabilities (rows over ``s'`` sum to 1).
        gamma: discount in [0, 1).
        support_SA: ``[S, A]`` bool action sets; None is the unrestricted operator ``B``.
        terminal_S: ``[S]`` bool terminal flags (soft value 0).

    Returns:
        ``[S, A]`` the backed-up Q-values.

    Raises:
        ValueError: on bad shapes, transition rows that do not sum to 1, gamma outside [0, 1), or an empty
            action set at a non-terminal state.
    """
    q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S = _check_operator(q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)
    return _backup(r_SA, P_SAS, gamma, _soft_value(q_SA, support_SA, terminal_S))


def soft_bellman_eval(
    q_SA: np.ndarray,
    pi_SA: np.ndarray,
    r_SA: np.ndarray,
    P_SAS: np.ndarray,
    gamma: float,
    support_SA: np.ndarray | None = None,
    terminal_S: np.ndarray | None = None,
) -> np.ndarray:
    """Top-p soft policy-evaluation operator.

    ``(B_p^pi Q)(s, a) = r(s, a) + gamma E_{s' ~ P(.|s, a), a' ~ proj_p(pi)(.|s')}[Q(s', a') - log proj_p(pi)(a'|s')]``
    where ``proj_p`` renormalises ``pi`` on the action sets (see :func:`project_policy`).

    Args:
        q_SA: ``[S, A]`` Q-values.
        pi_SA: ``[S, A]`` policy to evaluate: at every non-terminal state a distribution with mass on the
            action set (rows of terminal states are ignored).
        r_SA: ``[S, A]`` rewards.
        P_SAS: ``[S, A, S]`` transition probabilities.
        gamma: discount in [0, 1).
        support_SA: ``[S, A]`` bool action sets; None keeps every action (then ``pi`` is used as is).
        terminal_S: ``[S]`` bool terminal flags (soft value 0).

    Returns:
        ``[S, A]`` the backed-up Q-values.

    Raises:
        ValueError: as :func:`soft_bellman`, and when a non-terminal row of ``pi_SA`` is not a distribution
            or has zero mass on its action set.
    """
    q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S = _check_operator(q_SA, r_SA, P_SAS, gamma, support_SA, terminal_S)
    proj_SA = _projected_on_nonterminal(pi_SA, support_SA, terminal_S)
    return _backup(r_SA, P_SAS, gamma, _policy_soft_value(q_SA, proj_SA, terminal_S))


def soft_value_iteration(
    r_SA: np.ndarray,
    P_SAS: np.ndarray,
    gamma: float,
    support_SA: np.ndarray | None = None,
    terminal_S: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iters: int = 100_000,
) -> tuple[np.ndarray, int]:
    """Fixed point ``Q_p*`` of :func:`soft_bellman` by value iteration from ``Q_0 = 0``.

    Iterates ``Q_{k+1} = B_p Q_k`` until ``||Q_{k+1} - Q_k||_inf <= tol`` (over all pairs); by the
    gamma-contraction the result is then within ``gamma / (1 - gamma) * tol`` of the fixed point.

    Args:
        r_SA: ``[S, A]`` rewards.
        P_SAS: ``[S, A, S]`` transition probabilities.
        gamma: discount in [0, 1).
        support_SA: ``[S, A]`` bool action sets; None solves the unrestricted MDP (``Q*``).
        terminal_S: ``[S]`` bool terminal flags.
        tol: stopping threshold on the sup-norm increment.
        max_iters: iteration cap; reaching it emits a ``RuntimeWarning`` and returns the last iterate.

    Returns:
        ``(q_SA, n_iters)``: ``[S, A]`` the (approximate) fixed point and the number of backups applied.

    Raises:
        ValueError: as :func:`soft_bellman`, or for ``tol <= 0`` or ``max_iters < 1``.
    """
    _, r_SA, P_SAS, gamma, support_SA, terminal_S = _check_operator(None, r_SA, P_SAS, gamma, support_SA, terminal_S)
    if tol <= 0 or max_iters < 1:
        raise ValueError(f"need tol > 0 and max_iters >= 1, got tol={tol!r}, max_iters={max_iters!r}")
    return _iterate_to_fixed_point(
        lambda q_SA: _backup(r_SA, P_SAS, gamma, _soft_value(q_SA, support_SA, terminal_S)),
        np.zeros_like(r_SA), tol, max_iters, "soft_value_iteration",
    )


def sparse_soft_value_iteration(
    r_SK: np.ndarray,
    next_SK: np.ndarray,
    valid_SK: np.ndarray,
    gamma: float,
    terminal_S: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iters: int = 100_000,
) -> tuple[np.ndarray, int]:
    """:func:`soft_value_iteration` on a top-p MDP stored sparsely: only the actions of each set.

    Each state keeps its ``K`` set members (padded to the largest set), so one backup costs ``O(S K)``
    instead of the dense ``O(S A S)``: the cost grows with the set size, not with ``|A|``. Transitions are
    deterministic (a token MDP's next state is the prefix plus the token).

    Args:
        r_SK: ``[S, K]`` rewards of the set members (padding entries are ignored).
        next_SK: ``[S, K]`` int next state of each set member (padding entries are ignored).
        valid_SK: ``[S, K]`` bool, True for real set members; every non-terminal state keeps at least one.
        gamma: discount in [0, 1).
        terminal_S: ``[S]`` bool terminal flags; None means no terminal state.
        tol: stopping threshold on the sup-norm increment over set members.
        max_iters: iteration cap; reaching it emits a ``RuntimeWarning`` and returns the last iterate.

    Returns:
        ``(q_SK, n_iters)``: ``[S, K]`` the (approximate) fixed point on set members (0 at padding) and
        the number of backups applied.

    Raises:
        ValueError: on mismatched shapes, next states out of range, an empty set at a non-terminal state,
            or a bad ``gamma``, ``tol`` or ``max_iters``.
    """
    r_SK = np.asarray(r_SK, dtype=np.float64)
    next_SK = np.asarray(next_SK)
    valid_SK = np.asarray(valid_SK, dtype=bool)
    gamma = _check_gamma(gamma)
    if r_SK.ndim != 2 or next_SK.shape != r_SK.shape or valid_SK.shape != r_SK.shape:
        raise ValueError(
            f"r_SK, next_SK and valid_SK must share one [S, K] shape, got {r_SK.shape}, {next_SK.shape}, {valid_SK.shape}"
        )
    n_states = r_SK.shape[0]
    terminal_S = _check_terminal(terminal_S, n_states)
    next_SK = np.where(valid_SK, next_SK, 0).astype(np.int64)
    if next_SK.size and (next_SK.min() < 0 or next_SK.max() >= n_states):
        raise ValueError(f"next_SK holds states outside [0, {n_states})")
    empty_S = ~valid_SK.any(-1) & ~terminal_S
    if np.any(empty_S):
        raise ValueError(f"non-terminal states {np.flatnonzero(empty_S)[:10].tolist()} have an empty action set")
    if tol <= 0 or max_iters < 1:
        raise ValueError(f"need tol > 0 and max_iters >= 1, got tol={tol!r}, max_iters={max_iters!r}")
    r_SK = np.where(valid_SK, r_SK, 0.0)
    return _iterate_to_fixed_point(
        lambda q_SK: np.where(valid_SK, r_SK + gamma * _soft_value(q_SK, valid_SK, terminal_S)[next_SK], 0.0),
        np.zeros_like(r_SK), tol, max_iters, "sparse_soft_value_iteration",
    )


def soft_policy_evaluation(
    pi_SA: np.ndarray,
    r_SA: np.ndarray,
    P_SAS: np.ndarray,
    gamma: float,
    support_SA: np.ndarray | None = None,
    terminal_S: np.ndarray | None = None,
) -> np.ndarray:
    """Exact fixed point ``Q^{proj_p pi}`` of :func:`soft_bellman_eval` by one linear solve.

    With ``v(s) = E_{a ~ proj}[Q(s, a) - log proj(a|s)]`` (0 at terminal states) the fixed point satisfies
    ``(I - gamma P_pi) v = r_pi + H_pi`` on the non-terminal states, an ``[S, S]`` system, and then
    ``Q = r + gamma P v``.

    Args:
        pi_SA: ``[S, A]`` policy to evaluate (rows of terminal states are ignored).
        r_SA: ``[S, A]`` rewards.
        P_SAS: ``[S, A, S]`` transition probabilities.
        gamma: discount in [0, 1).
        support_SA: ``[S, A]`` bool action sets; None keeps every action.
        terminal_S: ``[S]`` bool terminal flags.

    Returns:
        ``[S, A]`` soft Q-function of the projected policy in the top-p MDP.

    Raises:
        ValueError: as :func:`soft_bellman_eval`.
    """
    _, r_SA, P_SAS, gamma, support_SA, terminal_S = _check_operator(None, r_SA, P_SAS, gamma, support_SA, terminal_S)
    proj_SA = _projected_on_nonterminal(pi_SA, support_SA, terminal_S)
    live_S = ~terminal_S
    # The reward-plus-entropy of one step under proj, i.e. v with gamma = 0.
    r_pi_S = _policy_soft_value(r_SA, proj_SA, terminal_S)
    P_pi_SS = np.einsum("sa,sat->st", proj_SA, P_SAS)
    live_P_pi = P_pi_SS[np.ix_(live_S, live_S)]
    v_S = np.zeros(r_SA.shape[0])
    v_S[live_S] = np.linalg.solve(np.eye(live_P_pi.shape[0]) - gamma * live_P_pi, r_pi_S[live_S])
    return _backup(r_SA, P_SAS, gamma, v_S)


def kappa(p: float, gamma: float) -> float:
    """Gap bound of Proposition 4: ``||Q* - Q_p*||_inf <= kappa(p) = -gamma log(p) / (1 - gamma)``.

    Args:
        p: top-p threshold in (0, 1].
        gamma: discount in [0, 1).

    Returns:
        The bound (0 at ``p = 1``; about 22.09 at ``p = 0.8, gamma = 0.99``).

    Raises:
        ValueError: if ``p`` is outside (0, 1] or ``gamma`` outside [0, 1).
    """
    p = check_p(p)
    gamma = _check_gamma(gamma)
    return max(0.0, float(-gamma * np.log(p) / (1.0 - gamma)))


def contraction_modulus(
    op: Callable[[np.ndarray], np.ndarray],
    q1_SA: np.ndarray,
    q2_SA: np.ndarray,
    support_SA: np.ndarray | None = None,
) -> float:
    """Measured Lipschitz ratio ``||op(q1) - op(q2)|| / ||q1 - q2||`` in the sup-norm over supported pairs.

    Proposition 1 says this is ``<= gamma`` for ``op`` = :func:`soft_bellman` or :func:`soft_bellman_eval`
    with the same ``support_SA``.

    Args:
        op: maps ``[S, A]`` Q-values to ``[S, A]`` Q-values, e.g.
            ``lambda q: soft_bellman(q, r_SA, P_SAS, gamma, support_SA)``.
        q1_SA: ``[S, A]`` first Q-function.
        q2_SA: ``[S, A]`` second Q-function.
        support_SA: ``[S, A]`` bool pairs the norm runs over; None means every pair.

    Returns:
        The ratio, a float.

    Raises:
        ValueError: on mismatched shapes, or if ``q1`` and ``q2`` agree on every supported pair.
    """
    q1_SA = _check_q(q1_SA, "q1_SA")
    q2_SA = _check_q(q2_SA, "q2_SA")
    if q1_SA.shape != q2_SA.shape:
        raise ValueError(f"q1_SA and q2_SA must have the same shape, got {q1_SA.shape} and {q2_SA.shape}")
    if support_SA is None:
        support_SA = np.ones(q1_SA.shape, dtype=bool)
    support_SA = _check_support(support_SA, q1_SA.shape, terminal_S=np.ones(q1_SA.shape[0], dtype=bool))
    denom = np.max(np.abs(q1_SA - q2_SA)[support_SA], initial=0.0)
    if denom == 0:
        raise ValueError("q1_SA and q2_SA agree on every supported pair; the ratio is undefined")
    numer = np.max(np.abs(op(q1_SA) - op(q2_SA))[support_SA], initial=0.0)
    return float(numer / denom)
