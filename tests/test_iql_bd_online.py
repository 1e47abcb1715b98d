"""Online Bellman Distill (``algo=iql_bd_online``): the loss against a per-token loop (both parameterisations, three
mixture weights), lmbda = 0 as offline BD exactly, the value head (trained, checkpointed, not part of the saved
student), its batches, its config checks, the trainer's refusal of accumulation, and a run resumed bit-identically."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from algorithms import make_algorithm
from algorithms.iql_bd import BDSteps, BellmanDistillConfig, bellman_distill_loss
from algorithms.iql_bd_online import OnlineBDConfig, OnlineBellmanDistill, online_bellman_distill_loss
from tests.conftest import assert_same_loss_and_grads, backward_and_grads, tiny_llama
from tests.test_run_smoke import _run as _run_subprocess
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.lm.policy import CausalLMPolicy, VocabStats
from tokenrl.run.checkpoint import list_checkpoints, load_checkpoint
from tokenrl.run.config import make_run_config
from tokenrl.run.trainer import run

GAMMA, ALPHA, Q_MIN, TOP_P, CE = 0.9, 0.3, -2.0, 0.5, 0.7
ROLLOUT_ROWS = (1, 4, 6)  # rows of the test batch that stand for the student's own rollouts


def _reference_loss(logits, mask, slot, amask, lengths, terminated, is_expert, nll, *, q_param, vmax, level, lmbda):
    """-J(Q) + CE, one transition at a time with Python lists: the expert term's mean over the teacher rows' in-set
    steps, and E_mix as ``((1 - lmbda) / n_teacher * sum over teacher rows + lmbda / n_rollout * sum over rollout
    rows)`` divided by the same weighting of the step counts."""
    B = logits.shape[0]

    def q_row(b, t):  # {candidate slot: Q}
        members = [k for k in range(logits.shape[2]) if mask[b, t, k]]
        if q_param == "free_level":
            lse = torch.logsumexp(torch.stack([logits[b, t, k] for k in members]), 0)
            return {k: logits[b, t, k] - lse + level[b, t] for k in members}
        top = vmax[b, t] if vmax is not None else max(logits[b, t, k] for k in members)
        return {k: torch.clamp(logits[b, t, k] - top, min=Q_MIN) for k in members}

    def v(b, t):
        if (t == int(lengths[b]) and bool(terminated[b])) or not mask[b, t].any():
            return torch.zeros((), dtype=logits.dtype)
        return level[b, t] if q_param == "free_level" else torch.logsumexp(torch.stack(list(q_row(b, t).values())), 0)

    n_teacher, n_rollout = int(is_expert.sum()), int((~is_expert).sum())
    expert_rewards, ce_terms = [], []
    mix = {"step": [], "step_w": [], "sq": [], "sq_w": []}  # weighted sums and weights of the two mixture means
    for b in range(B):
        w = (1 - lmbda) / n_teacher if is_expert[b] else lmbda / n_rollout
        for t in range(int(lengths[b])):
            v_next = v(b, t + 1)
            mix["step"].append(w * (v(b, t) - GAMMA * v_next))
            mix["step_w"].append(w)
            if is_expert[b]:
                ce_terms.append(nll[b, t])
            if slot[b, t] >= 0:
                r = q_row(b, t)[int(slot[b, t])] - GAMMA * v_next
                mix["sq"].append(w * r * r)
                mix["sq_w"].append(w)
                if is_expert[b]:
                    expert_rewards.append(r)

    def mean(xs):
        return torch.stack(xs).mean()

    value = torch.stack(mix["step"]).sum() / sum(mix["step_w"])
    sq = torch.stack(mix["sq"]).sum() / sum(mix["sq_w"])
    return -mean(expert_rewards) + value + sq / (4 * ALPHA) + CE * mean(ce_terms)


@pytest.fixture(scope="module")
def online_batch(synthetic_buffer):
    """Real sets, actions and lengths; three rows marked as rollouts; random float64 logits, a vocabulary max above
    the set's, value-head levels and full-vocabulary NLLs."""
    batch = synthetic_buffer.collate(list(range(8)), top_p=TOP_P)
    g = torch.Generator().manual_seed(0)
    B, S, K = batch.cand_ids_BSK.shape
    is_expert = torch.ones(B, dtype=torch.bool)
    is_expert[list(ROLLOUT_ROWS)] = False
    slot = batch.action_slot_BT.clone()
    slot[0, 0] = slot[4, 1] = -1  # a teacher action and a rollout action outside their sets
    logits = torch.randn(B, S, K, generator=g, dtype=torch.float64) * 3
    vmax = logits.amax(-1) + torch.rand(B, S, generator=g, dtype=torch.float64)
    level = torch.randn(B, S, generator=g, dtype=torch.float64)
    nll = torch.rand(B, S - 1, generator=g, dtype=torch.float64) * 4
    return batch, is_expert, slot, logits, vmax, level, nll


