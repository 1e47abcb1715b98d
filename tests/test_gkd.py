"""GKD's generalized JSD: against TRL's own loss, a per-token loop, and the set-restricted form."""

from __future__ import annotations

import math
import os

import pytest
import torch

from algorithms.gkd import generalized_jsd_loss, top_p_generalized_jsd_loss


def _loop_jsd(student_logits, teacher_logits, beta, temperature, mask):
    """Per-token reference from the definition, in float64 with Python scalars (0 log 0 = 0)."""

    def kl(p, q):
        return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)

    total, count = 0.0, 0
    B, T, V = student_logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            q = torch.softmax(student_logits[b, t].double() / temperature, 0).tolist()
            p = torch.softmax(teacher_logits[b, t].double() / temperature, 0).tolist()
            if beta == 0:
                value = kl(p, q)
            elif beta == 1:
                value = kl(q, p)
            else:
                m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q)]
                value = beta * kl(p, m) + (1 - beta) * kl(q, m)
            total += value
            count += 1
    return total / count


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_equals_per_token_loop(beta, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(3, 4, generator=g) > 0.3
    got = generalized_jsd_loss(student, teacher, beta, temperature, mask).item()
    assert got == pytest.approx(_loop_jsd(student, teacher, beta, temperature, mask), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_jsd_equals_trl(beta, temperature):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature * 100))
    student = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100  # TRL's ignore index marks positions outside the mean
    student.requires_grad_(True)
    ours = generalized_jsd_loss(student, teacher, beta, temperature, labels != -100)
    (g_ours,) = torch.autograd.grad(ours, student)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (g_theirs,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_set_restricted_jsd_equals_dense_on_the_set(beta):
    """On a set, the sparse form equals the dense loss on the set's logits; a full set is the dense loss."""
    g = torch.Generator().manual_seed(1)
    B, T, V, K = 2, 3, 9, 4
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher_logp = torch.log_softmax(teacher, -1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    mask = torch.ones(B, T, K, dtype=torch.bool)
    mask[0, 1, 2:] = False  # a smaller set
    mask[1, 2] = False  # an empty set: excluded from the mean
    state_mask = torch.ones(B, T, dtype=torch.bool)
    sparse = top_p_generalized_jsd_loss(student.gather(-1, ids), teacher_logp.gather(-1, ids), mask, state_mask, beta, 0.8)
    neg = float("-inf")
    dense_s = student.gather(-1, ids).masked_fill(~mask, neg)
    dense_t = teacher.gather(-1, ids).masked_fill(~mask, neg)
    ok = mask.any(-1)
    ref = _loop_jsd(
        torch.where(ok[..., None], dense_s, 0.0).detach(), torch.where(ok[..., None], dense_t, 0.0), beta, 0.8, ok
    )
    assert sparse.item() == pytest.approx(ref, rel=1e-10)
    sparse.backward()
    assert torch.isfinite(student.grad).all()
    full = top_p_generalized_jsd_loss(
        student, teacher_logp, torch.ones(B, T, V, dtype=torch.bool), state_mask, beta, 0.8
    )
    torch.testing.assert_close(full, generalized_jsd_loss(student, teacher, beta, 0.8), rtol=1e-10, atol=1e-12)
