"""Small tabular MDPs with a sparse, teacher-style structure: the testbed of the exact operators.

Small enough to solve exactly (:mod:`tokenrl.theory.tabular`), shaped like distillation (rewards are
log-probabilities of a peaked next-action distribution, so the soft-optimal policy puts most of its mass on a
few actions and top-p sets are small). :mod:`envs.toy_mdps` wraps them as Gymnasium environments.

- :class:`TabularMDP`: the arrays of one MDP, validated.
- :func:`random_mdp`: a generic random MDP with sparse transitions and peaked log-probability rewards.
- :func:`random_token_mdp`: a token MDP over prefixes (deterministic ``s -> s + [a]``, EOS ends the episode,
  prefixes of ``max_len`` tokens truncate) whose rewards are ``log pi_teacher``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenrl.theory.checks import _check_distribution_rows, _check_mdp, _check_terminal

# Floor on sampled teacher probabilities: small Dirichlet concentrations can underflow to exactly 0, whose
# log would be an infinite reward.
_MIN_TEACHER_PROB = 1e-30

# Dense P_SAS holds S * A * S floats; beyond this many states a token MDP is too large to be a toy.
_MAX_TOKEN_MDP_STATES = 5_000


@dataclass
class TabularMDP:
    """A finite discounted MDP as arrays.

    Attributes:
        r_SA: ``[S, A]`` float64 rewards.
        P_SAS: ``[S, A, S]`` float64 transition probabilities; each ``P_SAS[s, a]`` sums to 1.
        gamma: discount in [0, 1).
        terminal_S: ``[S]`` bool, True where the episode ends; the solvers give these states soft value 0.
            None (the default) means no terminal state.
        truncated_S: ``[S]`` bool, a subset of ``terminal_S``: states where the episode is cut by a length
            limit rather than ended by the agent. The tabular solvers treat them as terminal (value 0);
            :class:`TabularMDPEnv` reports ``truncated=True`` there instead of ``terminated=True``.
            None means none.
        teacher_SA: optional ``[S, A]`` next-action distribution the rewards were derived from
            (``r = log teacher`` for the generators here). It is the soft-optimal policy only in special
            cases (e.g. a finite-horizon token MDP with gamma = 1); the "teacher" of Propositions 2-4 is the
            soft-optimal policy of the MDP, computed with :mod:`tokenrl.theory.tabular`.
        initial_S: ``[S]`` start-state distribution with no mass on terminal states; None means state 0.

    Raises:
        ValueError: on inconsistent shapes, transition or distribution rows that do not sum to 1, gamma
            outside [0, 1), truncated states that are not terminal, or initial mass on a terminal state.
    """

    r_SA: np.ndarray
    P_SAS: np.ndarray
    gamma: float
    terminal_S: np.ndarray | None = None
    truncated_S: np.ndarray | None = None
    teacher_SA: np.ndarray | None = None
    initial_S: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.r_SA, self.P_SAS, self.gamma = _check_mdp(self.r_SA, self.P_SAS, self.gamma)
        n_states = self.n_states
        self.terminal_S = _check_terminal(self.terminal_S, n_states).copy()
        self.truncated_S = _check_terminal(self.truncated_S, n_states).copy()
        if np.any(self.truncated_S & ~self.terminal_S):
            raise ValueError("truncated_S must be a subset of terminal_S (truncated states have value 0)")
        if self.teacher_SA is not None:
            self.teacher_SA = _check_distribution_rows(self.teacher_SA, "teacher_SA")
            if self.teacher_SA.shape != self.r_SA.shape:
                raise ValueError(f"teacher_SA must have shape {self.r_SA.shape}, got {self.teacher_SA.shape}")
        if self.initial_S is None:
            self.initial_S = np.eye(n_states)[0]
        if np.shape(self.initial_S) != (n_states,):
            raise ValueError(f"initial_S must have shape ({n_states},), got {np.shape(self.initial_S)}")
        self.initial_S = _check_distribution_rows(np.asarray(self.initial_S)[None], "initial_S")[0]
        if np.any(self.initial_S[self.terminal_S] > 0):
            raise ValueError("initial_S puts mass on a terminal state; episodes must start in a live state")

    @property
    def n_states(self) -> int:
        """Number of states ``S``."""
        return self.r_SA.shape[0]

    @property
    def n_actions(self) -> int:
        """Number of actions ``A``."""
        return self.r_SA.shape[1]


def _peaked_distributions(rng: np.random.Generator, concentration: float, n_rows: int, n_cols: int) -> np.ndarray:
    """``[n_rows, n_cols]`` Dirichlet(concentration) rows, floored at ``_MIN_TEACHER_PROB`` and renormalised."""
    if concentration <= 0:
        raise ValueError(f"Dirichlet concentration must be > 0, got {concentration!r}")
    probs = np.maximum(rng.dirichlet(np.full(n_cols, concentration), size=n_rows), _MIN_TEACHER_PROB)
    return probs / probs.sum(-1, keepdims=True)


def random_mdp(
    n_states: int,
    n_actions: int,
    rng: np.random.Generator,
    gamma: float = 0.9,
    n_terminal: int = 0,
    teacher_concentration: float = 0.3,
    transition_concentration: float = 0.3,
    reward_scale: float = 1.0,
) -> TabularMDP:
    """A random MDP whose soft-optimal policy is sparse, like a language-model teacher.

    Structure:
        - teacher: each live state draws ``teacher(.|s) ~ Dirichlet(teacher_concentration)``; a concentration
          below 1 puts most mass on one or two actions.
        - reward: ``r(s, a) = reward_scale * log teacher(a|s)``. Unlikely actions cost many nats, so the
          soft-optimal policy inherits the teacher's peakedness (at scale 1 and gamma -> 0 it *is* the teacher).
        - transitions: ``P(.|s, a) ~ Dirichlet(transition_concentration)`` over all states, so each action
          leads mostly to a few states.
        - the last ``n_terminal`` states are terminal, absorbing, with reward 0 (their teacher rows are
          uniform and unused); the start distribution is uniform over the live states.

    Args:
        n_states: number of states ``S`` (>= 1 + n_terminal).
        n_actions: number of actions ``A`` (>= 1).
        rng: numpy random generator (the only source of randomness).
        gamma: discount in [0, 1).
        n_terminal: number of terminal states.
        teacher_concentration: Dirichlet concentration of the teacher rows; smaller is sparser.
        transition_concentration: Dirichlet concentration of the transition rows; smaller is sparser.
        reward_scale: multiplier on ``log teacher``; larger makes the soft-optimal policy more peaked.

    Returns:
        A :class:`TabularMDP` with ``teacher_SA`` set.
    """
    if n_actions < 1 or n_terminal < 0 or n_states < 1 + n_terminal:
        raise ValueError(
            f"need n_actions >= 1, n_terminal >= 0 and n_states >= 1 + n_terminal, "
            f"got n_states={n_states}, n_actions={n_actions}, n_terminal={n_terminal}"
        )
    if transition_concentration <= 0:
        raise ValueError(f"transition_concentration must be > 0, got {transition_concentration!r}")
    n_live = n_states - n_terminal
    teacher_SA = np.full((n_states, n_actions), 1.0 / n_actions)
    teacher_SA[:n_live] = _peaked_distributions(rng, teacher_concentration, n_live, n_actions)
    r_SA = np.zeros((n_states, n_actions))
    r_SA[:n_live] = reward_scale * np.log(teacher_SA[:n_live])
    P_SAS = rng.dirichlet(np.full(n_states, transition_concentration), size=(n_states, n_actions))
    terminal_S = np.arange(n_states) >= n_live
    P_SAS[terminal_S] = 0.0
    P_SAS[terminal_S, :, terminal_S] = 1.0
    initial_S = np.where(terminal_S, 0.0, 1.0 / n_live)
    return TabularMDP(r_SA, P_SAS, gamma, terminal_S=terminal_S, teacher_SA=teacher_SA, initial_S=initial_S)


def token_prefixes(
    vocab_size: int, max_len: int, eos_id: int = 0, max_states: int = _MAX_TOKEN_MDP_STATES
) -> list[tuple[int, ...]]:
    """The live-or-truncated states of :func:`random_token_mdp`, in state-index order.

    Args:
        vocab_size: number of tokens ``V`` (>= 2), EOS included.
        max_len: longest response, in tokens (>= 1).
        eos_id: the end-of-sequence token.
        max_states: refuse more states than this (a dense ``[S, A, S]`` MDP grows as ``S^2``).

    Returns:
        Every EOS-free token prefix of length ``0 .. max_len``, shortest first, then lexicographic. State ``i``
        of the token MDP is ``prefixes[i]``; the one extra state ``len(prefixes)`` is "ended with EOS".
    """
    if vocab_size < 2 or max_len < 1 or not (0 <= eos_id < vocab_size):
        raise ValueError(
            f"need vocab_size >= 2, max_len >= 1 and 0 <= eos_id < vocab_size, "
            f"got vocab_size={vocab_size}, max_len={max_len}, eos_id={eos_id}"
        )
    n_states = sum((vocab_size - 1) ** length for length in range(max_len + 1)) + 1
    if n_states > max_states:
        raise ValueError(
            f"a token MDP with vocab_size={vocab_size}, max_len={max_len} has {n_states} states "
            f"(> {max_states}); use a smaller vocabulary or length"
        )
    tokens = [t for t in range(vocab_size) if t != eos_id]
    prefixes: list[tuple[int, ...]] = [()]
    level: list[tuple[int, ...]] = [()]
    for _ in range(max_len):
        level = [prefix + (t,) for prefix in level for t in tokens]
        prefixes.extend(level)
    return prefixes


def random_token_mdp(
    vocab_size: int,
    max_len: int,
    rng: np.random.Generator,
    gamma: float = 0.9,
    concentration: float = 0.1,
    eos_id: int = 0,
) -> TabularMDP:
    """A token-generation MDP over prefixes with a sparse random teacher.

    States are the prefixes of :func:`token_prefixes` plus one absorbing "ended" state (the last index); the
    start state is the empty prefix (index 0). From a prefix shorter than ``max_len``, token ``a`` moves
    deterministically to ``prefix + [a]``, and EOS moves to the ended state (``terminated``). A prefix of
    ``max_len`` tokens is where the episode truncates: in these arrays it is a terminal, absorbing state with
    value 0 (``truncated_S``), i.e. no bootstrap past the length limit, which keeps the MDP finite and exact.

    Teacher and reward: each prefix shorter than ``max_len`` draws ``teacher(.|s) ~ Dirichlet(concentration)``
    over the vocabulary (sparse, like a language model's next-token distribution) and the reward is
    ``r(s, a) = log teacher(a|s)``. Terminal rows have reward 0 and a uniform, unused teacher row.

    Args:
        vocab_size: number of tokens ``V`` (>= 2), EOS included.
        max_len: response length at which episodes truncate (>= 1).
        rng: numpy random generator.
        gamma: discount in [0, 1).
        concentration: Dirichlet concentration of the teacher rows; smaller is sparser.
        eos_id: the end-of-sequence token.

    Returns:
        A :class:`TabularMDP` with ``S = len(token_prefixes(...)) + 1`` states and ``A = vocab_size`` actions.
    """
    prefixes = token_prefixes(vocab_size, max_len, eos_id)
    index = {prefix: i for i, prefix in enumerate(prefixes)}
    n_states = len(prefixes) + 1
    ended = n_states - 1
    live_S = np.array([len(prefix) < max_len for prefix in prefixes] + [False])
    P_SAS = np.zeros((n_states, vocab_size, n_states))
    for s, prefix in enumerate(prefixes):
        if not live_S[s]:
            P_SAS[s, :, s] = 1.0
            continue
        for a in range(vocab_size):
            P_SAS[s, a, ended if a == eos_id else index[prefix + (a,)]] = 1.0
    P_SAS[ended, :, ended] = 1.0
    teacher_SA = np.full((n_states, vocab_size), 1.0 / vocab_size)
    teacher_SA[live_S] = _peaked_distributions(rng, concentration, int(live_S.sum()), vocab_size)
    r_SA = np.where(live_S[:, None], np.log(teacher_SA), 0.0)
    truncated_S = np.array([len(prefix) == max_len for prefix in prefixes] + [False])
    return TabularMDP(r_SA, P_SAS, gamma, terminal_S=~live_S, truncated_S=truncated_S, teacher_SA=teacher_SA)
