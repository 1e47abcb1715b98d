"""Distributions on action sets: every soft value, projection, log-probability, NLL, KL and entropy formula, once.

An action set is given as ``[..., K]`` values with a ``[..., K]`` bool mask; a dense ``[..., V]`` tensor with a
``[..., V]`` mask (or ``mask=None``) is the same thing with K = V (shape letters: :mod:`tokenrl.core`). All
functions are pure tensor functions, tested against per-token loops (``tests/test_backup.py``).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for loss arithmetic (half-precision logits lose small Q differences); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Max of ``x`` over entries where ``mask`` is True (``-inf`` for an all-False row)."""
    return x.masked_fill(~mask, NEG_INF).amax(dim=dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over True entries of ``mask`` (0 when the mask is empty)."""
    mask_f = mask.to(x.dtype)
    return (x * mask_f).sum() / mask_f.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------
# Policies on an action set
# ------------------------------------------------------------------------------------------------
def soft_value(q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft value over an action set: ``V = log sum_{a in set} exp Q(a)``.

    Args:
        q: ``[..., K]`` Q-values (candidate logits, or dense logits with K = V).
        mask: ``[..., K]`` bool, True for members of the set; None = every entry.

    Returns:
        ``[...]`` soft values. Rows with an empty set give ``-inf`` (see :func:`state_values`).
    """
    return torch.logsumexp(q if mask is None else q.masked_fill(~mask, NEG_INF), dim=-1)


def restrict_to_set(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with every entry outside the set at ``-inf``: their softmax is the projected policy.

    Args:
        logits: ``[..., K]`` logits.
        mask: ``[..., K]`` bool set membership (broadcastable).
    """
    return logits.masked_fill(~mask, NEG_INF)


def project_to_set(logits: torch.Tensor, mask: torch.Tensor | None = None, log: bool = True) -> torch.Tensor:
    """The policy ``softmax(logits)`` projected onto an action set (renormalised on it).

    Args:
        logits: ``[..., K]`` logits (or unnormalised log-probabilities).
        mask: ``[..., K]`` bool set membership; None = every entry (plain ``log_softmax`` / ``softmax``).
        log: return log-probabilities (``-inf`` outside the set) instead of probabilities (0 outside).

    Returns:
        ``[..., K]`` (log-)probabilities. A row with an empty set is all ``-inf`` (all 0), never NaN.
    """
    if mask is None:
        return torch.log_softmax(logits, dim=-1) if log else torch.softmax(logits, dim=-1)
    restricted = restrict_to_set(logits, mask)
    if log:
        return torch.where(mask, torch.log_softmax(restricted, dim=-1), NEG_INF)
    return torch.where(mask, torch.softmax(restricted, dim=-1), 0.0)


def vocab_logprobs(logits_NV: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``log softmax(logits)[ids]`` of some ids under the full-vocabulary softmax.

    Computed as ``logits[ids] - logsumexp(logits)``, which keeps no second ``[..., V]`` tensor.

    Args:
        logits_NV: ``[..., V]`` logits (any leading shape).
        ids_NK: ``[..., K]`` long token ids.

    Returns:
        ``[..., K]`` log-probabilities, in the logits' dtype.
    """
    return logits_NV.gather(-1, ids_NK) - soft_value(logits_NV)[..., None]


def token_nll(logits_NV: torch.Tensor, actions_N: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary negative log-likelihood ``-log softmax(logits)[action]`` of each token.

    Args:
        logits_NV: ``[..., V]`` logits (any leading shape).
        actions_N: ``[...]`` long token ids.

    Returns:
        ``[...]`` NLL per token, in the logits' dtype.
    """
    return -vocab_logprobs(logits_NV, actions_N[..., None])[..., 0]


# ------------------------------------------------------------------------------------------------
# Divergences
# ------------------------------------------------------------------------------------------------
def kl(logp_p: torch.Tensor, logp_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p || q) = sum_{a in set} p(a) (log p(a) - log q(a))`` per row; swap the arguments for ``KL(q || p)``.

    Terms with ``p(a) = 0`` count 0 (not ``0 * -inf = NaN``), and entries outside ``mask`` are never read.

    Args:
        logp_p: ``[..., K]`` log-probabilities of p (normalised on the set).
        logp_q: ``[..., K]`` log-probabilities of q at the same entries.
        mask: ``[..., K]`` bool set membership; None = every entry.

    Returns:
        ``[...]`` KL per row.
    """
    if mask is not None:
        logp_p, logp_q = logp_p.masked_fill(~mask, 0.0), logp_q.masked_fill(~mask, 0.0)
        return (logp_p.exp() * mask * (logp_p - logp_q)).sum(-1)
    p = logp_p.exp()
    return torch.where(p > 0, p * (logp_p - logp_q), 0.0).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_a p(a) log p(a)`` per row; terms with ``p(a) = 0`` count 0.

    Args:
        logp: ``[..., K]`` log-probabilities (normalised; ``-inf`` for zero-probability entries).

    Returns:
        ``[...]`` entropy in nats.
    """
    p = logp.exp()
    return torch.where(p > 0, -p * logp, 0.0).sum(-1)


def log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(log_x))`` for ``log_x <= 0``, stable near 0 (``-expm1``).

    ``log_x`` is first clipped to ``<= -eps`` of its dtype: a mass that rounds to 1 (or just above it)
    would otherwise give ``-inf`` or NaN and an infinite gradient.
    """
    return torch.log(-torch.expm1(log_x.clamp_max(-torch.finfo(log_x.dtype).eps)))


def bernoulli_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(p) || Bern(q))`` elementwise, from the log-probabilities of the event.

    ``p log(p / q) + (1 - p) log((1 - p) / (1 - q))``, with ``0 log 0 = 0``: the result is 0 for ``p = q``,
    finite for ``p in {0, 1}``, and its gradient in ``log_q`` never NaN.

    Args:
        log_p: ``[...]`` log p (p = the target probability, no gradient needed).
        log_q: ``[...]`` log q (``<= 0``).
    """
    p = log_p.exp()
    first = torch.where(p > 0, p * (log_p - log_q), 0.0)
    second = (1.0 - p) * (log1mexp(log_p) - log1mexp(log_q))
    return first + torch.where(p < 1, second, 0.0)


def set_mass_kl(
    logits_BTK: torch.Tensor, mask_BTK: torch.Tensor, lse_BT: torch.Tensor, teacher_logprobs_BTK: torch.Tensor
) -> torch.Tensor:
    """KL between the teacher's and the student's probability of landing in the teacher's set, per state.

    ``KL(Bern(M_t) || Bern(m_s))`` with ``M_t = sum_{a in A_p(s)} pi_teacher(a|s)`` and
    ``m_s = sum_{a in A_p(s)} pi_student(a|s)`` (both normalised over the whole vocabulary). It is 0 exactly
    when the student puts the teacher's mass on the set, whatever it does inside the set.

    Args:
        logits_BTK: ``[B, T, K]`` student logits of the set's candidates.
        mask_BTK: ``[B, T, K]`` set membership.
        lse_BT: ``[B, T]`` the student's ``logsumexp`` over the whole vocabulary at the same states.
        teacher_logprobs_BTK: ``[B, T, K]`` teacher log-probabilities of the candidates (full-distribution values).

    Returns:
        ``[B, T]`` KL per state (0 where the set is empty).
    """
    ok = mask_BTK.any(-1)
    # An empty set reads its (finite, padded) row instead: a logsumexp over nothing has a NaN gradient.
    mask_BTK = mask_BTK | ~ok[..., None]
    log_m_s = soft_value(logits_BTK, mask_BTK) - lse_BT
    log_m_t = soft_value(teacher_logprobs_BTK.to(logits_BTK.dtype), mask_BTK).clamp_max(0.0)
    kl_BT = bernoulli_kl(torch.where(ok, log_m_t, NEG_INF), torch.where(ok, log_m_s, NEG_INF))
    return torch.where(ok, kl_BT, 0.0)
