"""Solvers of the exact BD diagnosis: the optimum of BD in Q-space, its least-outside-mass completion, and
logit-space training of the tabular student (see :mod:`tokenrl.theory.bd_tabular` for the objectives).

Shape suffixes: ``S`` prefixes (states), ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tokenrl.core.distributions import restrict_to_set, soft_value
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


def box_minimise(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    max_iter: int = 20000,
    scale: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, float]:
    """Minimise ``loss_of(x)`` over a float64 tensor ``x`` in the box ``[lo, hi]`` with L-BFGS-B.

    Args:
        loss_of: maps a tensor of ``x0``'s shape to a scalar tensor (differentiable by autograd).
        x0: the start (clipped into the box).
        lo, hi: bounds of ``x0``'s shape (``-inf`` / ``inf`` allowed); None = unbounded.
        max_iter: L-BFGS-B iteration cap.
        scale: positive, ``x0``'s shape: L-BFGS-B runs on ``x * scale`` (a diagonal preconditioner: where
            the loss weighs an entry by ``w``, ``sqrt(w)`` evens out the curvature); None = 1.

    Returns:
        ``(loss, x, projected_grad_norm)``: the gradient norm (in ``x``) without the components that push
        against an active bound, the certificate of a (local) optimum.
    """
    from scipy.optimize import minimize

    shape = x0.shape
    lo = torch.full(shape, -np.inf, dtype=torch.float64) if lo is None else lo
    hi = torch.full(shape, np.inf, dtype=torch.float64) if hi is None else hi
    s = np.ones(x0.numel()) if scale is None else scale.detach().numpy().ravel()

    def f(y):
        q = torch.tensor(y / s, dtype=torch.float64).view(shape).requires_grad_(True)
        loss = loss_of(q)
        loss.backward()
        return float(loss.detach()), q.grad.numpy().ravel() / s

    bounds = list(zip(lo.numpy().ravel() * s, hi.numpy().ravel() * s))
    y = np.clip(x0.detach().numpy().ravel(), lo.numpy().ravel(), hi.numpy().ravel()) * s
    # L-BFGS-B can stop on its relative-reduction test with the gradient not yet small (a poor curvature model
    # after a long run): restart it from where it stopped, at most twice.
    for _ in range(3):
        res = minimize(f, y, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": max_iter, "maxfun": 2 * max_iter, "ftol": 1e-13, "gtol": 1e-9})
        x = torch.tensor(res.x / s, dtype=torch.float64).view(shape)
        x = torch.minimum(torch.maximum(x, lo), hi)  # undo the scaling's rounding at active bounds
        loss, g = f(x.numpy().ravel() * s)
        g = torch.tensor(g * s).view(shape)
        # projected gradient: components pushing against an active bound do not count
        pg = float(torch.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), torch.zeros_like(g), g).norm())
        if pg <= RESTART_PG:
            break
        y = x.numpy().ravel() * s
    return loss, x, pg


# box_minimise restarts L-BFGS-B while the projected gradient norm is above this.
RESTART_PG = 1e-6


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

    q0 = q0_SV.clamp(lo, hi)
    has_out = ~set_SV.all(-1)
    if opts.shift == "none":
        return box_minimise(loss_of, q0, lo_SV, hi_SV)
    free_S = has_out if opts.shift == "vocab" else torch.zeros_like(has_out)
    if opts.ce_coef:
        free_S = free_S & (forced_out_S if forced_out_S is not None else torch.zeros_like(has_out))
    return pinned_box_minimise(loss_of, q0, lo_SV, hi_SV, set_SV, free_S)


def pinned_box_minimise(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    q0_RV: torch.Tensor,
    lo_RV: torch.Tensor,
    hi_RV: torch.Tensor,
    read_RV: torch.Tensor,
    free_R: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, float]:
    """:func:`box_minimise` of Q-values ``[R, V]`` (rows: states or features) whose largest read entry is 0.

    A max-shifted Q row has its max at 0. Where a token outside the read entries can hold that max
    (``free_R``) the row is a plain box; elsewhere the largest read entry is pinned at 0: the start's largest,
    then re-pinned at the first solution's (a heuristic: each solution is a certified local optimum).

    Args:
        loss_of: maps ``[R, V]`` Q-values to a scalar tensor.
        q0_RV: the start.
        lo_RV, hi_RV: the box (``hi <= 0`` for a max-shifted Q).
        read_RV: bool, the entries the loss reads.
        free_R: bool, rows whose max may lie outside the read entries.
        scale: :func:`box_minimise`'s preconditioner.

    Returns:
        ``(loss, q_RV, projected_grad_norm)``.
    """
    for _ in range(2):
        top = restrict_to_set(q0_RV, read_RV).argmax(-1, keepdim=True)
        lo_pin = torch.where(free_R[:, None], lo_RV, lo_RV.scatter(-1, top, 0.0))
        loss, q, pg = box_minimise(loss_of, q0_RV, lo_pin, hi_RV, scale=scale)
        if bool(free_R.all()):
            break
        q0_RV = q
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
        theta = max_outside(theta, set_SV, theta.amax(-1) < -1e-9)
    return theta


def max_outside(theta_RV: torch.Tensor, read_RV: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
    """``theta_RV`` with, in each row of ``rows_R`` that has one, the first token outside ``read_RV`` at 0: the
    outside token that holds the max of a vocabulary-shifted Q whose read entries are all < 0."""
    theta_RV = theta_RV.clone()
    rows_R = rows_R & (~read_RV).any(-1)
    first_out_R = (~read_RV).to(torch.int64).argmax(-1)
    theta_RV[rows_R, first_out_R[rows_R]] = 0.0
    return theta_RV


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
