"""Solvers of the exact BD diagnosis: the optimum of BD in Q-space, its least-outside-mass completion, and
logit-space training of the tabular student (see :mod:`tokenrl.theory.bd_tabular` for the objectives).

Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenrl.core.backup import restrict_to_set, soft_value
from tokenrl.theory.bd_tabular import (
    BDOptions,
    Problem,
    bc_loss,
    bd_loss,
    bd_loss_from_q,
    kd_loss,
    projected_ce,
    sft_start,
    state_weights,
)


def solve_q(
    prob: Problem, opts: BDOptions, q0_SV: torch.Tensor, forced_out_S: torch.Tensor | None = None
) -> tuple[float, torch.Tensor, float]:
    """The optimum of BD (with its LM term, no fix term) over the Q-values the shift can produce, from ``q0_SV``.

    BD reads only the Q-values on the sets, so it is solved in Q-space, where the logit-space kinks of the
    max (ties) disappear:

    * ``shift="vocab"`` with a token outside every set (p < 1): the reachable Q on a set is exactly the box
      ``[q_min, 0]^|A_p(s)|`` (all entries < 0 means an outside token holds the max);
    * ``shift="set"`` (and ``"vocab"`` at p = 1, where the set is the vocabulary): the same box with the
      set's largest entry pinned at 0 (which entry: the start's largest, then the first solution's);
    * ``shift="none"``: raw logits, ``[q_min, Q_CAP]`` (a solution at the cap flags an unbounded objective).

    With ``ce_coef > 0`` the LM term is :func:`projected_ce` (only for the data's set, ``p = sample_p``):
    under the set shift the outside logits only enter the LM term, which sends them to ``-inf``; under the
    vocabulary shift the states in ``forced_out_S`` keep an outside token at the max (0) and the others pin
    the set's max at 0. L-BFGS-B solves each box problem to a projected-gradient tolerance (returned).

    Returns:
        ``(loss, q_SV, projected_grad_norm)``.
    """
    from scipy.optimize import minimize

    if opts.mass_coef:
        raise ValueError("solve_q solves BD (+ LM term) only: its optimum with the set-mass term is completion()'s")
    set_SV = prob.set_mask(opts.p)
    if opts.ce_coef and opts.p != prob.sample_p:
        raise ValueError("solve_q's LM term needs the loss's sets to be the data's (p == sample_p)")
    lo = -50.0 if opts.q_min is None else opts.q_min
    hi = Q_CAP if opts.shift == "none" else 0.0
    lo_SV = torch.full(set_SV.shape, lo, dtype=torch.float64)
    hi_SV = torch.full(set_SV.shape, hi, dtype=torch.float64)

    def loss_of(q):
        loss = bd_loss_from_q(q, prob, opts)
        if opts.ce_coef:
            loss = loss + opts.ce_coef * projected_ce(q, prob, set_SV, forced_out_S)
        return loss

    def run(lo_SV, hi_SV, x0):
        def f(x):
            q = torch.tensor(x, dtype=torch.float64).view(set_SV.shape).requires_grad_(True)
            loss = loss_of(q)
            loss.backward()
            return float(loss.detach()), q.grad.numpy().ravel().copy()

        bounds = list(zip(lo_SV.numpy().ravel(), hi_SV.numpy().ravel()))
        x0 = np.clip(x0.numpy().ravel(), lo_SV.numpy().ravel(), hi_SV.numpy().ravel())
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-13, "gtol": 1e-9})
        x = torch.tensor(res.x, dtype=torch.float64).view(set_SV.shape)
        _, g = f(res.x)
        g = torch.tensor(g).view(set_SV.shape)
        # projected gradient: components pushing against an active bound do not count
        pg = torch.where(((x <= lo_SV) & (g > 0)) | ((x >= hi_SV) & (g < 0)), torch.zeros_like(g), g)
        return float(res.fun), x, float(pg.norm())

    q0 = q0_SV.clamp(lo, hi)
    has_out = ~set_SV.all(-1)
    if opts.shift == "none":
        return run(lo_SV, hi_SV, q0)
    free_S = has_out if opts.shift == "vocab" else torch.zeros_like(has_out)
    if opts.ce_coef:
        free_S = free_S & (forced_out_S if forced_out_S is not None else torch.zeros_like(has_out))
    # Pin the set's max at 0 where the max must lie in the set: at the start's largest entry, then re-pinned
    # at the first solution's.
    for _ in range(2):
        top = restrict_to_set(q0, set_SV).argmax(-1, keepdim=True)
        lo_pin = torch.where(free_S[:, None], lo_SV, lo_SV.scatter(-1, top, 0.0))
        loss, q, pg = run(lo_pin, hi_SV, q0)
        if bool(free_S.all()):
            break
        q0 = q
    return loss, q, pg


# Upper bound on raw-logit Q-values in :func:`solve_q`; an optimum at it means the objective is unbounded.
Q_CAP = 50.0


def completion(q_SV: torch.Tensor, prob: Problem, opts: BDOptions, outside_mass: str | None = None) -> torch.Tensor:
    """Logits of the student with the *least* mass outside the set that realise ``q_SV`` on the sets.

    Pure BD does not see tokens outside the set except through the vocabulary max, so its optimum fixes the
    logits on the set only. The completion puts every outside token at ``-inf``, except that under the
    vocabulary-max shift a state whose set Q-values are all < 0 needs one outside token at the max (0).
    With ``outside_mass="teacher"`` (the set-mass fix, whose term sets it exactly) the outside tokens share
    the teacher's outside mass uniformly instead.
    """
    set_SV = prob.set_mask(opts.p)
    theta = restrict_to_set(q_SV, set_SV)
    if outside_mass is not None:
        # the set-mass fix: the teacher's outside mass, spread uniformly over the outside tokens
        m_t = (prob.teacher_SV * set_SV).sum(-1)
        log_in = soft_value(theta)
        n_out = (~set_SV).sum(-1).clamp_min(1)
        fill = log_in + torch.log((1 - m_t).clamp_min(1e-300) / m_t) - torch.log(n_out.to(theta.dtype))
        theta = torch.where(set_SV, theta, fill[:, None])
    elif opts.shift == "vocab":
        forced = theta.amax(-1) < -1e-9
        first_out = (~set_SV).to(torch.int64).argmax(-1)
        theta[forced, first_out[forced]] = 0.0
    return theta


def minimise(loss_fn, params: list[torch.Tensor], max_iter: int = 3000) -> float:
    """Minimise ``loss_fn()`` over ``params`` with L-BFGS (strong Wolfe), float64; returns the final gradient
    norm (non-smooth points of the max shift and the clip can stop L-BFGS early: the norm tells)."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()
    loss_fn().backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    return float(norm)


@dataclass
class Fit:
    """The result of one logit-space training run."""

    theta_SV: torch.Tensor
    loss: float
    grad_norm: float


def fit(prob: Problem, objective: str, opts: BDOptions | None, start: str, max_iter: int = 3000) -> Fit:
    """Train the tabular student's logits on ``objective`` (``"bd"``, ``"bc"`` or ``"kd"``) from ``start``
    (``"sft"``: :func:`sft_start`, ``"uniform"``: zero logits). For BD prefer :func:`solve_q`: in logit space
    L-BFGS stalls at ties of the max."""
    if start == "sft":
        theta = sft_start(prob).clone()
    elif start == "uniform":
        theta = torch.zeros(prob.lang.n_states, prob.lang.vocab_size, dtype=torch.float64)
    else:
        raise ValueError(f"start must be 'sft' or 'uniform', got {start!r}")
    theta.requires_grad_(True)
    if objective == "bd":
        if opts is None:
            raise ValueError("objective 'bd' needs opts")
        loss_fn = lambda: bd_loss(theta, prob, opts)  # noqa: E731
    elif objective == "bc":
        loss_fn = lambda: bc_loss(theta, prob)  # noqa: E731
    elif objective == "kd":
        loss_fn = lambda: kd_loss(theta, prob)  # noqa: E731
    else:
        raise ValueError(f"objective must be 'bd', 'bc' or 'kd', got {objective!r}")
    gnorm = minimise(loss_fn, [theta], max_iter)
    with torch.no_grad():
        final = float(loss_fn())
    return Fit(theta.detach(), final, gnorm)


def out_mass_slope(theta_SV: torch.Tensor, prob: Problem, opts: BDOptions) -> tuple[float, float]:
    """Direction in which a gradient step on the BD loss moves the out-of-set mass, at ``theta_SV``.

    Returns ``(d out_mass / d step, |grad on out-of-set logits|)``: the first is the derivative of the
    data-weighted out-of-set mass along the negative loss gradient (positive = BD pushes mass out of the set).
    """
    theta = theta_SV.clone().requires_grad_(True)
    (g_theta,) = torch.autograd.grad(bd_loss(theta, prob, opts), [theta])
    set_SV = prob.set_mask(prob.sample_p)
    theta2 = theta_SV.clone().requires_grad_(True)
    out = (state_weights(prob) * (torch.softmax(theta2, -1) * ~set_SV).sum(-1)).sum()
    (g_out,) = torch.autograd.grad(out, [theta2])
    return float(-(g_out * g_theta).sum()), float(g_theta[~set_SV].norm())
