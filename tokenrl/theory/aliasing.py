"""Capacity-limited (aliased) tabular students on toy languages: features, exact occupancies and metrics.

The teacher acts on the whole prefix; the student's logits are a table ``theta_FV`` indexed by a *feature*
of the prefix (its last ``k`` tokens, or a hash bucket), so several prefixes share one row. Such a student
cannot represent the teacher, and what it does at one prefix moves the states it visits later: its errors
compound along its own trajectories. Everything here is float64 and exact: occupancies are sums over the
prefix tree of a :class:`~tokenrl.theory.toy_language.ToyLanguage`, no sampling, and differentiable by autograd.

The student's policy at prefix ``s`` is ``softmax(theta_FV[feature(s)])`` over the whole vocabulary (what
generation samples at temperature 1, top-p 1); ``-inf`` logits are allowed (a token the student never emits).

Shape suffixes: ``S`` prefixes (the whole tree, shortest first), ``F`` features, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenrl.theory.bd_tabular import Problem, make_problem
from tokenrl.theory.toy_language import ToyLanguage, action_sets, data_policy, reach_probs, transition_weights


def prefix_tokens(lang: ToyLanguage) -> list[tuple[int, ...]]:
    """The token tuple of every prefix of ``lang`` (state 0 is the empty prefix), read off ``child_SV``."""
    prefixes: list[tuple[int, ...] | None] = [None] * lang.n_states
    prefixes[0] = ()
    for s in np.argsort(lang.length_S, kind="stable"):
        for a in np.flatnonzero(lang.child_SV[s] >= 0):
            prefixes[lang.child_SV[s, a]] = prefixes[s] + (int(a),)
    if any(p is None for p in prefixes):
        raise ValueError("lang.child_SV does not reach every state from state 0: not a prefix tree")
    return prefixes


def last_k_features(lang: ToyLanguage, k: int) -> np.ndarray:
    """``[S]`` feature index of every prefix: its last ``k`` tokens (a shorter prefix: all of it).

    ``k = 0`` gives one feature (a student blind to the context); ``k >= max_len`` gives every prefix its own
    feature (the full state: a student that can represent the teacher).
    """
    if k < 0:
        raise ValueError(f"the window k must be >= 0, got {k}")
    keys = [pre[-k:] if k > 0 else () for pre in prefix_tokens(lang)]
    index: dict[tuple[int, ...], int] = {}
    return np.array([index.setdefault(key, len(index)) for key in keys])


def hash_features(lang: ToyLanguage, n_buckets: int, seed: int = 0) -> np.ndarray:
    """``[S]`` feature index of every prefix: a uniformly random bucket in ``[0, n_buckets)`` (a hashed prefix)."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    return np.random.default_rng(seed).integers(n_buckets, size=lang.n_states)


@dataclass(eq=False)  # compared and hashed by identity: the solvers memoise results per problem
class AliasedProblem:
    """A toy language, a feature map and the data of one setting, as float64 tensors.

    Attributes:
        lang: the toy language (the whole prefix tree).
        feat_S: ``[S]`` long, feature of every prefix.
        n_features: ``F``.
        p: top-p of the offline data, of the teacher's sets and of the top-p MDP (the paper samples the data
            at the loss's p).
        gamma: discount of the TD objectives.
        set_SV: ``[S, V]`` bool, the teacher's top-p set.
        log_teacher_SV: ``[S, V]`` log pi*.
        log_data_SV: ``[S, V]`` log of the data policy (the teacher projected on its set; -inf outside).
        d_data_S: ``[S]`` the data's expected visits per sequence of every prefix (0 at truncated ones).
        w_SV: ``[S, V]`` the data's transition weights, normalised (the infinite-data limit of a token mean).
        bd: the BD diagnosis's :class:`~tokenrl.theory.bd_tabular.Problem` of the same data, restricted to
            the prefixes the data visit or bootstrap from (``bd.state_ids`` maps them back).
        parent_S, token_S: ``[S]`` long, parent prefix and last token (-1 and 0 at the root).
        level_starts: first state of each prefix length ``0 .. max_len``, then ``S``.
        live_S, child_SV, length_S: ``lang``'s, as tensors (``live_S``: the prefixes that emit a token).
    """

    lang: ToyLanguage
    feat_S: torch.Tensor
    n_features: int
    p: float
    gamma: float
    set_SV: torch.Tensor
    log_teacher_SV: torch.Tensor
    log_data_SV: torch.Tensor
    d_data_S: torch.Tensor
    w_SV: torch.Tensor
    bd: Problem
    parent_S: torch.Tensor
    token_S: torch.Tensor
    level_starts: list[int]
    live_S: torch.Tensor
    child_SV: torch.Tensor
    length_S: torch.Tensor

    def by_feature(self, x_SV: torch.Tensor) -> torch.Tensor:
        """``[F, V]`` the sum of ``x_SV`` over the prefixes of each feature."""
        out = x_SV.new_zeros(self.n_features, x_SV.shape[1])
        return out.index_add(0, self.feat_S, x_SV)


