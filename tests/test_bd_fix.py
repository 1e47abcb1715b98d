"""The Bellman Distill fix and the released-code preset: the new pure terms against per-token loops, the one
chunked vocabulary pass against the dense computation, and the presets' configs."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms import make_algorithm
from algorithms.iql_bd import BDSteps, BellmanDistillConfig, bellman_distill_loss
from tests.conftest import algo_options, tiny_llama
from tokenrl.core.backup import released_state_values
from tokenrl.core.distributions import bernoulli_kl, set_mass_kl
from tokenrl.lm.policy import CausalLMPolicy, VocabStats


def _rand_sets(B, S, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, K, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, S, K, generator=g) < 0.6
    mask[:, :, 0] = True
    mask[0, -1] = False  # an empty set (a state past the response end)
    extra = torch.randn(B, S, V - K, generator=g, dtype=torch.float64) * 2  # the rest of the vocabulary
    teacher = torch.log_softmax(torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2, -1)[..., :K]
    return logits, mask, extra, teacher


def test_bernoulli_kl_matches_the_formula_and_its_edges():
    p = torch.tensor([0.3, 0.9, 0.0, 1.0, 0.5], dtype=torch.float64)
    q = torch.tensor([0.6, 0.2, 0.4, 0.7, 0.5], dtype=torch.float64, requires_grad=True)
    got = bernoulli_kl(p.log(), q.log())
    for i in range(5):
        pi, qi = float(p[i]), float(q.detach()[i])
        first = pi * math.log(pi / qi) if pi > 0 else 0.0
        want = first + ((1 - pi) * math.log((1 - pi) / (1 - qi)) if pi < 1 else 0.0)
        assert got[i].item() == pytest.approx(want, abs=1e-12)
    assert got[4].item() == 0.0
    got.sum().backward()
    assert torch.isfinite(q.grad).all()
    # a student mass that rounds to 1 (log q = 0, or a hair above) stays finite, with a finite gradient
    lq = torch.tensor([0.0, 1e-17], dtype=torch.float64, requires_grad=True)
    out = bernoulli_kl(torch.tensor([0.9, 0.9], dtype=torch.float64).log(), lq)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out > 3).all() and torch.isfinite(lq.grad).all()


def test_set_mass_kl_equals_a_per_token_loop():
    B, S, K, V = 2, 4, 5, 9
    logits, mask, extra, teacher = _rand_sets(B, S, K, V)
    full = torch.cat([logits, extra], -1)
    got = set_mass_kl(logits, mask, torch.logsumexp(full, -1), teacher)
    for b in range(B):
        for s in range(S):
            if not mask[b, s].any():
                assert got[b, s].item() == 0.0
                continue
            m_s = sum(math.exp(full[b, s, k] - torch.logsumexp(full[b, s], 0)) for k in range(K) if mask[b, s, k])
            m_t = sum(math.exp(teacher[b, s, k]) for k in range(K) if mask[b, s, k])
            want = m_t * math.log(m_t / m_s) + (1 - m_t) * math.log((1 - m_t) / (1 - m_s))
            assert got[b, s].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_released_state_values_equal_a_loop_over_the_whole_vocabulary():
    """softmax(logits) * mask / p + epsilon renormalised over |V| tokens, V = sum pi (Q_masked - log pi)."""
    B, S, K, V = 2, 3, 4, 7
    n_vocab, top_p, eps = 50, 0.8, 1e-3  # the loss weighs the vocabulary at 50 tokens (> the logits' 7)
    logits, mask, extra, _ = _rand_sets(B, S, K, V, seed=3)
    lse = torch.logsumexp(torch.cat([logits, extra], -1), -1)
    q = logits - logits.amax(-1, keepdim=True) - 0.5
    got = released_state_values(q, logits, mask, lse, top_p, eps, n_vocab)
    for b in range(B):
        for s in range(S):
            if not mask[b, s].any():
                assert got[b, s].item() == 0.0
                continue
            w = [math.exp(logits[b, s, k] - lse[b, s]) / top_p + eps if mask[b, s, k] else None for k in range(K)]
            qs = [float(q[b, s, k]) for k in range(K) if mask[b, s, k]]
            w_in = [x for x in w if x is not None]
            w_all = w_in + [eps] * (n_vocab - len(w_in))
            q_all = qs + [0.0] * (n_vocab - len(w_in))
            z = sum(w_all)
            want = sum(wi / z * (qi - math.log(wi / z)) for wi, qi in zip(w_all, q_all))
            assert got[b, s].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        released_state_values(q, logits, mask, lse, top_p, 0.0, n_vocab)


def _bd_batch(B=3, T=4, K=5, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits, mask, extra, teacher = _rand_sets(B, T + 1, K, V, seed)
    lengths = torch.tensor([4, 2, 3])
    terminated = torch.tensor([True, False, True])
    t_S = torch.arange(T + 1)[None]
    mask = mask & (t_S <= lengths[:, None])[..., None]
    mask[terminated, lengths[terminated]] = False  # nothing after EOS
    action_mask = torch.arange(T)[None] < lengths[:, None]
    slot = torch.randint(0, K, (B, T), generator=g)
    slot = torch.where(mask[:, :T].gather(-1, slot[..., None])[..., 0] & action_mask, slot, -1)
    lse = torch.logsumexp(torch.cat([logits, extra], -1), -1)
    return logits, mask, slot, action_mask, lengths, terminated, lse, teacher


def _loss(args, vocab_size=9, inputs=None, **options):
    """bellman_distill_loss of the math form at alpha 0.1 with the set shift, no LM term, and ``options``."""
    cfg = BellmanDistillConfig(**{"alpha": 0.1, "ce_coef": 0.0, **options})
    logits, mask, *steps = args
    return bellman_distill_loss(cfg, logits, mask, BDSteps(*steps), vocab_size=vocab_size, **(inputs or {}))


def test_mass_and_kd_terms_of_the_loss_equal_per_token_loops():
    logits, mask, slot, amask, lengths, term, lse, teacher = _bd_batch()
    T = slot.shape[1]
    args = (logits, mask, slot, amask, lengths, term)
    inputs = dict(vocab=VocabStats(lse_BS=lse), teacher_logprobs_BSK=teacher)
    base, _ = _loss(args, inputs=inputs)
    with_mass, stats = _loss(args, inputs=inputs, mass_coef=2.0)
    with_kd, _ = _loss(args, inputs=inputs, kd_coef=0.5)
    mass_terms, kd_terms = [], []
    for b in range(3):
        for t in range(T):
            if not amask[b, t]:
                continue
            m = mask[b, t]
            m_s = float(torch.exp(logits[b, t][m] - lse[b, t]).sum())
            m_t = float(torch.exp(teacher[b, t][m]).sum())
            mass_terms.append(m_t * math.log(m_t / m_s) + (1 - m_t) * math.log((1 - m_t) / (1 - m_s)))
            t_set = torch.exp(teacher[b, t][m]) / m_t
            s_lp = logits[b, t][m] - lse[b, t]
            kd_terms.append(float((t_set * (t_set.log() - s_lp)).sum()))
    mass = sum(mass_terms) / len(mass_terms)
    assert (with_mass - base).item() == pytest.approx(2.0 * mass, rel=1e-10)
    assert stats["loss/set_mass_kl"].item() == pytest.approx(mass, rel=1e-10)
    assert (with_kd - base).item() == pytest.approx(0.5 * sum(kd_terms) / len(kd_terms), rel=1e-10)


def test_mask_eos_is_the_batch_without_its_eos_steps_bootstrapped():
    """The release masks EOS as padding: the BD terms then see each terminated response one step shorter,
    truncated (bootstrapped), while the LM term still reads the EOS step."""
    logits, mask, slot, amask, lengths, term, lse, teacher = _bd_batch()
    released = dict(chi2_on="vocab", expert_term="vocab_mean")
    nll = torch.rand(slot.shape, dtype=torch.float64)
    got, _ = _loss((logits, mask, slot, amask, lengths, term), mask_eos=True, **released)
    eos_step = term[:, None] & (torch.arange(slot.shape[1])[None] == lengths[:, None] - 1)
    shorter = (logits, mask, torch.where(eos_step, -1, slot), amask & ~eos_step, lengths - term.long(), torch.zeros_like(term))
    want, _ = _loss(shorter, **released)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.item() != pytest.approx(_loss((logits, mask, slot, amask, lengths, term), **released)[0].item())
    with_ce, _ = _loss(
        (logits, mask, slot, amask, lengths, term), inputs=dict(vocab=VocabStats(nll_BT=nll)), mask_eos=True, ce_coef=1.0, **released
    )
    assert (with_ce - got).item() == pytest.approx((nll * amask).sum().item() / amask.sum().item(), rel=1e-10)


def test_vocab_stats_is_one_pass_equal_to_the_dense_computation():
    """Max, log-normaliser and NLL from the chunked pass equal the dense ones, values and gradients."""
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, policy.head.weight.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 64, (3, 4), generator=g)
    w_max, w_lse = (torch.rand(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    w_nll = torch.rand(3, 4, generator=g, dtype=torch.float64)

    def total(mx, lse, nll):
        return (w_max * mx).sum() + (w_lse * lse).sum() + (w_nll * nll).sum()

    st = policy.vocab_stats(h, actions, need_max=True, need_lse=True, chunk_tokens=4)
    (g_chunk,) = torch.autograd.grad(total(st.max_BS, st.lse_BS, st.nll_BT), h)
    dense = policy.dense_logits(h)
    nll = -torch.log_softmax(dense[:, :4], -1).gather(-1, actions[..., None])[..., 0]
    ref = (dense.amax(-1), torch.logsumexp(dense, -1), nll)
    (g_dense,) = torch.autograd.grad(total(*ref), h)
    for got, want in zip((st.max_BS, st.lse_BS, st.nll_BT), ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_chunk, g_dense, rtol=1e-10, atol=1e-12)
    only = policy.vocab_stats(h, need_lse=True)
    assert only.max_BS is None and only.nll_BT is None and only.lse_BS is not None


@pytest.mark.parametrize("name", ["iql_bd", "iql_bd_math", "iql_bd_released"])
def test_presets_train_a_step_with_finite_loss(name, synthetic_buffer):
    from tests.test_algorithms import _batch

    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("iql_bd", policy, algo_options(name), total_steps=10)
    stats = algo.update(_batch(synthetic_buffer, algo, n=8))
    assert math.isfinite(stats["loss/total"])
    cfg = algo.config
    if name == "iql_bd":
        assert cfg.q_shift == "set" and cfg.alpha == 1.0 and cfg.ce_coef > 0 and "loss/lm" in stats
    elif name == "iql_bd_math":
        assert cfg.q_shift == "vocab" and cfg.mass_coef == 0 and "loss/set_mass_kl" not in stats
    else:
        assert cfg.value == "released" and cfg.released_vocab_size == 151936 and cfg.mask_eos
        assert {"loss/kd", "loss/lm"} <= set(stats)


def test_kd_term_at_full_vocabulary_is_a_clear_error():
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    with pytest.raises(ValueError, match="kd_coef"):
        make_algorithm("iql_bd", policy, {**algo_options("iql_bd_released"), "top_p": 1.0}, total_steps=10)