@pytest.mark.parametrize("lmbda", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("q_param, q_shift", [("logits", "set"), ("logits", "vocab"), ("free_level", "set")])
def test_loss_equals_a_per_token_loop(online_batch, q_param, q_shift, lmbda):
    batch, is_expert, slot, logits, vmax, level, nll = online_batch
    cfg = OnlineBDConfig(top_p=TOP_P, gamma=GAMMA, alpha=ALPHA, q_min=Q_MIN, q_param=q_param, q_shift=q_shift,
                         lmbda=lmbda, ce_coef=CE)
    free = q_param == "free_level"
    got_x = [logits.clone().requires_grad_(True), level.clone().requires_grad_(True)]
    want_x = [logits.clone().requires_grad_(True), level.clone().requires_grad_(True)]
    args = (batch.cand_mask_BSK, slot, batch.action_mask_BT, batch.lengths_B, batch.terminated_B, is_expert)
    got, stats = online_bellman_distill_loss(
        cfg, got_x[0], args[0], BDSteps(*args[1:5]), is_expert,
        vocab=VocabStats(max_BS=vmax if q_shift == "vocab" else None, nll_BT=nll), level_BS=got_x[1] if free else None,
    )
    want = _reference_loss(want_x[0], *args, nll, q_param=q_param, vmax=vmax if q_shift == "vocab" else None,
                           level=want_x[1], lmbda=lmbda)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    wrt = slice(0, 2 if free else 1)
    for g_got, g_want in zip(torch.autograd.grad(got, got_x[wrt]), torch.autograd.grad(want, want_x[wrt])):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert stats["top_p/rollout_outside_frac"].item() > 0 and stats["data/student_frac"].item() == 3 / 8


def test_the_mixture_reaches_the_policy_only_through_rollout_rows(online_batch):
    """At lmbda = 1 the rollout rows' value and chi^2 terms carry weight; at lmbda = 0 their logits get no gradient."""
    batch, is_expert, slot, logits, _, _, nll = online_batch
    grads = {}
    for lmbda in (0.0, 1.0):
        x = logits.clone().requires_grad_(True)
        cfg = OnlineBDConfig(top_p=TOP_P, gamma=GAMMA, alpha=ALPHA, q_min=Q_MIN, lmbda=lmbda, ce_coef=CE)
        steps = BDSteps(slot, batch.action_mask_BT, batch.lengths_B, batch.terminated_B)
        loss, _ = online_bellman_distill_loss(cfg, x, batch.cand_mask_BSK, steps, is_expert, vocab=VocabStats(nll_BT=nll))
        (grads[lmbda],) = torch.autograd.grad(loss, x)
    rollout = list(ROLLOUT_ROWS)
    assert grads[0.0][rollout].abs().max() == 0 and grads[1.0][rollout].abs().max() > 1e-3


@pytest.mark.parametrize("q_shift", ["set", "vocab"])
def test_lmbda_zero_is_offline_bd_exactly(synthetic_buffer, q_shift):
    """The algorithm at lmbda = 0 and iql_bd with the same options, same weights, same teacher batch: the same loss and
    gradients, and the same batch draws."""
    options = {"top_p": 0.8, "alpha": 0.3, "q_shift": q_shift, "ce_coef": 1.0, "sparse": False}
    results, draws = [], []
    for name, extra in (("iql_bd", {}), ("iql_bd_online", {"lmbda": 0.0})):
        policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
        algo = make_algorithm(name, policy, {**options, **extra}, total_steps=10)
        batch = algo.sampler.batch(synthetic_buffer, 8, torch.Generator().manual_seed(3), algo.top_p)
        draws.append(batch.actions_BT)
        results.append(backward_and_grads(algo.compute_loss(batch)[0], policy))
    assert not algo.needs_rollouts and torch.equal(*draws)
    assert_same_loss_and_grads(*results, loss_rtol=1e-12, grad_rtol=1e-10)

    # The pure functions too, on random logits with an expert action outside its set.
    batch = synthetic_buffer.collate(list(range(8)), top_p=TOP_P)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*batch.cand_ids_BSK.shape, generator=g, dtype=torch.float64) * 3
    vmax = logits.amax(-1) + 0.5 if q_shift == "vocab" else None
    nll = torch.rand(*batch.actions_BT.shape, generator=g, dtype=torch.float64)
    slot = batch.action_slot_BT.clone()
    slot[0, 0] = -1
    args = (logits, batch.cand_mask_BSK, BDSteps(slot, batch.action_mask_BT, batch.lengths_B, batch.terminated_B))
    shared = {"top_p": TOP_P, "gamma": GAMMA, "alpha": ALPHA, "q_min": Q_MIN, "q_shift": q_shift, "ce_coef": CE}
    vocab = VocabStats(max_BS=vmax, nll_BT=nll)
    offline, _ = bellman_distill_loss(BellmanDistillConfig(**shared), *args, vocab_size=64, vocab=vocab)
    online, _ = online_bellman_distill_loss(OnlineBDConfig(lmbda=0.0, **shared), *args, batch.is_expert_B, vocab=vocab)
    assert online.item() == pytest.approx(offline.item(), rel=1e-13, abs=1e-13)


