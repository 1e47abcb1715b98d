"""Every Bellman Distill form against one slow per-token loop: value and gradient, each expert term, each
place of phi's square, both values and both Q shifts (the forms of ``algorithms/iql_bd.py``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from algorithms.iql_bd import (
    CHI2_CHOICES,
    EXPERT_TERM_CHOICES,
    BDSteps,
    BDValues,
    BellmanDistillConfig,
    bellman_distill_loss,
    expert_and_policy_loss,
    math_form_loss,
    released_form_loss,
)
from tokenrl.lm.policy import VocabStats

GAMMA, ALPHA, Q_MIN, TOP_P, EPSILON, VOCAB = 0.9, 0.3, -2.0, 0.5, 1e-3, 64


def _reference_loss(logits, mask, slot, amask, lengths, terminated, vmax, lse, *, expert_term, chi2_on, value):
    """-J(Q), one transition at a time, with Python lists; ``vmax`` None = the set's max; ``lse``: the vocabulary
    log-normaliser (the released value's projection)."""
    B = logits.shape[0]

    def q_row(b, t):  # {candidate slot: Q} over the set
        members = [k for k in range(logits.shape[2]) if mask[b, t, k]]
        top = vmax[b, t] if vmax is not None else max(logits[b, t, k] for k in members)
        return {k: torch.clamp(logits[b, t, k] - top, min=Q_MIN) for k in members}

    def v(b, t):
        q = q_row(b, t)
        if (t == int(lengths[b]) and bool(terminated[b])) or not q:
            return torch.zeros((), dtype=logits.dtype)
        if value == "soft":
            return torch.logsumexp(torch.stack(list(q.values())), 0)
        # softmax(logits) * mask / p + epsilon over VOCAB tokens (Q = 0 outside), renormalised; V = E[Q - log pi]
        w = {k: torch.exp(logits[b, t, k] - lse[b, t]) / TOP_P + EPSILON for k in q}
        z = sum(w.values()) + (VOCAB - len(q)) * EPSILON
        inside = sum(w[k] / z * (q[k] - torch.log(w[k] / z)) for k in q)
        return inside - (VOCAB - len(q)) * EPSILON / z * torch.log(EPSILON / z)

    rewards, squares, policy_squares, vocab_squares, values = [], [], [], [], []
    for b in range(B):
        for t in range(int(lengths[b])):
            v_next = v(b, t + 1)
            values.append(v(b, t) - GAMMA * v_next)
            q = q_row(b, t)
            if expert_term == "math" and slot[b, t] >= 0:
                r = q[int(slot[b, t])] - GAMMA * v_next
            elif expert_term == "vocab_mean":
                r = sum(q.values()) / VOCAB - GAMMA * v_next
            else:
                r = None  # the expert action is outside the set: no Q, dropped
            if r is not None:
                rewards.append(r)
                squares.append(r * r)
            pi = torch.softmax(torch.stack(list(q.values())), 0).detach()
            policy_squares.append(sum(p * (qk - GAMMA * v_next) ** 2 for p, qk in zip(pi, q.values())))
            in_set = sum((qk - GAMMA * v_next) ** 2 for qk in q.values())
            vocab_squares.append((in_set + (VOCAB - len(q)) * (GAMMA * v_next) ** 2) / VOCAB)

    def mean(xs):
        return torch.stack(xs).mean()

    if chi2_on == "expert":
        objective = mean([r - r * r / (4 * ALPHA) for r in rewards])
    elif chi2_on == "expert_and_policy":
        objective = mean(rewards) - 0.5 * (mean(squares) + mean(policy_squares)) / (4 * ALPHA)
    else:
        objective = mean(rewards) - mean(vocab_squares) / (4 * ALPHA)
    return -(objective - mean(values))


@pytest.fixture(scope="module")
def bd_batch(synthetic_buffer):
    """Real sets, actions and lengths (some terminated, some truncated) with random float64 logits."""
    batch = synthetic_buffer.collate(list(range(8)), top_p=TOP_P)
    g = torch.Generator().manual_seed(0)
    B, S, K = batch.cand_ids_BSK.shape
    logits = torch.randn(B, S, K, generator=g, dtype=torch.float64) * 3
    slot = batch.action_slot_BT.clone()
    slot[0, 0] = -1  # one expert action outside its set
    vmax = logits.amax(-1) + torch.rand(B, S, generator=g, dtype=torch.float64)  # a vocabulary max above the set's
    lse = torch.logaddexp(torch.logsumexp(logits, -1), torch.randn(B, S, generator=g, dtype=torch.float64) + 3)
    return logits, batch.cand_mask_BSK, slot, batch.action_mask_BT, batch.lengths_B, batch.terminated_B, vmax, lse


@pytest.mark.parametrize(
    "expert_term, chi2_on, value, shift",
    list(itertools.product(EXPERT_TERM_CHOICES, CHI2_CHOICES, ("soft", "released"), ("set", "vocab"))),
)
def test_every_form_equals_a_per_token_loop(bd_batch, expert_term, chi2_on, value, shift):
    logits, mask, slot, amask, lengths, terminated, vmax, lse = bd_batch
    cfg = BellmanDistillConfig(
        top_p=TOP_P, gamma=GAMMA, alpha=ALPHA, q_min=Q_MIN, q_shift=shift, chi2_on=chi2_on, expert_term=expert_term,
        value=value, epsilon=EPSILON, ce_coef=0.0,
    )
    got_logits, ref_logits = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, stats = bellman_distill_loss(
        cfg, got_logits, mask, BDSteps(slot, amask, lengths, terminated), vocab_size=VOCAB,
        vocab=VocabStats(max_BS=vmax if shift == "vocab" else None, lse_BS=lse),
    )
    want = _reference_loss(
        ref_logits, mask, slot, amask, lengths, terminated, vmax if shift == "vocab" else None, lse,
        expert_term=expert_term, chi2_on=chi2_on, value=value,
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    (got_grad,) = torch.autograd.grad(got, got_logits)
    (want_grad,) = torch.autograd.grad(want, ref_logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert stats["loss/total"] is got and math.isfinite(stats["loss/chi2"].item())


def test_the_forms_agree_where_they_must():
    """With one candidate per state and a deterministic policy, the expert-and-policy square is the expert's:
    both forms give the same loss; the released form adds the outside tokens' (gamma V')^2 / |V| terms."""
    g = torch.Generator().manual_seed(1)
    B, T = 2, 3
    q_BSK = torch.randn(B, T + 1, 1, generator=g, dtype=torch.float64)
    mask_BSK = torch.ones(B, T + 1, 1, dtype=torch.bool)
    v_BS = q_BSK[..., 0]
    x = BDValues(q_BSK, mask_BSK, v_BS, v_BS[:, 1:], torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool))
    r_BT = q_BSK[:, :T, 0] - GAMMA * x.v_next_BT
    ok_BT = torch.ones(B, T, dtype=torch.bool)
    math_loss, _ = math_form_loss(x, r_BT, ok_BT, gamma=GAMMA, alpha=ALPHA)
    policy_loss, _ = expert_and_policy_loss(x, r_BT, ok_BT, gamma=GAMMA, alpha=ALPHA)
    assert policy_loss.item() == pytest.approx(math_loss.item(), rel=1e-12)
    released_at_one, _ = released_form_loss(x, r_BT, ok_BT, gamma=GAMMA, alpha=ALPHA, vocab_size=1)
    assert released_at_one.item() == pytest.approx(math_loss.item(), rel=1e-12)
    released, terms = released_form_loss(x, r_BT, ok_BT, gamma=GAMMA, alpha=ALPHA, vocab_size=5)
    extra = ((r_BT.square() + 4 * (GAMMA * x.v_next_BT).square()) / 5).mean() / (4 * ALPHA)
    assert terms["loss/chi2"].item() == pytest.approx(extra.item(), rel=1e-12)
    expert_chi2 = r_BT.square().mean() / (4 * ALPHA)
    assert (released - math_loss).item() == pytest.approx((extra - expert_chi2).item(), rel=1e-9, abs=1e-12)
