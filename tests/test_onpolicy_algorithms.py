"""GKD and MiniLLM on real batches: sparse head = dense path, importance weights per row kind, top_p = 1."""

from __future__ import annotations

import copy

import pytest
import torch

from algorithms import make_algorithm
from algorithms.gkd import top_p_generalized_jsd_loss
from tests.conftest import assert_same_loss_and_grads, backward_and_grads, tiny_llama
from tokenrl.buffer import ReplayBuffer
from tokenrl.policy import CausalLMPolicy


def _as_rollouts(buf: ReplayBuffer, n: int = 12) -> ReplayBuffer:
    """The first ``n`` trajectories of ``buf`` stored again as learner rollouts (``is_expert=False``)."""
    out = ReplayBuffer(pad_id=buf.pad_id, cache_top_p=buf.cache_top_p)
    out.add(
        [p.tolist() for p in buf.prompts[:n]], [r.tolist() for r in buf.responses[:n]], buf.terminated[:n],
        buf.truncated[:n], caches=buf.caches[:n], is_expert=False,
    )
    return out


@pytest.mark.parametrize("name", ["gkd", "minillm"])
def test_sparse_head_equals_dense(name, synthetic_buffer):
    results = []
    for sparse in (True, False):
        policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
        algo = make_algorithm(name, policy, {"sparse": sparse}, total_steps=10)
        batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p)
        results.append(backward_and_grads(algo.compute_loss(batch)[0], policy))
    assert_same_loss_and_grads(*results, loss_rtol=1e-10, grad_rtol=1e-9)


def test_gkd_loss_is_the_set_jsd_of_the_student(synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("gkd", policy, {"beta": 0.3, "temperature": 0.9}, total_steps=10)
    batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(1), top_p=algo.top_p)
    T = batch.actions_BT.shape[1]
    logits = policy(batch)[:, :T].gather(-1, batch.cand_ids_BSK[:, :T])
    want = top_p_generalized_jsd_loss(
        logits, batch.cand_logprobs_BSK[:, :T], batch.cand_mask_BSK[:, :T], batch.action_mask_BT, 0.3, 0.9
    )
    loss, stats = algo.compute_loss(batch)
    torch.testing.assert_close(loss, want)
    assert stats["data/student_frac"] == 0.0


def test_minillm_importance_weights_by_row_kind(synthetic_buffer):
    """Own rollouts right after sync_behaviour: rho = 1; teacher data: rho = pi_theta / pi_teacher."""
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("minillm", policy, {"mix": 0.0}, total_steps=10)
    rollouts = _as_rollouts(synthetic_buffer)
    batch = rollouts.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p)
    for _ in range(3):  # move the student away from its snapshot, then snapshot again
        algo.update(batch)
    assert algo.compute_loss(batch)[1]["is/rho_mean"] != pytest.approx(1.0, abs=1e-9)
    algo.sync_behaviour()
    _, stats = algo.compute_loss(batch)
    assert stats["is/rho_mean"] == pytest.approx(1.0, abs=1e-12) and stats["is/clip_frac"] == 0.0
    assert stats["data/student_frac"] == 1.0

    mixed = copy.deepcopy(algo)
    mixed.config.mix = 0.5
    assert mixed.compute_loss(batch)[1]["is/rho_mean"] != pytest.approx(1.0, abs=1e-6)

    expert = synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p)
    _, stats = algo.compute_loss(expert)
    assert stats["is/clip_frac"] > 0.0  # pi_theta / pi_teacher of an untrained student is far from 1


@pytest.mark.parametrize("name", ["gkd", "minillm"])
def test_top_p_one_uses_the_whole_cache(name, synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm(name, policy, {"top_p": 1.0}, total_steps=10)
    batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=algo.top_p)
    small = synthetic_buffer.sample(8, torch.Generator().manual_seed(0), top_p=0.5)
    assert batch.cand_mask_BSK.sum() > small.cand_mask_BSK.sum()
    loss, stats = algo.compute_loss(batch)
    assert torch.isfinite(loss)
    if name == "gkd":
        assert stats["top_p/set_size"] > 1.0
