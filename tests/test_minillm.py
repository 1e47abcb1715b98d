"""MiniLLM: the policy-gradient estimator against the exact gradient of the sequence-level reverse KL."""

from __future__ import annotations

import pytest
import torch

from algorithms.gkd import generalized_jsd
from algorithms.minillm import action_slots, minillm_loss, mixed_policy_fn, mixture_logprobs
from tests.tiny_token_mdp import TinyTokenMDP


def _estimate(mdp, logits_SV, n, generator, single_step=True, **kw):
    rows_BT, actions_BT, mask_BT = mdp.sample(logits_SV, n, generator)
    logp_BTV = torch.log_softmax(logits_SV, -1)[rows_BT]
    t_logp_BTV = mdp.teacher_logp_SV[rows_BT]
    logp_BT = logp_BTV.gather(-1, actions_BT[..., None])[..., 0]
    t_logp_BT = t_logp_BTV.gather(-1, actions_BT[..., None])[..., 0]
    full = torch.ones_like(logp_BTV, dtype=torch.bool)
    kl_BT = generalized_jsd(logp_BTV, t_logp_BTV, 1.0, full) if single_step else torch.zeros_like(logp_BT)
    loss, _ = minillm_loss(logp_BT, logp_BT.detach(), t_logp_BT, kl_BT, mask_BT, **kw)
    (grad,) = torch.autograd.grad(loss, logits_SV)
    return grad


@pytest.mark.parametrize("vocab_size,max_len", [(3, 3), (4, 2)])
def test_policy_gradient_matches_exact_reverse_kl_gradient(vocab_size, max_len):
    mdp = TinyTokenMDP(vocab_size, max_len, seed=vocab_size)
    logits_SV = torch.randn(mdp.n_live, vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits_SV.requires_grad_(True)
    kl, _ = mdp.sequence_reverse_kl(logits_SV)
    (exact,) = torch.autograd.grad(kl, logits_SV)

    # Independent groups: their spread gives the Monte-Carlo standard error of the mean estimate.
    generator = torch.Generator().manual_seed(1)
    groups, per_group = 40, 500
    kw = dict(clip_eps=0.2, length_norm=False, baseline=True)
    grads = torch.stack([_estimate(mdp, logits_SV, per_group, generator, **kw) for _ in range(groups)])
    mean, se = grads.mean(0), grads.std(0) / groups**0.5
    assert se.max() < 0.2 * exact.abs().max(), "too few samples for the test to discriminate"
    assert ((mean - exact).abs() <= 4.5 * se + 1e-9).all(), (mean - exact) / se

    # Without the exact single-step part the estimate is biased, and the tolerance catches it.
    biased = torch.stack([_estimate(mdp, logits_SV, per_group, generator, single_step=False, **kw) for _ in range(groups)])
    b_mean, b_se = biased.mean(0), biased.std(0) / groups**0.5
    assert ((b_mean - exact).abs() > 4.5 * b_se + 1e-9).any()


def test_mixed_policy_and_importance_weights():
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(5, 7, generator=g)
    t_logits = torch.randn(5, 7, generator=g)
    t_logits[:, :2] = float("-inf")  # a restricted teacher (outside its set) mixes in only the student's mass
    tokens, lengths = torch.zeros(5, 3, dtype=torch.long), torch.full((5,), 3)
    mixed = mixed_policy_fn(lambda *_: s_logits, lambda *_: t_logits, 0.3)(tokens, lengths)
    want = 0.3 * torch.softmax(t_logits, -1) + 0.7 * torch.softmax(s_logits, -1)
    torch.testing.assert_close(torch.softmax(mixed, -1), want)
    s_logp, t_logp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    torch.testing.assert_close(mixture_logprobs(s_logp, t_logp, 0.3).exp(), want)
    assert torch.equal(mixture_logprobs(s_logp, t_logp, 0.0), s_logp)


def test_importance_weights_are_clipped_like_ppo():
    """With a positive advantage, a ratio above 1 + eps is clipped (no gradient); one below 1 - eps is not."""
    logp = torch.full((3, 2), -1.0, dtype=torch.float64, requires_grad=True)
    behaviour = torch.tensor([[-2.0, -1.0], [-1.1, -1.0], [-0.5, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[-1.0, 0.0]] * 3, dtype=torch.float64)  # r = [0, 1]: advantage 1 at t = 0
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss, stats = minillm_loss(
        logp, behaviour, teacher, torch.zeros(3, 2, dtype=torch.float64), mask,
        clip_eps=0.2, length_norm=False, baseline=False,
    )
    loss.backward()
    rho = torch.exp(logp.detach()[:, 0] - behaviour[:, 0])
    want = torch.tensor([0.0, -rho[1].item() / 3, -rho[2].item() / 3], dtype=torch.float64)
    torch.testing.assert_close(logp.grad[:, 0], want)
    assert torch.all(logp.grad[:, 1] == 0)  # the last token has no future reward
    assert stats["is/clip_frac"].item() == pytest.approx(2 / 6)


def test_action_slots():
    ids = torch.tensor([[[3, 1, 0], [2, 2, 2]]])
    mask = torch.tensor([[[True, True, False], [True, False, False]]])
    assert action_slots(torch.tensor([[1, 5]]), ids, mask).tolist() == [[1, -1]]
    assert action_slots(torch.tensor([[0, 2]]), ids, mask).tolist() == [[-1, 0]]
