"""The shared formulas: every soft-value, projection, NLL, KL and Bellman formula lives here once.

All functions are pure tensor functions, tested against per-token loops (``tests/test_backup.py``).

Shape letters (the one table; every ``_XY`` suffix in ``tokenrl``, ``envs`` and ``algorithms`` uses it):

====  =====================================================================================================
B     batch rows (trajectories, or parallel envs)
T     response slots: the actions ``a_0 .. a_{T-1}`` of a padded batch
S     states, ``S = T + 1``: ``s_0 .. s_T`` (a response of ``length`` tokens visits ``s_0 .. s_length``)
K     candidate slots: the members of a state's action set (the teacher's top-p set), padded
V     vocabulary (a dense action set is the case K = V)
L     model-input columns: ``[left-padded prompt | right-padded response]``, ``L = P + T``, or, in the
      token envs, the prompt-plus-response columns of a right-padded state
P     prompt columns
D     hidden size
N     flattened tokens (``B * T`` or a chunk of them)
====  =====================================================================================================

Conventions (see :class:`tokenrl.data.buffer.Batch`):

* ``V(s_length) = 0`` when the response ended with EOS (``terminated``) and is bootstrapped otherwise
  (``truncated`` at max_new_tokens);
* an action set is given as ``[..., K]`` values with a ``[..., K]`` bool mask; a dense ``[..., V]`` tensor
  with a ``[..., V]`` mask (or ``mask=None``) is the same thing with K = V;
* the taken action is addressed by its slot in its state's set (``action_slot_BT``), ``-1`` when it lies
  outside the set or on padding.
"""

from __future__ import annotations

import copy
import math

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
def gather_action(values_BSK: torch.Tensor, action_slot_BT: torch.Tensor) -> torch.Tensor:
    """Value of the taken action at each step, ``[B, T]`` (0 where the action is outside the set).

    Args:
        values_BSK: ``[B, S, K]`` (or ``[B, T, K]``) per-candidate values; only the first ``T`` states are read.
        action_slot_BT: ``[B, T]`` slot of the taken action in its state's set, -1 if outside or padding.
    """
    T = action_slot_BT.shape[1]
    g = values_BSK[:, :T].gather(-1, action_slot_BT.clamp_min(0)[..., None])[..., 0]
    return torch.where(action_slot_BT >= 0, g, torch.zeros_like(g))


def soft_value(q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft value over an action set: ``V = log sum_{a in set} exp Q(a)``.

    Args:
        q: ``[..., K]`` Q-values (candidate logits, or dense logits with K = V).
        mask: ``[..., K]`` bool, True for members of the set; None = every entry.

    Returns:
        ``[...]`` soft values. Rows with an empty set give ``-inf`` (see :func:`state_values`).
    """
    return torch.logsumexp(q if mask is None else q.masked_fill(~mask, NEG_INF), dim=-1)


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


# ------------------------------------------------------------------------------------------------
# Bellman backups
# ------------------------------------------------------------------------------------------------
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
# Target networks
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """Target-network update ``theta_target <- (1 - rate) theta_target + rate theta_online`` (1: hard copy)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"target_update_rate must be in (0, 1], got {rate}")
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p_o.detach(), rate)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


class TargetNetwork:
    """A frozen copy of an online network, moved towards it by Polyak averaging after every step.

    Args:
        online: the network being trained (copied now; later updates read its current parameters).
        update_rate: Polyak rate in (0, 1]; 1.0 copies the online network at every :meth:`update`.

    Attributes:
        net: the target copy (no gradients; call it like the online network, in eval mode).
    """

    def __init__(self, online: torch.nn.Module, update_rate: float):
        if not 0.0 < update_rate <= 1.0:
            raise ValueError(f"target_update_rate must be in (0, 1], got {update_rate}")
        self.online = online
        self.update_rate = update_rate
        self.net = copy.deepcopy(online).requires_grad_(False)

    def update(self) -> None:
        """One Polyak step towards the online network."""
        polyak_update(self.net, self.online, self.update_rate)

    def state_dict(self) -> dict:
        """The target copy's parameters and buffers."""
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the target copy from :meth:`state_dict`."""
        self.net.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Set mass and the released Bellman Distill projection
# ------------------------------------------------------------------------------------------------
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
