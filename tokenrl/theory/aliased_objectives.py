"""The distillation objectives of the aliased-student study, as exact functions of the student's logits.

Every function returns a scalar float64 tensor to *minimise*, differentiable in ``theta_FV`` (``[F, V]``, one
logit row per feature; see :mod:`tokenrl.theory.aliasing`). Where an objective reads data, the data are the
exact infinite-data weights (expected counts per sequence); ``weight`` arguments are such counts.

* :func:`bc_loss`: cross-entropy of the teacher data's tokens (SFT / SeqKD).
* :func:`kd_loss`: forward KL(teacher || student) on the teacher data's prefixes (token-level KD, the whole
  teacher distribution).
* :func:`reverse_kl_loss`: KL(student || teacher) of the sequence distributions (MiniLLM's objective); the
  gradient flows through the student's occupancy.
* :func:`soft_q_loss`: minus the student's discounted soft return with reward ``log pi*`` (the soft-optimal
  aliased policy; at gamma = 1 it is :func:`reverse_kl_loss`).
* :func:`gkd_loss`: GKD's generalized JSD(beta) at states weighted by ``weight_S`` (no gradient through them).
* :func:`soft_td_targets` / :func:`soft_td_loss`: soft Q-learning's TD regression on Q = raw logits.
* :func:`offline_bd_loss`: the BD diagnosis's exact loss (:func:`tokenrl.theory.bd_tabular.bd_loss_from_q`)
  of the aliased student, with its LM term over the tokens the student may emit.
* :func:`online_bd_loss`: IQ-Learn's online form on the top-p MDP (module docstring of that function).

Shape suffixes: ``S`` prefixes, ``F`` features, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

from tokenrl.core.backup import shifted_q
from tokenrl.theory.aliasing import AliasedProblem, kl_rows, log_policy, occupancy, reverse_kl_rows
from tokenrl.theory.bd_tabular import BDOptions, bd_loss_from_q, next_values, q_values, soft_values


def _weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Entries of weight 0 may hold inf or NaN (a token the student never emits): they must not count.
    return torch.where(weight > 0, x * weight, torch.zeros_like(x)).sum() / weight.sum().clamp_min(1e-300)


def bc_loss(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """``-E_D[log pi_theta(a|s)]`` over the teacher data's transitions."""
    return _weighted_mean(-log_policy(prob, theta_FV), prob.w_SV)