def test_sparse_head_equals_dense_with_the_value_head(synthetic_buffer):
    results = []
    for sparse in (True, False):
        policy = CausalLMPolicy(tiny_llama(dtype=torch.float64), vocab_size=64)
        algo = make_algorithm("iql_bd_online", policy, {"sparse": sparse, "q_param": "free_level"}, total_steps=10)
        torch.nn.init.normal_(policy.value_head.weight, generator=torch.Generator().manual_seed(0))
        results.append(backward_and_grads(algo.compute_loss(_mixed_batch(synthetic_buffer, algo))[0], policy))
    assert_same_loss_and_grads(*results, loss_rtol=1e-10, grad_rtol=1e-9)


def _with_rollouts(buf: ReplayBuffer, n: int = 12) -> tuple[ReplayBuffer, list[int]]:
    """``buf``'s teacher data plus its first ``n`` trajectories again as learner rollouts, and their indices."""
    out = copy.deepcopy(buf)
    out.add([p.tolist() for p in buf.prompts[:n]], [r.tolist() for r in buf.responses[:n]], buf.terminated[:n],
            buf.truncated[:n], caches=buf.caches[:n], is_expert=False)
    return out, list(range(len(buf), len(buf) + n))


def _mixed_batch(buf: ReplayBuffer, algo: OnlineBellmanDistill, n: int = 8, seed: int = 0):
    """A batch as the algorithm draws it once the trainer has collected a rollout batch."""
    mixed, newest = _with_rollouts(buf)
    algo.after_rollout(newest)
    return algo.sampler.batch(mixed, n, torch.Generator().manual_seed(seed), algo.top_p)


@pytest.mark.parametrize("rollout_frac", [0.25, 0.5])
def test_batches_hold_the_newest_rollouts(synthetic_buffer, rollout_frac):
    algo = make_algorithm("iql_bd_online", CausalLMPolicy(tiny_llama(), vocab_size=64),
                          {"rollout_frac": rollout_frac}, total_steps=10)
    assert algo.needs_rollouts
    batch = _mixed_batch(synthetic_buffer, algo, n=16)
    assert int((~batch.is_expert_B).sum()) == round(rollout_frac * 16)
    _, stats = algo.compute_loss(batch)
    assert stats["data/student_frac"] == rollout_frac and stats["v/step_rollout"] != 0.0


