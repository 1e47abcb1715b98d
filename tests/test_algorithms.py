"""One contract every registered algorithm passes, plus the BD loss against a per-token reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from algorithms import REGISTRY, make_algorithm, make_config
from algorithms.iql_bd import BDSteps, BellmanDistillConfig, bellman_distill_loss
from tests.conftest import assert_same_loss_and_grads, backward_and_grads, tiny_llama, with_lm_batch
from tokenrl.lm.policy import CausalLMPolicy, VocabStats
from tokenrl.lm.scoring import with_teacher_logprobs
from tokenrl.tasks.synthetic import SyntheticLanguage


def _batch(buf, algo, n=16, seed=0):
    """A batch as the trainer gives it: with the teacher over the whole vocabulary when the algorithm reads it, and
    a pre-training batch when it asks for one (``buf`` stands in for the corpus)."""
    batch = with_lm_batch(buf.sample(n, torch.Generator().manual_seed(seed), top_p=algo.top_p), algo, buf, seed)
    # SyntheticLanguage(): the language the synthetic_buffer fixture was sampled from.
    return with_teacher_logprobs(batch, SyntheticLanguage(), buf.pad_id) if algo.needs_teacher_logprobs else batch


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract(name, synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm(name, policy, {"lr": 3e-3, "warmup_steps": 1}, total_steps=50)
    batch = _batch(synthetic_buffer, algo)
    before = [p.detach().clone() for p in policy.parameters()]
    loss0 = algo.compute_loss(batch)[0].item()
    stats = {}
    for _ in range(25):
        stats = algo.update(batch)
    assert stats and all(math.isfinite(v) for v in stats.values()), stats
    assert "loss/total" in stats and "optim/lr" in stats
    assert all("/" in k for k in stats), "metric keys are namespaced"
    changed = sum(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed > 0
    loss1 = algo.compute_loss(batch)[0].item()
    assert loss1 < loss0, f"{name}: loss did not fall on a fixed batch ({loss0} -> {loss1})"

    # state_dict round trip: a fresh instance restored from it computes the same loss and continues identically
    policy2 = CausalLMPolicy(tiny_llama(seed=1), vocab_size=64)
    algo2 = make_algorithm(name, policy2, {"lr": 3e-3, "warmup_steps": 1}, total_steps=50)
    # deepcopy: as after torch.save/load (Optimizer.load_state_dict keeps references to same-device tensors)
    algo2.load_state_dict(copy.deepcopy(algo.state_dict()))
    assert algo2.step == algo.step
    assert algo2.compute_loss(batch)[0].item() == pytest.approx(algo.compute_loss(batch)[0].item(), abs=1e-6)
    s1, s2 = algo.update(batch), algo2.update(batch)
    assert s1["loss/total"] == pytest.approx(s2["loss/total"], abs=1e-6)
    for a, b in zip(policy.parameters(), policy2.parameters()):
        torch.testing.assert_close(a, b)


def test_algorithms_declare_rollouts_and_target_networks():
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    assert make_algorithm("soft_q", policy, {"reward": "sqil"}).needs_rollouts
    soft_q = make_algorithm("soft_q", policy, {"target_update_rate": 0.5})
    assert not soft_q.needs_rollouts and soft_q.uses_target_network
    assert soft_q.target.update_rate == 0.5 and "target" in soft_q.state_dict()
    for name in ("bc", "kd", "iql_bd"):
        algo = make_algorithm(name, policy)
        assert not algo.needs_rollouts and algo.target is None and "target" not in algo.state_dict()


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="valid options"):
        make_config("iql_bd", {"gama": 0.9})
    with pytest.raises(KeyError, match="registered"):
        make_config("nope")


def _reference_bd_loss(logits, mask, action_slot, action_mask, lengths, terminated, vmax, gamma, alpha, q_min):
    """Per-token loop of J(Q) = E[phi(Q(s,a) - g V(s'))] - E[V(s) - g V(s')] (math form, chi^2 on expert)."""
    B, S, K = logits.shape
    phis, values = [], []
    for b in range(B):
        L = int(lengths[b])

        def q_row(t):
            m = mask[b, t]
            row = logits[b, t]
            mx = vmax[b, t] if vmax is not None else max(row[k] for k in range(K) if m[k])
            return [max(row[k] - mx, torch.tensor(q_min, dtype=row.dtype)) if m[k] else None for k in range(K)]

        def v(t):
            if t == L and bool(terminated[b]):
                return torch.tensor(0.0, dtype=logits.dtype)
            q = q_row(t)
            return torch.logsumexp(torch.stack([x for x in q if x is not None]), 0)

        for t in range(L):
            vn = v(t + 1)
            values.append(v(t) - gamma * vn)
            if action_slot[b, t] >= 0:
                r = q_row(t)[int(action_slot[b, t])] - gamma * vn
                phis.append(r - r * r / (4 * alpha))
    return -(torch.stack(phis).mean() - torch.stack(values).mean())


def test_bd_loss_matches_per_token_loop(synthetic_buffer):
    torch.manual_seed(0)
    batch = synthetic_buffer.collate(list(range(8)), top_p=0.5)
    B, S, K = batch.cand_ids_BSK.shape
    logits = torch.randn(B, S, K, dtype=torch.float64) * 3
    # knock one expert action out of its set to exercise the exclusion
    idx = batch.action_slot_BT.clone()
    idx[0, 0] = -1
    vmax = logits.amax(-1) + torch.rand(B, S, dtype=torch.float64)  # a vocabulary max above the set's
    args = (logits, batch.cand_mask_BSK, idx, batch.action_mask_BT, batch.lengths_B, batch.terminated_B)
    cfg = BellmanDistillConfig(gamma=0.9, alpha=0.1, q_min=-2.0, q_shift="vocab", ce_coef=0.0)
    steps = BDSteps(*args[2:])
    loss, stats = bellman_distill_loss(cfg, logits, batch.cand_mask_BSK, steps, vocab_size=64, vocab=VocabStats(max_BS=vmax))
    ref = _reference_bd_loss(*args, vmax, gamma=0.9, alpha=0.1, q_min=-2.0)
    cfg.q_shift = "set"
    loss_set, _ = bellman_distill_loss(cfg, logits, batch.cand_mask_BSK, steps, vocab_size=64)
    ref_set = _reference_bd_loss(*args, None, gamma=0.9, alpha=0.1, q_min=-2.0)
    assert loss_set.item() == pytest.approx(ref_set.item(), rel=1e-10, abs=1e-10)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-10)
    assert stats["top_p/expert_outside_frac"].item() > 0


@pytest.mark.parametrize("name,extra", [
    ("iql_bd", {}),
    ("iql_bd", {"chi2_on": "expert_and_policy"}),
    ("iql_bd", {"chi2_on": "vocab", "expert_term": "vocab_mean"}),
    ("iql_bd", {"ce_coef": 0.5}),
    ("soft_q", {}),
    ("kd", {"student_norm": "top_p"}),
])
def test_sparse_head_equals_dense(name, extra, synthetic_buffer):
    """Gathering candidate rows of the output embedding gives the dense path's loss and gradients (float64)."""
    results = []
    for sparse in (True, False):
        policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
        cfg = dict(extra)
        if name != "kd":
            cfg["sparse"] = sparse
        algo = make_algorithm(name, policy, cfg, total_steps=10)
        batch = _batch(synthetic_buffer, algo, n=8)
        if name == "kd" and not sparse:
            # kd's dense reference: the same loss from dense logits gathered at the candidates
            algo.config.student_norm = "top_p"
            h = policy.state_hidden(batch)
            torch.testing.assert_close(
                policy.dense_logits(h).gather(-1, batch.cand_ids_BSK), policy.sparse_logits(h, batch.cand_ids_BSK)
            )
        results.append(backward_and_grads(algo.compute_loss(batch)[0], policy))
    assert_same_loss_and_grads(*results, loss_rtol=1e-10, grad_rtol=1e-9)


def test_top_p_one_means_full_vocabulary(synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("iql_bd", policy, {"top_p": 1.0}, total_steps=10)
    batch = _batch(synthetic_buffer, algo)
    cq = policy.candidate_q(batch, 1.0)
    assert cq.logits_BSK.shape[-1] == 64
    _, stats = algo.compute_loss(batch)
    assert stats["top_p/expert_outside_frac"] == 0.0
    valid = batch.state_mask_BS
    assert stats["top_p/set_size"] == pytest.approx(64.0)
    assert cq.mask_BSK[valid].all()


def test_bd_at_smaller_p_counts_outside_actions(synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("iql_bd", policy, {"top_p": 0.3}, total_steps=10)
    _, stats = algo.compute_loss(_batch(synthetic_buffer, algo, n=60))
    assert 0.0 < stats["top_p/expert_outside_frac"] < 1.0


def test_chunked_action_nll_equals_dense(synthetic_buffer):
    """The checkpointed, chunked NLL (flat memory at large V) equals bc_loss on dense logits, with gradients."""
    from algorithms.bc import bc_loss

    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    batch = synthetic_buffer.collate(list(range(6)))
    T = batch.actions_BT.shape[1]
    grads = []
    for chunked in (True, False):
        policy.zero_grad()
        h = policy.state_hidden(batch)[:, :T]
        if chunked:
            from tokenrl.core.distributions import masked_mean

            loss = masked_mean(policy.action_nll(h, batch.actions_BT, chunk_tokens=7), batch.action_mask_BT)
        else:
            loss = bc_loss(policy.dense_logits(h), batch.actions_BT, batch.action_mask_BT)
        grads.append(backward_and_grads(loss, policy))
    assert_same_loss_and_grads(*grads, loss_rtol=1e-12, grad_rtol=1e-10)


def test_gradient_checkpointing_keeps_loss_and_gradients(synthetic_buffer):
    """model.gradient_checkpointing stores less for the backward pass (the decoder blocks' activations are
    recomputed) and leaves the iql_bd loss (sparse head + chunked CE term) and every gradient unchanged."""
    from tokenrl.lm.models import make_student

    sizes = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0,
    }
    results, saved = [], []
    for checkpointing in (False, True):
        student, _ = make_student(
            "fresh", config_overrides=sizes, dtype=torch.float64, seed=3, gradient_checkpointing=checkpointing
        )
        policy = CausalLMPolicy(student, vocab_size=64)
        algo = make_algorithm("iql_bd", policy, {"ce_coef": 1.0}, total_steps=10)
        batch = _batch(synthetic_buffer, algo, n=8)
        saved_bytes = []
        # Sees what autograd keeps for the backward pass outside checkpointed regions (a checkpoint keeps its inputs).
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved_bytes.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            loss, _ = algo.compute_loss(batch)
        results.append(backward_and_grads(loss, policy))
        saved.append(sum(saved_bytes))
    assert saved[1] < 0.7 * saved[0]
    assert_same_loss_and_grads(*results, loss_rtol=1e-12, grad_rtol=1e-10)


def test_sparse_logits_dense_fallback_equals_gather(synthetic_buffer, monkeypatch):
    """Above SPARSE_GATHER_ELEMENTS the sparse head gathers dense logits instead of weight rows: same iql_bd
    loss and gradients (float64)."""
    import tokenrl.lm.policy

    results = []
    for limit in (1 << 40, 0):  # never / always fall back to the dense logits (K * D > V here)
        monkeypatch.setattr(tokenrl.lm.policy, "SPARSE_GATHER_ELEMENTS", limit)
        policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
        algo = make_algorithm("iql_bd", policy, {"ce_coef": 1.0}, total_steps=10)
        batch = _batch(synthetic_buffer, algo, n=8)
        assert batch.cand_ids_BSK.shape[-1] * 32 > 64  # the fallback condition holds at limit 0
        results.append(backward_and_grads(algo.compute_loss(batch)[0], policy))
    assert_same_loss_and_grads(*results, loss_rtol=1e-12, grad_rtol=1e-10)
