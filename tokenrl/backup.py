"""TD-backup functions: the only place the soft-value and Bellman formulas live.

All functions are pure tensor functions. Conventions (see :class:`tokenrl.buffer.Batch`):

* a response of ``length`` tokens visits states ``s_0 .. s_length``; a padded batch holds ``S = T + 1``
  states for ``T`` response slots (``_BS`` tensors) and ``T`` actions (``_BT`` tensors);
* ``V(s_length) = 0`` when the response ended with EOS (``terminated``) and is bootstrapped otherwise
  (``truncated`` at max_new_tokens);
* candidate sets (the teacher's top-p set, or the whole vocabulary) are given as ``[..., K]`` values with a
  ``[..., K]`` bool mask; a dense ``[..., V]`` tensor with a ``[..., V]`` mask is the same thing with K = V.
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


def soft_value(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft value over a candidate set: ``V = log sum_{a in set} exp Q(a)``.

    Args:
        q: ``[..., K]`` Q-values (candidate logits, or dense logits with K = V).
        mask: ``[..., K]`` bool, True for members of the set.

    Returns:
        ``[...]`` soft values. Rows with an empty set give ``-inf``; mask them out downstream.
    """
    return torch.logsumexp(q.masked_fill(~mask, NEG_INF), dim=-1)


def soft_value_dense(logits_BSV: torch.Tensor, cand_ids_BSK: torch.Tensor, cand_mask_BSK: torch.Tensor) -> torch.Tensor:
    """Soft value over a sparse candidate set computed from dense logits (reference for the gathered form).

    Args:
        logits_BSV: ``[..., V]`` dense Q-values.
        cand_ids_BSK: ``[..., K]`` candidate token ids.
        cand_mask_BSK: ``[..., K]`` validity of each candidate slot.

    Returns:
        ``[...]`` soft values, equal to ``soft_value(gather(logits, ids), mask)``.
    """
    return soft_value(logits_BSV, scatter_mask(cand_ids_BSK, cand_mask_BSK, logits_BSV.shape[-1]))


def scatter_mask(cand_ids: torch.Tensor, cand_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense ``[..., V]`` bool mask of a sparse candidate set ``[..., K]``."""
    # Invalid slots go to an extra column: padding repeats pad_id, which may also be a real member.
    dense = torch.zeros(*cand_ids.shape[:-1], vocab_size + 1, dtype=torch.bool, device=cand_ids.device)
    ids = torch.where(cand_mask, cand_ids, torch.full_like(cand_ids, vocab_size))
    return dense.scatter(-1, ids, True)[..., :vocab_size]


def shifted_q(
    logits: torch.Tensor, mask: torch.Tensor, q_min: float | None, max_logit: torch.Tensor | None = None
) -> torch.Tensor:
    """Q-values from logits as in Bellman Distill: subtract the max logit, clip below at ``q_min``.

    Bellman Distill shifts by the max over the whole vocabulary (``max_logit``), which ties the set's
    logits to every other token: ``Q(s, a) = 0`` only for the student's argmax. Without ``max_logit`` the
    max over the set is used (the policy on the set is the same, but nothing then ranks the set above the
    rest of the vocabulary).

    Args:
        logits: ``[..., K]`` candidate logits.
        mask: ``[..., K]`` candidate validity.
        q_min: lower clip, or None for no clip.
        max_logit: ``[...]`` max logit over the vocabulary, or None to use the max over the set.
    """
    if max_logit is None:
        max_logit = masked_max(logits, mask).clamp_min(torch.finfo(logits.dtype).min)
    q = logits - max_logit[..., None]
    return q.clamp_min(q_min) if q_min is not None else q


def next_state_values(v_BS: torch.Tensor, lengths_B: torch.Tensor, terminated_B: torch.Tensor) -> torch.Tensor:
    """Value of the next state of every action, with terminal masking.

    ``v_next[b, t] = V(s_{t+1})``, except ``0`` when ``t + 1 == lengths_B[b]`` and the response terminated
    (EOS), and ``0`` on padding (``t >= lengths_B[b]``). A truncated response bootstraps ``V(s_length)``.

    Args:
        v_BS: ``[B, T + 1]`` state values.
        lengths_B: ``[B]`` response lengths.
        terminated_B: ``[B]`` bool, True when the response ended with EOS.

    Returns:
        ``[B, T]`` next-state values.
    """
    v_next = v_BS[:, 1:]
    t1 = torch.arange(1, v_BS.shape[1], device=v_BS.device)[None, :]
    is_terminal = terminated_B[:, None] & (t1 == lengths_B[:, None])
    keep = (t1 <= lengths_B[:, None]) & ~is_terminal
    return torch.where(keep, v_next, torch.zeros_like(v_next))


def td_target(reward_BT: torch.Tensor, v_next_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Soft TD target ``r + gamma * V(s')`` (terminal masking is already in ``v_next_BT``)."""
    return reward_BT + gamma * v_next_BT


def implicit_reward(q_BT: torch.Tensor, v_next_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """IQ-Learn's implicit reward ``r(s, a) = Q(s, a) - gamma * V(s')`` (inverse of the soft Bellman backup)."""
    return q_BT - gamma * v_next_BT


def chi2_phi(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The chi^2 concave function of IQ-Learn: ``phi(x) = x - x^2 / (4 alpha)``."""
    if alpha <= 0:
        raise ValueError(f"chi^2 alpha must be > 0, got {alpha}")
    return x - x.square() / (4.0 * alpha)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over True entries of ``mask`` (0 when the mask is empty)."""
    mask_f = mask.to(x.dtype)
    return (x * mask_f).sum() / mask_f.sum().clamp_min(1.0)


def iq_learn_value_term(v_BS: torch.Tensor, v_next_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """IQ-Learn's value term ``E_D[V(s) - gamma V(s')]`` over the valid transitions (a scalar)."""
    return masked_mean(v_BS[:, :-1] - gamma * v_next_BT, mask_BT)


@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Target-network update ``theta_target <- (1 - tau) theta_target + tau theta_online`` (tau=1: hard copy)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"polyak tau must be in (0, 1], got {tau}")
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p_o.detach(), tau)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)
