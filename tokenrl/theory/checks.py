"""Input checks shared by the exact tabular operators and the toy MDPs: every failure names the array and the fix.

Shape suffixes: ``S`` states, ``A`` actions (see :mod:`tokenrl.theory.tabular`).
"""

from __future__ import annotations

import numpy as np


# Tolerance on the row sums of every probability table (transitions, policies, teacher distributions).
_ROW_SUM_ATOL = 1e-8


def _check_q(q_SA: np.ndarray, name: str = "q_SA") -> np.ndarray:
    q_SA = np.asarray(q_SA, dtype=np.float64)
    if q_SA.ndim != 2 or 0 in q_SA.shape:
        raise ValueError(f"{name} must be a non-empty [S, A] array, got shape {q_SA.shape}")
    if not np.all(np.isfinite(q_SA)):
        raise ValueError(f"{name} must be finite")
    return q_SA


def _check_distribution_rows(probs_SA: np.ndarray, name: str) -> np.ndarray:
    probs_SA = np.asarray(probs_SA, dtype=np.float64)
    if probs_SA.ndim != 2 or 0 in probs_SA.shape:
        raise ValueError(f"{name} must be a non-empty [S, A] array of probabilities, got shape {probs_SA.shape}")
    if not np.all(np.isfinite(probs_SA)) or np.any(probs_SA < 0):
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    row_err = np.abs(probs_SA.sum(-1) - 1.0)
    if np.any(row_err > _ROW_SUM_ATOL):
        s = int(np.argmax(row_err))
        raise ValueError(
            f"each row of {name} must sum to 1 within {_ROW_SUM_ATOL:g}; row {s} sums to {probs_SA[s].sum()!r}"
        )
    return probs_SA


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not (0.0 <= gamma < 1.0):
        raise ValueError(f"discount gamma must be in [0, 1), got {gamma!r}")
    return gamma


def _check_terminal(terminal_S: np.ndarray | None, n_states: int) -> np.ndarray:
    if terminal_S is None:
        return np.zeros(n_states, dtype=bool)
    terminal_S = np.asarray(terminal_S)
    if terminal_S.shape != (n_states,) or terminal_S.dtype != np.bool_:
        raise ValueError(
            f"terminal_S must be a bool array of shape ({n_states},), got {terminal_S.dtype} {terminal_S.shape}"
        )
    return terminal_S


def _check_support(support_SA: np.ndarray | None, shape: tuple[int, int], terminal_S: np.ndarray) -> np.ndarray:
    if support_SA is None:
        return np.ones(shape, dtype=bool)
    support_SA = np.asarray(support_SA)
    if support_SA.shape != shape or support_SA.dtype != np.bool_:
        raise ValueError(f"support_SA must be a bool array of shape {shape}, got {support_SA.dtype} {support_SA.shape}")
    empty_S = ~support_SA.any(-1) & ~terminal_S
    if np.any(empty_S):
        raise ValueError(
            f"support_SA must keep at least one action in every non-terminal state; "
            f"empty at states {np.flatnonzero(empty_S)[:10].tolist()}"
        )
    return support_SA


def _check_mdp(r_SA: np.ndarray, P_SAS: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray, float]:
    r_SA = _check_q(r_SA, "r_SA")
    n_states, n_actions = r_SA.shape
    P_SAS = np.asarray(P_SAS, dtype=np.float64)
    if P_SAS.shape != (n_states, n_actions, n_states):
        raise ValueError(f"P_SAS must have shape [S, A, S] = {(n_states, n_actions, n_states)}, got {P_SAS.shape}")
    _check_distribution_rows(P_SAS.reshape(n_states * n_actions, n_states), "P_SAS (rows over s')")
    return r_SA, P_SAS, _check_gamma(gamma)


def _check_operator(
    q_SA: np.ndarray | None,
    r_SA: np.ndarray,
    P_SAS: np.ndarray,
    gamma: float,
    support_SA: np.ndarray | None,
    terminal_S: np.ndarray | None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    # The inputs every Bellman operator and solver checks, returned validated (q_SA may be None).
    r_SA, P_SAS, gamma = _check_mdp(r_SA, P_SAS, gamma)
    if q_SA is not None:
        q_SA = _check_q(q_SA)
        if q_SA.shape != r_SA.shape:
            raise ValueError(f"q_SA and r_SA must have the same shape, got {q_SA.shape} and {r_SA.shape}")
    terminal_S = _check_terminal(terminal_S, r_SA.shape[0])
    return q_SA, r_SA, P_SAS, gamma, _check_support(support_SA, r_SA.shape, terminal_S), terminal_S
