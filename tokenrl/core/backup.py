"""TD backups on the token MDP: state values, the next-state shift with terminal masking, TD targets and the
IQ-Learn terms, each written once.

Built on the set formulas of :mod:`tokenrl.core.distributions`; the target network is in
:mod:`tokenrl.core.target`. All functions are pure tensor functions, tested against per-token loops
(``tests/test_backup.py``); shape letters as in :mod:`tokenrl.core`.

Conventions (see :class:`tokenrl.data.buffer.Batch`):

* ``V(s_length) = 0`` when the response ended with EOS (``terminated``) and is bootstrapped otherwise
  (``truncated`` at max_new_tokens);
* an action set is given as in :mod:`tokenrl.core.distributions` (values and a bool mask);
* the taken action is addressed by its slot in its state's set (``action_slot_BT``), ``-1`` when it lies
  outside the set or on padding.
"""

from __future__ import annotations

import math

import torch

from tokenrl.core.distributions import masked_max, masked_mean, soft_value


def gather_action(values_BSK: torch.Tensor, action_slot_BT: torch.Tensor) -> torch.Tensor:
    """Value of the taken action at each step, ``[B, T]`` (0 where the action is outside the set).

    Args:
        values_BSK: ``[B, S, K]`` (or ``[B, T, K]``) per-candidate values; only the first ``T`` states are read.
        action_slot_BT: ``[B, T]`` slot of the taken action in its state's set, -1 if outside or padding.
    """
    T = action_slot_BT.shape[1]
    g = values_BSK[:, :T].gather(-1, action_slot_BT.clamp_min(0)[..., None])[..., 0]
    return torch.where(action_slot_BT >= 0, g, torch.zeros_like(g))


def state_values(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft value over each state's action set, 0 where the set is empty (after EOS, on padding).

    Args:
        q: ``[..., K]`` Q-values.
        mask: ``[..., K]`` bool set membership.

    Returns:
        ``[...]`` values, finite everywhere.
    """
    v = soft_value(q, mask)
    return torch.where(mask.any(-1), v, torch.zeros_like(v))


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


def eos_steps(lengths_B: torch.Tensor, terminated_B: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` True at the step that emitted EOS: the last step of each terminated response."""
    t_T = torch.arange(T, device=lengths_B.device)[None, :]
    return terminated_B[:, None] & (t_T == lengths_B[:, None] - 1)


def td_target(reward_BT: torch.Tensor, v_next_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Soft TD target ``r + gamma * V(s')`` (terminal masking is already in ``v_next_BT``)."""
    return reward_BT + gamma * v_next_BT


def implicit_reward(q: torch.Tensor, v_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """IQ-Learn's implicit reward ``r(s, a) = Q(s, a) - gamma * V(s')`` (inverse of the soft Bellman backup).

    Broadcasts: ``q_BT`` with ``v_next_BT`` gives the taken actions' rewards; ``q_BTK`` with ``v_next_BT``
    gives every candidate's reward at the same state, bootstrapped from the taken action's next state.

    Args:
        q: ``[B, T]`` or ``[B, T, K]`` Q-values.
        v_next: ``[B, T]`` next-state values (terminal masking applied).
        gamma: discount.
    """
    if q.dim() == v_next.dim() + 1:
        v_next = v_next[..., None]
    return q - gamma * v_next


def chi2_penalty(sq: torch.Tensor, alpha: float) -> torch.Tensor:
    """IQ-Learn's chi^2 regulariser ``x^2 / (4 alpha)`` applied to a (mean) squared reward ``sq = x^2``."""
    if alpha <= 0:
        raise ValueError(f"chi^2 alpha must be > 0, got {alpha}")
    return sq / (4.0 * alpha)


def chi2_phi(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The chi^2 concave function of IQ-Learn: ``phi(x) = x - x^2 / (4 alpha)``."""
    return x - chi2_penalty(x.square(), alpha)


def iq_learn_value_term(v_BS: torch.Tensor, v_next_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """IQ-Learn's value term ``E_D[V(s) - gamma V(s')]`` over the valid transitions (a scalar)."""
    return masked_mean(v_BS[:, :-1] - gamma * v_next_BT, mask_BT)


# ------------------------------------------------------------------------------------------------
# The released Bellman Distill projection
# ------------------------------------------------------------------------------------------------
def released_state_values(
    q_BSK: torch.Tensor,
    logits_BSK: torch.Tensor,
    mask_BSK: torch.Tensor,
    lse_BS: torch.Tensor,
    top_p: float,
    epsilon: float,
    vocab_size: int,
) -> torch.Tensor:
    """State values of the released Bellman Distill code: an entropy-regularised expectation.

    The released code projects the student onto the set as ``pi = softmax(logits) * mask / p + epsilon``,
    renormalised over the vocabulary, and takes ``V(s) = sum_a pi(a) (Q_masked(a) - log pi(a))`` with
    ``Q_masked = 0`` outside the set. The ``vocab_size - |A_p(s)|`` tokens outside the set all carry
    ``epsilon`` and ``Q = 0``, so they are summed in closed form: O(K) per state at any vocabulary size.
    With ``epsilon = 0`` the release computes ``0 log 0`` outside the set (NaN); here ``epsilon`` must be > 0.

    Args:
        q_BSK: ``[B, S, K]`` Q-values of the candidates (shifted and clipped).
        logits_BSK: ``[B, S, K]`` student logits of the candidates.
        mask_BSK: ``[B, S, K]`` set membership.
        lse_BS: ``[B, S]`` the student's ``logsumexp`` over the whole vocabulary.
        top_p: the nominal p the release divides by.
        epsilon: the release's additive smoothing (> 0).
        vocab_size: the vocabulary size the tokens outside the set are counted at.

    Returns:
        ``[B, S]`` values, 0 where the set is empty.
    """
    if epsilon <= 0:
        raise ValueError(f"the released projection needs epsilon > 0 (0 gives 0 * log 0 = NaN), got {epsilon}")
    w_BSK = torch.where(mask_BSK, (logits_BSK - lse_BS[..., None]).exp() / top_p + epsilon, 0.0)
    n_out_BS = vocab_size - mask_BSK.sum(-1).to(w_BSK.dtype)
    z_BS = w_BSK.sum(-1) + n_out_BS * epsilon
    log_pi_BSK = torch.where(mask_BSK, torch.log(w_BSK.clamp_min(epsilon)) - torch.log(z_BS)[..., None], 0.0)
    in_set_BS = (w_BSK / z_BS[..., None] * (q_BSK - log_pi_BSK)).masked_fill(~mask_BSK, 0.0).sum(-1)
    log_pi_out_BS = math.log(epsilon) - torch.log(z_BS)
    v_BS = in_set_BS - n_out_BS * log_pi_out_BS.exp() * log_pi_out_BS
    return torch.where(mask_BSK.any(-1), v_BS, torch.zeros_like(v_BS))