def make_aliased_problem(lang: ToyLanguage, feat_S: np.ndarray, p: float, gamma: float) -> AliasedProblem:
    """The exact problem of a student with features ``feat_S`` on ``lang``'s teacher data sampled at top-p ``p``.

    Raises:
        ValueError: if ``feat_S`` is not one index per prefix, or the prefixes are not ordered by length.
    """
    feat_S = np.asarray(feat_S)
    if feat_S.shape != (lang.n_states,) or feat_S.min() < 0:
        raise ValueError(f"feat_S must hold one non-negative index per prefix, shape ({lang.n_states},)")
    if np.any(np.diff(lang.length_S) < 0):
        raise ValueError("lang's prefixes must be ordered by length (as token_prefixes orders them)")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    data = data_policy(lang, p)
    parent = np.full(lang.n_states, -1)
    token = np.zeros(lang.n_states, dtype=np.int64)
    rows, cols = np.nonzero(lang.child_SV >= 0)
    parent[lang.child_SV[rows, cols]] = rows
    token[lang.child_SV[rows, cols]] = cols
    starts = [int(np.searchsorted(lang.length_S, t)) for t in range(lang.max_len + 1)] + [lang.n_states]
    with np.errstate(divide="ignore"):
        log_data = np.log(data)
    w = transition_weights(lang, p)
    return AliasedProblem(
        lang=lang,
        feat_S=torch.from_numpy(feat_S).long(),
        n_features=int(feat_S.max()) + 1,
        p=p,
        gamma=gamma,
        set_SV=torch.from_numpy(action_sets(lang, p)),
        log_teacher_SV=torch.from_numpy(np.log(lang.teacher_SV)),
        log_data_SV=torch.from_numpy(log_data),
        d_data_S=torch.from_numpy(reach_probs(lang, data) * lang.live_S),
        w_SV=torch.from_numpy(w),
        bd=make_problem(lang, p, w),
        parent_S=torch.from_numpy(parent).long(),
        token_S=torch.from_numpy(token),
        level_starts=starts,
        live_S=torch.from_numpy(lang.live_S),
        child_SV=torch.from_numpy(lang.child_SV),
        length_S=torch.from_numpy(lang.length_S),
    )