def kd_loss(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """``E_{s ~ data}[KL(pi*(.|s) || pi_theta(.|s))]`` per token, the whole teacher distribution as target."""
    return _weighted_mean(kl_rows(prob.log_teacher_SV, log_policy(prob, theta_FV)), prob.d_data_S)


def reverse_kl_loss(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """``KL(p_theta(y) || p*(y)) = sum_s d_theta(s) KL(pi_theta(.|s) || pi*(.|s))`` over whole responses."""
    log_pi_SV = log_policy(prob, theta_FV)
    return (occupancy(prob, log_pi_SV) * reverse_kl_rows(prob, log_pi_SV)).sum()


def soft_q_loss(prob: AliasedProblem, theta_FV: torch.Tensor) -> torch.Tensor:
    """Minus the discounted soft return ``E[sum_t gamma^t (log pi*(a_t|s_t) - log pi_theta(a_t|s_t))]``.

    Responses end at EOS or at ``max_len`` tokens (the finite horizon of the task; nothing is bootstrapped).
    """
    log_pi_SV = log_policy(prob, theta_FV)
    discount_S = torch.as_tensor(prob.gamma, dtype=torch.float64) ** prob.length_S
    return (discount_S * occupancy(prob, log_pi_SV) * reverse_kl_rows(prob, log_pi_SV)).sum()


def jsd_rows(log_t_SV: torch.Tensor, log_s_SV: torch.Tensor, beta: float) -> torch.Tensor:
    """``[S]`` generalized JSD(beta) of TRL / GKD: ``beta KL(t || m) + (1 - beta) KL(s || m)`` with
    ``m = beta t + (1 - beta) s``; ``beta = 0`` is KL(t || s) and ``beta = 1`` is KL(s || t)."""
    if beta == 0.0:
        return kl_rows(log_t_SV, log_s_SV)
    if beta == 1.0:
        return kl_rows(log_s_SV, log_t_SV)
    b = torch.tensor(beta, dtype=torch.float64)
    log_m_SV = torch.logaddexp(log_t_SV + torch.log(b), log_s_SV + torch.log1p(-b))
    return beta * kl_rows(log_t_SV, log_m_SV) + (1.0 - beta) * kl_rows(log_s_SV, log_m_SV)


def gkd_loss(prob: AliasedProblem, theta_FV: torch.Tensor, weight_S: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's loss ``E_{s ~ weight}[JSD_beta(pi*(.|s) || pi_theta(.|s))]`` over the whole vocabulary.

    ``weight_S`` holds the states' expected counts (a mixture of the teacher data's and the student's own
    occupancy), treated as data: no gradient flows through it.
    """
    return _weighted_mean(jsd_rows(prob.log_teacher_SV, log_policy(prob, theta_FV), beta), weight_S.detach())


def soft_td_targets(prob: AliasedProblem, q_FV: torch.Tensor) -> torch.Tensor:
    """``[S, V]`` soft Bellman targets ``log pi*(a|s) + gamma V_p(s')`` of the aliased Q-table ``q_FV``.

    ``V_p(s') = log sum_{a' in A_p(s')} exp Q(feature(s'), a')``: 0 after EOS, bootstrapped at truncated
    prefixes (as the real loss does).
    """
    v_S = soft_values(q_FV[prob.feat_S], prob.set_SV)
    return prob.log_teacher_SV + prob.gamma * next_values(v_S, prob.child_SV)


def soft_td_loss(
    prob: AliasedProblem, q_FV: torch.Tensor, target_SV: torch.Tensor, weight_SV: torch.Tensor
) -> torch.Tensor:
    """Soft Q-learning's regression ``E_weight[(Q(s, a) - target(s, a))^2]`` (the target held fixed, as a
    target network holds it)."""
    return _weighted_mean((q_FV[prob.feat_S] - target_SV.detach()).square(), weight_SV)


def _bd_view(prob: AliasedProblem, theta_FV: torch.Tensor, read_FV: torch.Tensor) -> torch.Tensor:
    # [S_bd, V] logits at the BD problem's states; entries no loss reads are set to 0 (finite, never used).
    return theta_FV.masked_fill(~read_FV, 0.0)[prob.feat_S[torch.from_numpy(prob.bd.state_ids)]]


def _q(theta_SV: torch.Tensor, set_SV: torch.Tensor, opts: BDOptions, tau: float) -> torch.Tensor:
    # BD's Q; tau > 0 smooths the set shift's max into tau * logsumexp(. / tau) (within tau log |A_p| of it).
    if opts.shift == "set" and tau > 0:
        return shifted_q(theta_SV, set_SV, opts.q_min, tau * soft_values(theta_SV / tau, set_SV))
    return q_values(theta_SV, set_SV, opts)


def lm_term(
    prob: AliasedProblem, theta_FV: torch.Tensor, read_FV: torch.Tensor, extra_F: torch.Tensor | None = None
) -> torch.Tensor:
    """The LM term (cross-entropy on the data tokens) of a student whose unread logits are ``-inf``, except
    that at the features in ``extra_F`` one unread token has logit 0 (the vocabulary max held outside)."""
    lse_F = torch.logsumexp(theta_FV.masked_fill(~read_FV, float("-inf")), -1)
    if extra_F is not None:
        lse_F = torch.where(extra_F, torch.logaddexp(lse_F, torch.zeros_like(lse_F)), lse_F)
    return _weighted_mean((lse_F[:, None] - theta_FV)[prob.feat_S], prob.w_SV)


def offline_bd_loss(
    prob: AliasedProblem, theta_FV: torch.Tensor, opts: BDOptions, read_FV: torch.Tensor, tau: float = 0.0
) -> torch.Tensor:
    """Exact offline BD (``-J(Q)``, :func:`tokenrl.theory.bd_tabular.bd_loss_from_q`) of the aliased student,
    plus ``opts.ce_coef`` times :func:`lm_term`.

    Args:
        prob: the problem.
        theta_FV: ``[F, V]`` logits.
        opts: the BD variant (``opts.p`` must be ``prob.p``: the data are sampled at the loss's p).
        read_FV: bool, the entries BD or the LM term read (the sets of the prefixes the data visit or
            bootstrap from); the student's other logits are ``-inf``. Under the vocabulary shift every logit
            enters the max: pass all True.
        tau: > 0 smooths the set shift's max (``tau * logsumexp(. / tau)``) for the solver's continuation;
            0 is the exact loss.
    """
    if opts.p != prob.p or opts.gamma != prob.gamma:
        raise ValueError(
            f"opts.p, opts.gamma must be the problem's ({prob.p}, {prob.gamma}): got {opts.p}, {opts.gamma}"
        )
    theta_SV = _bd_view(prob, theta_FV, read_FV)
    loss = bd_loss_from_q(_q(theta_SV, prob.bd.set_mask(opts.p), opts, tau), prob.bd, opts)
    return loss + opts.ce_coef * lm_term(prob, theta_FV, read_FV) if opts.ce_coef else loss


def online_bd_loss(
    prob: AliasedProblem,
    theta_FV: torch.Tensor,
    opts: BDOptions,
    read_FV: torch.Tensor,
    mix_SV: torch.Tensor,
    v_F: torch.Tensor | None = None,
    tau: float = 0.0,
) -> torch.Tensor:
    """IQ-Learn's online form of BD on the top-p MDP (chi^2 regularised over the mixture):

        -J(Q) = -E_D[r(s, a)] + E_mix[V_p(s) - gamma V_p(s')] + E_mix[r(s, a)^2] / (4 alpha),
        r(s, a) = Q(s, a) - gamma V_p(s'),

    the expert term on the teacher data D, the value and chi^2 terms on ``mix_SV``: a mixture of D and the
    student's own transitions in the top-p MDP (weight ``lmbda`` on the student's; the caller builds it and it
    is data: no gradient). At ``mix = D`` this is the offline math form :func:`offline_bd_loss` without its LM
    term. Q is ``opts.shift``-shifted logits, or with ``v_F`` the free-level parameterisation
    ``Q(s, a) = log pi_p(a|s) + v(feature(s))``, where ``V_p(s) = v(feature(s))``. Plus ``opts.ce_coef`` times
    :func:`lm_term`.

    Args:
        prob, theta_FV, opts, read_FV: as :func:`offline_bd_loss` (``opts.form`` must be ``"math"``).
        mix_SV: ``[S, V]`` expected counts of the mixture's transitions over the whole tree.
        v_F: ``[F]`` free per-feature values, or None.
        tau: as :func:`offline_bd_loss`.
    """
    if opts.form != "math" or opts.p != prob.p or opts.gamma != prob.gamma:
        raise ValueError("online BD is the math form at the problem's p and gamma")
    bd, ids = prob.bd, torch.from_numpy(prob.bd.state_ids)
    set_SV = bd.set_mask(opts.p)
    theta_SV = _bd_view(prob, theta_FV, read_FV)
    if v_F is None:
        q_SV = _q(theta_SV, set_SV, opts, tau)
        v_S = soft_values(q_SV, set_SV)
    else:
        v_S = v_F[prob.feat_S[ids]]
        q_SV = theta_SV - soft_values(theta_SV, set_SV)[:, None] + v_S[:, None]
    v_next_SV = next_values(v_S, bd.child_SV)
    r_SV = torch.where(set_SV, q_SV - opts.gamma * v_next_SV, torch.zeros_like(q_SV))
    mix_SV = mix_SV.detach()[ids]
    loss = (
        -_weighted_mean(r_SV, bd.w_SV * set_SV)
        + _weighted_mean(v_S[:, None] - opts.gamma * v_next_SV, mix_SV)
        + _weighted_mean(r_SV.square(), mix_SV * set_SV) / (4.0 * opts.alpha)
    )
    return loss + opts.ce_coef * lm_term(prob, theta_FV, read_FV) if opts.ce_coef else loss
