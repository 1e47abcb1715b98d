"""GKD and MiniLLM on real batches: the full-vocabulary path against per-token references, sparse head = dense
path, importance weights per row kind, why the top-p losses alone let the student drift, and online SQIL's
absorbing state after EOS."""

from __future__ import annotations

import copy

import pytest
import torch

from algorithms import make_algorithm
from algorithms.gkd import generalized_jsd_loss, top_p_generalized_jsd_loss
from algorithms.soft_q import soft_td_terms
from tests.conftest import assert_same_loss_and_grads, backward_and_grads, tiny_llama, with_lm_batch
from tests.reference import teacher_logprobs_loop
from tests.test_gkd import _loop_jsd
from tokenrl.data.buffer import Batch, ReplayBuffer
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.lm.scoring import with_teacher_logprobs
from tokenrl.tasks.synthetic import SyntheticLanguage

TEACHER = SyntheticLanguage()  # the language the synthetic_buffer fixture was sampled from


def _sample(buf: ReplayBuffer, algo, n: int = 8, seed: int = 0) -> Batch:
    """A batch as the trainer gives it to ``algo``: with the teacher's log-probs when the algorithm reads them, and a
    pre-training batch when it asks for one (``buf`` stands in for the corpus)."""
    batch = with_lm_batch(buf.sample(n, torch.Generator().manual_seed(seed), top_p=algo.top_p), algo, buf, seed)
    return with_teacher_logprobs(batch, TEACHER, buf.pad_id) if algo.needs_teacher_logprobs else batch


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
        algo = make_algorithm(name, policy, {"sparse": sparse, "top_p": 0.8}, total_steps=10)
        results.append(backward_and_grads(algo.compute_loss(_sample(synthetic_buffer, algo))[0], policy))
    assert_same_loss_and_grads(*results, loss_rtol=1e-10, grad_rtol=1e-9)