def log_policy(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """``[S, V]`` log-probabilities of the student's policy at every prefix."""
    return torch.log_softmax(theta_FV, -1)[prob.feat_S]


def projected_log_policy(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """``[S, V]`` log pi_p: the student's policy renormalised on the teacher's top-p set (-inf outside), the
    policy that acts in the top-p MDP (``TopPActionWrapper``)."""
    logits_SV = theta_FV[prob.feat_S].masked_fill(~prob.set_SV, float("-inf"))
    return torch.log_softmax(logits_SV, -1)


def occupancy(prob: AliasedProblem, log_pi_SV: torch.Tensor) -> torch.Tensor:
    """``[S]`` probability that a response reaches each prefix under ``exp(log_pi_SV)`` (its expected visits).

    Computed level by level (a child's probability is its parent's times the token's), so the gradient flows
    through the occupancy: this is how the on-policy objectives see the states their policy leads to.
    """
    levels = [log_pi_SV.new_zeros(1)]
    starts = prob.level_starts
    for t in range(1, len(starts) - 1):
        parent = prob.parent_S[starts[t] : starts[t + 1]]
        token = prob.token_S[starts[t] : starts[t + 1]]
        levels.append(levels[-1][parent - starts[t - 1]] + log_pi_SV[parent, token])
    return torch.cat(levels).exp()


def kl_rows(logp_SV: torch.Tensor, logq_SV: torch.Tensor) -> torch.Tensor:
    """``[S]`` KL(p || q) of every row (0 log 0 = 0; ``inf`` where p > 0 = q)."""
    p_SV = logp_SV.exp()
    return torch.where(p_SV > 0, p_SV * (logp_SV - logq_SV), torch.zeros_like(p_SV)).sum(-1)


def reverse_kl_rows(prob: AliasedProblem, log_pi_SV: torch.Tensor) -> torch.Tensor:
    """``[S]`` KL(student || teacher) at every prefix, 0 at truncated prefixes (no token is emitted there)."""
    return torch.where(prob.live_S, kl_rows(log_pi_SV, prob.log_teacher_SV), torch.zeros(()).double())


def evaluate(prob: AliasedProblem, theta_FV: torch.Tensor) -> dict[str, object]:
    """The student's distance to the teacher, on its own state distribution and on the teacher's.

    Returns a dict with (lower is better unless said):

    * ``rev_kl_seq``: KL(student || teacher) between the two *sequence* distributions, i.e. the student's
      on-policy reverse KL summed over its own trajectories (MiniLLM's objective);
    * ``rev_kl_tok``: the same per emitted token (divided by the student's expected length ``length``);
    * ``fwd_kl_tok``: KL(data || student) per token on the teacher data's prefixes (what BC minimises);
    * ``return_seq``: E_{y ~ student}[log pi*(y)], the return under the teacher's log-likelihood reward
      (higher is better);
    * ``off_data``: fraction of the student's tokens emitted at prefixes the teacher data never visit;
    * ``step_kl``: list, the on-policy reverse KL at step ``t = 0 .. max_len - 1`` given the response is
      still running (the per-step error along the student's own trajectories).
    """
    with torch.no_grad():
        log_pi_SV = log_policy(prob, theta_FV)
        d_S = occupancy(prob, log_pi_SV) * prob.live_S
        rev_S = reverse_kl_rows(prob, log_pi_SV)
        pi_SV = log_pi_SV.exp()
        ll_S = torch.where(pi_SV > 0, pi_SV * prob.log_teacher_SV, torch.zeros_like(pi_SV)).sum(-1)
        fwd_S = kl_rows(prob.log_data_SV, log_pi_SV)
        d_data_S = prob.d_data_S
        length = float(d_S.sum())
        steps = []
        for t in range(prob.lang.max_len):
            lo, hi = prob.level_starts[t], prob.level_starts[t + 1]
            alive = float(d_S[lo:hi].sum())
            steps.append(float((d_S[lo:hi] * rev_S[lo:hi]).sum()) / alive if alive > 0 else float("nan"))
        seen = d_data_S > 0
        return {
            "rev_kl_seq": float((d_S * rev_S).sum()),
            "rev_kl_tok": float((d_S * rev_S).sum()) / length,
            "fwd_kl_tok": float((d_data_S * fwd_S)[seen].sum() / d_data_S.sum()),
            "return_seq": float((d_S * ll_S).sum()),
            "length": length,
            "off_data": float(d_S[~seen].sum()) / length,
            "step_kl": steps,
        }
