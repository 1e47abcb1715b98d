"""The exact optimum (or fixed point) of every objective of :mod:`tokenrl.theory.aliased_objectives`.

How each is solved (float64; ``pg`` is the projected-gradient norm at the returned point, the certificate):

* ``bc``, ``kd``: closed form, the per-feature average of the data's tokens / of the teacher's rows.
* ``reverse_kl`` (MiniLLM), ``soft_q`` (the soft-optimal aliased policy): L-BFGS on the logits from KD's
  optimum and from uniform logits, the better kept (both objectives are non-convex in the logits).

Every L-BFGS run is preconditioned by the square root of each feature's weight in its objective (the data's,
the mixture's or the student's own occupancy): the objectives weigh a feature's logits by how often its
prefixes are visited, and rarely visited features would otherwise stall L-BFGS for thousands of steps.
* ``gkd``: the fixed point of the on-policy data loop, ``theta_{k+1} = argmin_theta JSD on (1 - lmbda) D +
  lmbda d_{theta_k}``, iterated from KD's optimum (GKD treats the student's samples as data).
* ``soft_q_td``: offline soft Q-learning's fixed point ``Q = Pi_D B_p Q`` (``Pi_D`` the data-weighted average
  over each feature's prefixes, the fixed point a target network converges to), by value iteration; an
  averager composed with a gamma-contraction, so it converges. Entries only bootstrapped from keep KD's
  log-probabilities (the SFT start; uniform ``-log V`` at features without data). ``soft_q_td_online``: the
  same on ``(1 - lmbda) D + lmbda`` (the student's own top-p transitions), the data loop iterated to its
  fixed point as GKD's.
* ``bd_math``, ``bd_released``: the BD diagnosis's Q-space solver per feature (vocabulary shift: the box
  ``[q_min, 0]`` with the max pinned where no unread token can hold it); ``bd_fixed`` (set shift + LM term),
  in logit space with a smoothing continuation of the set's max (its optima sit on ties of the max).
* ``bd_online``, ``bd_online_free``: the fixed point of the online data loop (the student's own transitions in
  the top-p MDP, weight ``lmbda``), iterated from KD's optimum, each step solved in logit space.

Logits that no term of an objective reads (tokens outside every read set of a feature) are ``-inf`` in the
returned student, the least mass any optimum can put there (the BD diagnosis's completion); features no term
reads keep uniform logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable
from weakref import WeakKeyDictionary

import torch

from tokenrl.theory.aliased_objectives import (
    gkd_loss,
    lm_term,
    offline_bd_loss,
    online_bd_loss,
    reverse_kl_loss,
    soft_q_loss,
    soft_td_loss,
    soft_td_targets,
)
from tokenrl.theory.aliasing import AliasedProblem, log_policy, occupancy, projected_log_policy
from tokenrl.theory.bd_solvers import box_minimise, max_outside, pinned_box_minimise
from tokenrl.theory.bd_tabular import BDOptions, bd_loss_from_q

# The offline BD forms of the diagnosis (docs/bd_diagnosis.md), as the presets set them: the paper's math form
# (vocabulary shift), the fixed default (set shift + LM term, alpha 1) and the released code's form (whose
# 0.5 CE + 0.5 token KD to the cached set is 1 x CE + a constant here: the cache's p is the data's).
BD_FORMS = {
    "bd_math": BDOptions(form="math", shift="vocab", alpha=0.1, q_min=-10.0),
    "bd_fixed": BDOptions(form="math", shift="set", alpha=1.0, q_min=-10.0, ce_coef=1.0),
    "bd_released": BDOptions(form="released", shift="vocab", alpha=0.1, q_min=-10.0, ce_coef=1.0),
}
# Online BD: the fixed default's Q (set shift, alpha 1) without the LM term, so that only TD terms act.
ONLINE_BD = BDOptions(form="math", shift="set", alpha=1.0, q_min=-10.0)
# Turns of the data loops (GKD, on-policy soft Q-learning, online BD) and their stopping rule: the sup-norm
# change of the policy between two turns.
MAX_OUTER = 100
OUTER_TOL = 1e-7
# Online BD with the set shift: its inner solutions are as precise as the smoothing (SMOOTHING's last tau), and
# the loop's policy change stalls near 1e-5 on that noise.
OUTER_TOL_SMOOTHED = 1e-5
# Smoothing continuation of the set shift's max (see _smoothed_minimise): from a start, and from a warm start.
# The last tau moves the shift by at most 1e-5 log |A_p| (the metrics by ~1e-6); smaller ones stall L-BFGS on the
# ties' 1 / tau curvature (the gradient norm stops certifying) without moving the metrics.
SMOOTHING = tuple(10.0**-e for e in range(1, 6))
SMOOTHING_WARM = tuple(10.0**-e for e in range(3, 6))


@dataclass
class Solution:
    """One objective's solution.

    Attributes:
        theta_FV: ``[F, V]`` the student's logits (``-inf`` where it emits nothing).
        loss: the objective at the solution (for a fixed point: the last inner problem's).
        pg: projected-gradient norm there (for ``soft_q_td``: the TD regression's, 0 at its fixed point).
        iters: outer iterations of a fixed point (0 for a direct optimum).
        residual: for a fixed point, the sup-norm change of the policy (``soft_q_td``: of Q) in the last
            iteration; 0 otherwise.
        value_F: ``[F]`` the free per-feature values of ``bd_online_free``, else None.
    """

    theta_FV: torch.Tensor
    loss: float
    pg: float
    iters: int = 0
    residual: float = 0.0
    value_F: torch.Tensor | None = None


def _row_logits(mass_FV: torch.Tensor) -> torch.Tensor:
    # Logits of the row-normalised mass: -inf where a row has no mass on a token, uniform where it has none.
    total_F = mass_FV.sum(-1, keepdim=True)
    return torch.where(total_F > 0, torch.log(mass_FV) - torch.log(total_F.clamp_min(1e-300)), 0.0)


def solve_bc(prob: AliasedProblem) -> Solution:
    """BC's optimum: at each feature, the data's tokens averaged over its prefixes."""
    return Solution(_row_logits(prob.by_feature(prob.w_SV)), float("nan"), 0.0)


def solve_kd(prob: AliasedProblem) -> Solution:
    """KD's optimum: at each feature, the teacher's rows averaged with the data's visits of its prefixes."""
    mass_FV = prob.by_feature(prob.d_data_S[:, None] * prob.log_teacher_SV.exp())
    return Solution(_row_logits(mass_FV), float("nan"), 0.0)


def read_entries(prob: AliasedProblem) -> torch.Tensor:
    """``[F, V]`` bool, the entries the set-reading objectives read: the teacher's sets at the prefixes the data
    visit or bootstrap from (the student's own top-p rollouts visit the same prefixes)."""
    read_S = torch.zeros(prob.lang.n_states, dtype=torch.bool)
    read_S[torch.from_numpy(prob.bd.state_ids)] = True
    return prob.by_feature((prob.set_SV & read_S[:, None]).double()) > 0


def _complete(theta_FV: torch.Tensor, read_FV: torch.Tensor) -> torch.Tensor:
    # The returned student: -inf off the read entries, uniform at features nothing reads.
    return torch.where(read_FV.any(-1, keepdim=True), theta_FV.masked_fill(~read_FV, float("-inf")), 0.0)


def feature_scale(prob: AliasedProblem, weight_S: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """``[F, V]`` the preconditioner ``sqrt(max(w_f, floor))``, ``w_f`` the total weight of feature f's prefixes
    (normalised to sum 1; ``floor`` keeps rarely weighted features from taking huge steps)."""
    w_F = prob.by_feature((weight_S / weight_S.sum())[:, None].detach())[:, 0]
    return w_F.clamp_min(floor).sqrt()[:, None].expand(prob.n_features, prob.lang.vocab_size)


def _own_scale(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return feature_scale(prob, occupancy(prob, log_policy(prob, theta_FV)) * prob.live_S)


def _best_of_starts(
    loss_of: Callable[[torch.Tensor], torch.Tensor], prob: AliasedProblem, starts: list[torch.Tensor]
) -> Solution:
    best = None
    for start in starts:
        loss, theta, pg = box_minimise(loss_of, start, scale=_own_scale(prob, start))
        if best is None or loss < best.loss:
            best = Solution(theta, loss, pg)
    return best


def solve_reverse_kl(prob: AliasedProblem) -> Solution:
    """MiniLLM's exact optimum over the aliased student (best of two starts; memoised per problem, as
    :func:`solve_soft_q` starts from it too)."""
    if prob not in _REVERSE_KL:
        start = solve_kd(prob).theta_FV
        starts = [start, torch.zeros_like(start)]
        _REVERSE_KL[prob] = _best_of_starts(lambda th: reverse_kl_loss(prob, th), prob, starts)
    return _REVERSE_KL[prob]


_REVERSE_KL: WeakKeyDictionary = WeakKeyDictionary()


def solve_soft_q(prob: AliasedProblem) -> Solution:
    """The soft-optimal aliased policy for reward ``log pi*`` and discount ``prob.gamma``: best of three starts,
    MiniLLM's optimum among them (the same objective at gamma = 1; from KD's and uniform logits alone L-BFGS
    can end in a worse basin, e.g. one that stops responses early)."""
    start = solve_kd(prob).theta_FV
    starts = [start, torch.zeros_like(start), solve_reverse_kl(prob).theta_FV]
    return _best_of_starts(lambda th: soft_q_loss(prob, th), prob, starts)


def _policy_change(a_SV: torch.Tensor, b_SV: torch.Tensor) -> float:
    return float((a_SV.exp() - b_SV.exp()).abs().max())


def gkd_step(
    prob: AliasedProblem, theta_FV: torch.Tensor, lmbda: float = 0.5, beta: float = 0.5
) -> tuple[Solution, float]:
    """One turn of GKD's data loop: the JSD's optimum on ``(1 - lmbda) D + lmbda d_theta``, the student's
    occupancy held as data. Returns the new solution and how far the policy moved (sup-norm)."""
    with torch.no_grad():
        log_pi = log_policy(prob, theta_FV)
        weight_S = (1.0 - lmbda) * prob.d_data_S + lmbda * occupancy(prob, log_pi) * prob.live_S
    scale = feature_scale(prob, weight_S)
    loss, new, pg = box_minimise(lambda th: gkd_loss(prob, th, weight_S, beta), theta_FV, scale=scale)
    return Solution(new, loss, pg), _policy_change(log_policy(prob, new), log_pi)


def solve_gkd(prob: AliasedProblem, lmbda: float = 0.5, beta: float = 0.5) -> Solution:
    """GKD's fixed point, by :func:`gkd_step` from KD's optimum until the policy moves < ``OUTER_TOL``."""
    theta = solve_kd(prob).theta_FV
    for it in range(1, MAX_OUTER + 1):
        sol, residual = gkd_step(prob, theta, lmbda, beta)
        theta = sol.theta_FV
        if residual < OUTER_TOL:
            break
    return replace(sol, iters=it, residual=residual)


def _soft_q_fixed_point(
    prob: AliasedProblem, weight_SV: torch.Tensor, q_FV: torch.Tensor, tol: float = 1e-11, max_iters: int = 100_000
) -> tuple[torch.Tensor, int, float]:
    # Value iteration of Pi_w B_p from q_FV: each entry with weight becomes the w-weighted average of its soft
    # Bellman targets over the feature's prefixes; the others keep their value.
    mass_FV = prob.by_feature(weight_SV)
    for it in range(1, max_iters + 1):
        target_SV = soft_td_targets(prob, q_FV)
        avg_FV = prob.by_feature(torch.where(weight_SV > 0, weight_SV * target_SV, 0.0)) / mass_FV.clamp_min(1e-300)
        new_FV = torch.where(mass_FV > 0, avg_FV, q_FV)
        residual = float((new_FV - q_FV).abs().max())
        q_FV = new_FV
        if residual <= tol:
            break
    return q_FV, it, residual


def _soft_q_solution(
    prob: AliasedProblem, q_FV: torch.Tensor, weight_SV: torch.Tensor, iters: int, residual: float
) -> Solution:
    q = q_FV.clone().requires_grad_(True)
    loss = soft_td_loss(prob, q, soft_td_targets(prob, q_FV), weight_SV)
    (grad,) = torch.autograd.grad(loss, [q])
    return Solution(_complete(q_FV, read_entries(prob)), float(loss.detach()), float(grad.norm()), iters, residual)


def _sft_log_probs(prob: AliasedProblem) -> torch.Tensor:
    # The SFT start as log-probabilities (uniform at features without data): the level V_p = 0 of the
    # teacher's own soft values, which the bootstrapped-only entries keep.
    return torch.log_softmax(solve_kd(prob).theta_FV, -1)


def solve_soft_q_td(prob: AliasedProblem) -> Solution:
    """Offline soft Q-learning's fixed point on the teacher data, by value iteration of ``Pi_D B_p``."""
    weight_SV = prob.w_SV * prob.set_SV
    q_FV, iters, residual = _soft_q_fixed_point(prob, weight_SV, _sft_log_probs(prob))
    return _soft_q_solution(prob, q_FV, weight_SV, iters, residual)


def solve_soft_q_td_online(prob: AliasedProblem, lmbda: float = 0.5) -> Solution:
    """On-policy soft Q-learning's fixed point: the TD regression on ``(1 - lmbda) D + lmbda`` (the student's
    own transitions under pi_p = softmax(Q) on the teacher's set), held as data; each turn of the loop solves
    its projected Bellman fixed point, from the SFT start until the policy moves < ``OUTER_TOL``."""
    data_SV = prob.d_data_S[:, None] * prob.log_data_SV.exp()
    q_FV = _sft_log_probs(prob)
    for it in range(1, MAX_OUTER + 1):
        with torch.no_grad():
            log_pi_SV = projected_log_policy(prob, q_FV)
            own_SV = (occupancy(prob, log_pi_SV) * prob.live_S)[:, None] * log_pi_SV.exp()
            weight_SV = ((1.0 - lmbda) * data_SV + lmbda * own_SV) * prob.set_SV
        q_FV, _, _ = _soft_q_fixed_point(prob, weight_SV, q_FV)
        residual = _policy_change(projected_log_policy(prob, q_FV), log_pi_SV)
        if residual < OUTER_TOL:
            break
    return _soft_q_solution(prob, q_FV, weight_SV, it, residual)


def _bd_opts(prob: AliasedProblem, opts: BDOptions) -> BDOptions:
    return replace(opts, p=prob.p, gamma=prob.gamma)


def _data_scale(prob: AliasedProblem) -> torch.Tensor:
    # The offline objectives weigh a feature by the data's visits of its prefixes and of their next prefixes.
    ids = torch.from_numpy(prob.bd.state_ids)
    weight_S = torch.zeros(prob.lang.n_states, dtype=torch.float64)
    weight_S[ids] = prob.bd.w_SV.sum(-1) + 1e-3
    return feature_scale(prob, weight_S)


def _solve_bd_vocab(
    prob: AliasedProblem, opts: BDOptions, forced_F: torch.Tensor | None
) -> tuple[Solution, torch.Tensor]:
    # Q-space per feature under the vocabulary shift. With the LM term, the features in forced_F keep an
    # unread token at the max (0), the others pin it among the read entries. Returns the solution and the
    # features whose max is held outside.
    read_FV = read_entries(prob)
    feat_bd = prob.feat_S[torch.from_numpy(prob.bd.state_ids)]
    pure = replace(opts, ce_coef=0.0)
    forced = torch.zeros(prob.n_features, dtype=torch.bool) if forced_F is None else forced_F

    def loss_of(q_FV):
        loss = bd_loss_from_q(q_FV[feat_bd], prob.bd, pure)
        return loss + opts.ce_coef * lm_term(prob, q_FV, read_FV, forced) if opts.ce_coef else loss

    lo = -50.0 if opts.q_min is None else opts.q_min
    kd = solve_kd(prob).theta_FV
    q0 = (kd - kd.amax(-1, keepdim=True)).clamp(lo, 0.0)
    seen_F = read_FV.any(-1)
    free_F = (~read_FV.all(-1) & (forced if opts.ce_coef else True)) | ~seen_F
    box = torch.full_like(q0, lo), torch.zeros_like(q0)
    loss, q, pg = pinned_box_minimise(loss_of, q0, *box, read_FV, free_F, scale=_data_scale(prob))
    held_F = forced if opts.ce_coef else q.masked_fill(~read_FV, float("-inf")).amax(-1) < -1e-9
    theta = max_outside(_complete(q, read_FV), read_FV, held_F & seen_F)
    return Solution(theta, loss, pg), held_F


def solve_bd_offline(prob: AliasedProblem, name: str) -> Solution:
    """The exact optimum of the offline BD form ``name`` (a key of ``BD_FORMS``) over the aliased student.

    Vocabulary shift with the LM term: two candidates for where the max is held outside (none, or where pure
    BD holds it), the better kept, as the diagnosis does.
    """
    opts = _bd_opts(prob, BD_FORMS[name])
    if opts.shift == "vocab":
        if not opts.ce_coef:
            return _solve_bd_vocab(prob, opts, None)[0]
        _, held_F = _solve_bd_vocab(prob, replace(opts, ce_coef=0.0), None)
        candidates = [_solve_bd_vocab(prob, opts, None)[0]]
        if held_F.any():
            candidates.append(_solve_bd_vocab(prob, opts, held_F)[0])
        return min(candidates, key=lambda sol: sol.loss)
    read_FV = read_entries(prob)
    loss, theta, pg = _smoothed_minimise(
        lambda th, tau: offline_bd_loss(prob, th, opts, read_FV, tau), solve_kd(prob).theta_FV, _data_scale(prob)
    )
    return Solution(_complete(theta, read_FV), loss, pg)


def _smoothed_minimise(
    loss_of: Callable[[torch.Tensor, float], torch.Tensor],
    x0: torch.Tensor,
    scale: torch.Tensor,
    taus: tuple[float, ...] = SMOOTHING,
) -> tuple[float, torch.Tensor, float]:
    # The set shift's max has kinks where two set members tie at the top, and the optima sit on them (the
    # teacher's symmetric topics tie exactly): minimise the smoothed loss for each tau, warm started; return
    # the exact loss at the last point and the smoothed loss's gradient norm there.
    for tau in taus:
        _, x0, pg = box_minimise(lambda x, tau=tau: loss_of(x, tau), x0, scale=scale)
    return float(loss_of(x0, 0.0)), x0, pg


def online_bd_step(
    prob: AliasedProblem, theta_FV: torch.Tensor, value_F: torch.Tensor | None, lmbda: float = 0.5, warm: bool = True
) -> tuple[Solution, float]:
    """One turn of online BD's data loop: the loss's optimum with the value and chi^2 terms on ``(1 - lmbda) D
    + lmbda`` (the student's own transitions under its projected policy pi_p), held as data. ``value_F``: the
    free-level parameterisation's values (None: Q = set-shifted logits). Returns the new solution and how far
    the projected policy moved (sup-norm)."""
    opts = _bd_opts(prob, ONLINE_BD)
    read_FV = read_entries(prob)
    F, V = theta_FV.shape
    free = value_F is not None
    with torch.no_grad():
        log_pi_SV = projected_log_policy(prob, theta_FV)
        own_SV = (occupancy(prob, log_pi_SV) * prob.live_S)[:, None] * log_pi_SV.exp()
        mix_SV = (1.0 - lmbda) * prob.d_data_S[:, None] * prob.log_data_SV.exp() + lmbda * own_SV
    x0 = torch.cat([theta_FV.flatten(), value_F if free else theta_FV.new_zeros(0)])
    scale_F = feature_scale(prob, mix_SV.sum(-1))
    scale = torch.cat([scale_F.flatten(), scale_F[:, 0] if free else theta_FV.new_zeros(0)])

    def loss_of(x, tau):
        return online_bd_loss(prob, x[: F * V].view(F, V), opts, read_FV, mix_SV, x[F * V :] if free else None, tau)

    if free:  # smooth: no max in Q = log pi_p + v
        loss, x, pg = box_minimise(lambda x: loss_of(x, 0.0), x0, scale=scale)
    else:
        loss, x, pg = _smoothed_minimise(loss_of, x0, scale, SMOOTHING_WARM if warm else SMOOTHING)
    theta = x[: F * V].view(F, V)
    sol = Solution(theta, loss, pg, value_F=x[F * V :] if free else None)
    return sol, _policy_change(projected_log_policy(prob, theta), log_pi_SV)


def solve_bd_online(prob: AliasedProblem, lmbda: float = 0.5, free_level: bool = False) -> Solution:
    """Online BD's fixed point, by :func:`online_bd_step` from KD's optimum (free values from 0) until the
    projected policy moves < ``OUTER_TOL`` (``OUTER_TOL_SMOOTHED`` with the set shift). The student returned is
    ``-inf`` off the read entries."""
    value_F = torch.zeros(prob.n_features, dtype=torch.float64) if free_level else None
    sol = Solution(solve_kd(prob).theta_FV, float("nan"), 0.0, value_F=value_F)
    tol = OUTER_TOL if free_level else OUTER_TOL_SMOOTHED
    for it in range(1, MAX_OUTER + 1):
        sol, residual = online_bd_step(prob, sol.theta_FV, sol.value_F, lmbda, warm=it > 1)
        if residual < tol:
            break
    return replace(sol, theta_FV=_complete(sol.theta_FV, read_entries(prob)), iters=it, residual=residual)


SOLVERS: dict[str, Callable[[AliasedProblem], Solution]] = {
    "bc": solve_bc,
    "kd": solve_kd,
    "reverse_kl": solve_reverse_kl,
    "gkd": solve_gkd,
    "soft_q": solve_soft_q,
    "soft_q_td": solve_soft_q_td,
    "soft_q_td_online": solve_soft_q_td_online,
    **{name: partial(solve_bd_offline, name=name) for name in BD_FORMS},
    "bd_online": solve_bd_online,
    "bd_online_free": partial(solve_bd_online, free_level=True),
}
# The objectives the question is about: TD (soft Bellman) objectives, and the soft-optimal policy of the
# teacher reward that soft Q-learning targets.
TD_OBJECTIVES = (
    "soft_q", "soft_q_td", "soft_q_td_online", "bd_math", "bd_fixed", "bd_released", "bd_online", "bd_online_free",
)