def test_gkd_loss_is_the_set_jsd_of_the_student(synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("gkd", policy, {"beta": 0.3, "temperature": 0.9, "top_p": 0.8}, total_steps=10)
    batch = _sample(synthetic_buffer, algo, seed=1)
    T = batch.actions_BT.shape[1]
    logits = policy(batch)[:, :T].gather(-1, batch.cand_ids_BSK[:, :T])
    want = top_p_generalized_jsd_loss(
        logits, batch.cand_logprobs_BSK[:, :T], batch.cand_mask_BSK[:, :T], batch.action_mask_BT, 0.3, 0.9
    )
    loss, stats = algo.compute_loss(batch)
    torch.testing.assert_close(loss, want)
    assert stats["data/student_frac"] == 0.0


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_minillm_importance_weights_by_row_kind(synthetic_buffer, top_p):
    """Own rollouts right after sync_behaviour: rho = 1; teacher data: rho = pi_theta / pi_teacher."""
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("minillm", policy, {"mix": 0.0, "top_p": top_p}, total_steps=10)
    rollouts = _as_rollouts(synthetic_buffer)
    batch = _sample(rollouts, algo)
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

    expert = _sample(synthetic_buffer, algo)
    _, stats = algo.compute_loss(expert)
    assert stats["is/clip_frac"] > 0.0  # pi_theta / pi_teacher of an untrained student is far from 1


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_full_vocabulary_loss_equals_a_per_token_loop(synthetic_buffer, beta):
    """top_p = 1 (the default): the JSD over all V tokens against the exact teacher, state by state."""
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("gkd", policy, {"beta": beta, "temperature": 0.8}, total_steps=10)
    assert algo.needs_teacher_logprobs
    batch = _sample(synthetic_buffer, algo, seed=2)
    T = batch.actions_BT.shape[1]
    teacher_BSV = teacher_logprobs_loop(TEACHER, batch)
    torch.testing.assert_close(batch.teacher_logprobs_BSV, teacher_BSV)
    want = _loop_jsd(policy(batch)[:, :T].detach(), teacher_BSV[:, :T], beta, 0.8, batch.action_mask_BT)
    loss, stats = algo.compute_loss(batch)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert "top_p/set_size" not in stats


def test_minillm_full_vocabulary_terms_equal_a_per_token_loop(synthetic_buffer):
    """top_p = 1: rewards log pi*(y_t) - log pi_theta(y_t) and the single-step KL over all V tokens."""
    policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
    algo = make_algorithm("minillm", policy, {}, total_steps=10)
    batch = _sample(_as_rollouts(synthetic_buffer), algo)
    T = batch.actions_BT.shape[1]
    student_BTV = torch.log_softmax(policy(batch)[:, :T].detach(), -1)
    teacher_BTV = teacher_logprobs_loop(TEACHER, batch)[:, :T].double()
    rewards, kls = [], []
    for b in range(batch.actions_BT.shape[0]):
        for t in range(int(batch.lengths_B[b])):
            a = int(batch.actions_BT[b, t])
            rewards.append(float(teacher_BTV[b, t, a] - student_BTV[b, t, a]))
            q = student_BTV[b, t].exp()
            kls.append(float((q * (student_BTV[b, t] - teacher_BTV[b, t])).sum()))
    _, stats = algo.compute_loss(batch)
    assert stats["reward/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)
    assert stats["kl/token_mean"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert stats["top_p/action_outside_frac"] == 0.0  # every token of the vocabulary is an action


@pytest.mark.parametrize("name", ["gkd", "minillm"])
def test_full_vocabulary_needs_the_teacher_in_the_batch(name, synthetic_buffer):
    algo = make_algorithm(name, CausalLMPolicy(tiny_llama(), vocab_size=64), {}, total_steps=10)
    with pytest.raises(ValueError, match="with_teacher_logprobs"):
        algo.compute_loss(synthetic_buffer.sample(4, torch.Generator().manual_seed(0), top_p=algo.top_p))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_p_loss_ignores_the_mass_outside_the_set_and_the_full_loss_does_not(beta):
    """Why top_p < 1 alone lets the student drift: raising the student's logits outside the teacher's set
    (more mass off the set) leaves the set loss unchanged; the full-vocabulary loss rises."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 4, 10
    student_BTV = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher_BTV = torch.log_softmax(3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ids_BTK = teacher_BTV.argsort(-1, descending=True)[..., :3]
    in_set_BTV = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids_BTK, True)
    mask_BTK = torch.ones(B, T, 3, dtype=torch.bool)
    state_mask_BT = torch.ones(B, T, dtype=torch.bool)
    drifted_BTV = student_BTV + 2.0 * ~in_set_BTV

    def set_loss(s_BTV):
        return top_p_generalized_jsd_loss(
            s_BTV.gather(-1, ids_BTK), teacher_BTV.gather(-1, ids_BTK), mask_BTK, state_mask_BT, beta
        )

    torch.testing.assert_close(set_loss(drifted_BTV), set_loss(student_BTV))
    assert generalized_jsd_loss(drifted_BTV, teacher_BTV, beta) > generalized_jsd_loss(student_BTV, teacher_BTV, beta)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sqil_eos_leads_to_an_absorbing_state_that_keeps_its_reward(synthetic_buffer, top_p):
    """SQIL's TD targets, by a per-transition loop: r + gamma * V(s'), and r / (1 - gamma) after EOS."""
    gamma = 0.9
    algo = make_algorithm(
        "soft_q", CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64),
        {"reward": "sqil", "gamma": gamma, "top_p": top_p}, total_steps=10,
    )
    rows = list(range(6)) + [60 + i for i in range(6)]  # six teacher rows, their copies as rollouts
    buf = ReplayBuffer(pad_id=0, cache_top_p=synthetic_buffer.cache_top_p)
    buf.extend(synthetic_buffer)
    buf.extend(_as_rollouts(synthetic_buffer, 6))
    batch = buf.collate(rows, top_p=top_p)
    assert batch.terminated_B.any() and not batch.terminated_B.all()
    td = soft_td_terms(algo.policy, algo.target, batch, top_p, sparse=True)
    errors = []
    for b in range(len(rows)):
        reward = 1.0 if batch.is_expert_B[b] else 0.0
        length = int(batch.lengths_B[b])
        for t in range(length):
            if not td.cq.action_in_set_BT[b, t]:
                continue
            if t == length - 1 and batch.terminated_B[b]:
                target = reward + gamma * reward / (1 - gamma)
            else:
                target = reward + gamma * float(td.v_BS[b, t + 1])
            errors.append((td.q_sa_BT[b, t].item() - target) ** 2)
    loss, _ = algo.compute_loss(batch)
    assert loss.item() == pytest.approx(sum(errors) / len(errors), rel=1e-9)
    with pytest.raises(ValueError, match="gamma < 1"):
        make_algorithm("soft_q", algo.policy, {"reward": "sqil", "gamma": 1.0})