def test_the_value_head_trains_saves_and_stays_out_of_the_student(synthetic_buffer):
    """The free level's head starts at 0, is optimised (and clipped) with the student, round-trips through
    state_dict (a fresh instance continues identically), and is a part of the policy, not of the LM."""
    options = {"q_param": "free_level", "lr": 3e-3, "warmup_steps": 1}
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("iql_bd_online", policy, options, total_steps=50)
    head = policy.value_head
    assert policy.add_value_head() is head and not head.weight.any() and not head.bias.any()
    assert not any("value_head" in k for k in policy.model.state_dict())
    batch = _mixed_batch(synthetic_buffer, algo)
    loss0 = algo.compute_loss(batch)[0].item()
    for _ in range(10):
        stats = algo.update(batch)
    assert head.weight.abs().sum() > 0 and algo.compute_loss(batch)[0].item() < loss0
    assert stats["v/head_mean"] != 0.0 and "value_head.weight" in algo.state_dict()["policy"]

    policy2 = CausalLMPolicy(tiny_llama(seed=1), vocab_size=64)
    algo2 = make_algorithm("iql_bd_online", policy2, options, total_steps=50)
    algo2.load_state_dict(copy.deepcopy(algo.state_dict()))
    torch.testing.assert_close(policy2.value_head.weight, head.weight, rtol=0, atol=0)
    s1, s2 = algo.update(batch), algo2.update(batch)
    assert s1["loss/total"] == s2["loss/total"]
    for a, b in zip(policy.parameters(), policy2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, key",
    [
        ({"rollout_frac": 1.0}, "algo.rollout_frac"),
        ({"lmbda": 1.5}, "algo.lmbda"),
        ({"q_param": "free"}, "algo.q_param"),
        ({"q_param": "free_level", "q_shift": "vocab"}, "algo.q_shift='vocab' with algo.q_param='free_level'"),
        ({"kd_coef": 1.0, "top_p": 1.0}, "algo.kd_coef=1.0 with algo.top_p=1.0"),
    ],
)
def test_config_names_its_problems(options, key):
    problems = OnlineBDConfig(**options).problems()
    assert len(problems) == 1 and key in problems[0]
    with pytest.raises(ValueError, match="invalid OnlineBDConfig"):
        make_algorithm("iql_bd_online", CausalLMPolicy(tiny_llama(), vocab_size=64), options)


def _config(data_dir, **top) -> dict:
    base = {
        "algo": {"name": "iql_bd_online", "q_param": "free_level", "lr": 1e-3}, "steps": 6, "checkpoint_every": 2,
        "rollout_every": 2, "rollout_prompts": 8, "sft_steps": 2, "batch_size": 4,
        "task": {"n_train_prompts": 16, "samples_per_prompt": 1, "n_val_prompts": 2, "n_test_prompts": 3,
                 "max_new_tokens": 6},
        "eval": {"seeds": [0]}, "teacher_eval": False, "progress": False, "data_dir": str(data_dir),
    }
    return {**base, **top}


def test_gradient_accumulation_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="RolloutMix.*micro_batch_size"):
        run(make_run_config(_config(tmp_path / "data", micro_batch_size=2)), str(tmp_path / "run"))
    assert not (tmp_path / "data").exists()


class Killed(RuntimeError):
    pass


def test_run_resumed_at_a_rollout_step_is_bit_identical(tmp_path, monkeypatch):
    """Rollouts are not checkpointed, and a resumed run collects at its first step: resumed at a multiple of
    ``rollout_every`` it collects what the uninterrupted run collected there (same student, same seed), and its
    batches read only the newest rollouts, so the run is bit-identical, the value head included. The saved student is
    the plain LM; the checkpoint holds the head."""
    data = tmp_path / "data"
    straight = run(make_run_config(_config(data)), str(tmp_path / "straight"))
    assert straight["rollouts"]["rollout/collections"] == 3
    calls = {"n": 0}
    original = OnlineBellmanDistill.compute_loss

    def compute_loss(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # the update after the checkpoint at step 4, a rollout step
            raise Killed("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(OnlineBellmanDistill, "compute_loss", compute_loss)
    with pytest.raises(Killed):
        run(make_run_config(_config(data)), str(tmp_path / "killed"))
    monkeypatch.setattr(OnlineBellmanDistill, "compute_loss", original)
    resumed = run(make_run_config(_config(data, resume=True)), str(tmp_path / "killed"))
    assert resumed["train"]["last_stats"] == straight["train"]["last_stats"]
    assert resumed["final_eval"] == straight["final_eval"]
    students = [load_file(os.path.join(tmp_path / d, "student.safetensors")) for d in ("straight", "killed")]
    assert students[0].keys() == students[1].keys() and not any("value_head" in k for k in students[0])
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    state = load_checkpoint(list_checkpoints(str(tmp_path / "killed"))[0][1])["algo"]["policy"]
    assert state["value_head.weight"].abs().sum() > 0


def test_experiments_run_smoke_with_the_free_level(tmp_path):
    """``experiments/run.py algo=iql_bd_online algo.q_param=free_level`` in a subprocess (the default options run in
    tests/test_run_smoke.py's multirun over every algorithm)."""
    proc, out = _run_subprocess(tmp_path, "algo=iql_bd_online", "algo.q_param=free_level", "sft_steps=2")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algo"] == "iql_bd_online" and metrics["rollouts"]["rollout/collections"] == 1
    assert "eval/onpolicy_kl" in metrics["final_eval"] and "v/head_mean" in metrics["train"]["last_stats"]
