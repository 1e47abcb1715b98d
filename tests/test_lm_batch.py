"""The LM terms on a pre-training batch (MiniLLM's PT loss, Bellman Distill's lm_batch) and the matched-information
arms (bd_kd, kd_pbc): each new term against a per-token loop, which presets ask for a pre-training batch, and
training runs that draw it reproducibly."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from algorithms import make_algorithm
from algorithms.kd import lm_batch_loss, projected_bc_loss
from algorithms.minillm import pt_loss
from tests.conftest import algo_options, make_preset, tiny_llama, with_lm_batch
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.config import make_run_config
from tokenrl.run.trainer import run


def _policy(seed: int = 0) -> CausalLMPolicy:
    return CausalLMPolicy(tiny_llama(dtype=torch.float64, seed=seed), vocab_size=64)


def _loop_terms(logits_BTV, batch, outside=()):
    """Per token: ``-log softmax(logits)[a]``, KL(teacher renormalised on its set || student over V) and the NLL of
    ``a`` under the student renormalised on the set (left out where ``a`` is not in the set, or ``(b, t)`` is in
    ``outside``); returns the three means and the number of steps left out of the last."""
    nll, kl, proj = [], [], []
    for b in range(batch.actions_BT.shape[0]):
        for t in range(int(batch.lengths_B[b])):
            logp_V = torch.log_softmax(logits_BTV[b, t], -1)
            a = int(batch.actions_BT[b, t])
            nll.append(-logp_V[a])
            members = [k for k in range(batch.cand_mask_BSK.shape[-1]) if batch.cand_mask_BSK[b, t, k]]
            ids = [int(batch.cand_ids_BSK[b, t, k]) for k in members]
            t_lp = torch.stack([batch.cand_logprobs_BSK[b, t, k].double() for k in members])
            p = torch.softmax(t_lp, 0)
            kl.append(sum(p[j] * (torch.log(p[j]) - logp_V[i]) for j, i in enumerate(ids)))
            if a in ids and (b, t) not in outside:
                proj.append(-(logits_BTV[b, t, a] - torch.logsumexp(logits_BTV[b, t, ids], 0)))
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    return mean(nll), mean(kl), mean(proj), len(nll) - len(proj)


def test_lm_batch_loss_and_projected_bc_equal_a_per_token_loop(synthetic_buffer):
    batch = synthetic_buffer.collate(list(range(10)), top_p=0.5)
    policy = _policy()
    T = batch.actions_BT.shape[1]
    logits_BTV = policy(batch)[:, :T]
    nll, kl, proj, n_outside = _loop_terms(logits_BTV, batch)
    assert n_outside > 0  # sampled at p = 0.8: at p = 0.5 some data tokens lie outside their set
    loss, stats = lm_batch_loss(policy, batch, ce_coef=0.3, kd_coef=0.7)
    torch.testing.assert_close(stats["loss/lm"], nll, rtol=1e-12, atol=1e-12)
    # kd_loss renormalises the teacher's cached log-probs in float32
    torch.testing.assert_close(stats["loss/kd"], kl, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(loss, 0.3 * nll + 0.7 * kl, rtol=1e-7, atol=1e-12)
    assert set(lm_batch_loss(policy, batch, 1.0, 0.0)[1]) == {"loss/lm"}
    cand_BTK = logits_BTV.gather(-1, batch.cand_ids_BSK[:, :T])
    mask_BTK = batch.cand_mask_BSK[:, :T]
    torch.testing.assert_close(projected_bc_loss(cand_BTK, mask_BTK, batch.action_slot_BT), proj, rtol=1e-12, atol=1e-12)
    slots = batch.action_slot_BT.clone()
    slots[0, 0] = -1  # marked outside: left out of the mean
    _, _, proj_without, _ = _loop_terms(logits_BTV, batch, outside={(0, 0)})
    torch.testing.assert_close(projected_bc_loss(cand_BTK, mask_BTK, slots), proj_without, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ce_coef > 0 or kd_coef > 0"):
        lm_batch_loss(policy, batch, 0.0, 0.0)


def test_minillm_pt_loss_is_the_sequence_nll_of_the_corpus_batch(synthetic_buffer):
    policy = _policy()
    algo = make_algorithm("minillm", policy, {"top_p": 0.8, "pt_coef": 0.4}, total_steps=10)
    batch = with_lm_batch(synthetic_buffer.sample(6, torch.Generator().manual_seed(0), top_p=0.8), algo,
                          synthetic_buffer, seed=1)
    lm = batch.lm_batch
    logits_BTV = policy(lm)[:, : lm.actions_BT.shape[1]].detach()
    per_row = [
        -sum(torch.log_softmax(logits_BTV[b, t], -1)[int(lm.actions_BT[b, t])] for t in range(int(lm.lengths_B[b])))
        for b in range(6)
    ]
    want = sum(per_row) / 6
    nll_BT = -torch.log_softmax(logits_BTV, -1).gather(-1, lm.actions_BT[..., None])[..., 0]
    torch.testing.assert_close(pt_loss(nll_BT, lm.action_mask_BT), want, rtol=1e-12, atol=1e-12)
    loss, stats = algo.compute_loss(batch)
    without, _ = make_algorithm("minillm", policy, {"top_p": 0.8, "pt_coef": 0.0}).compute_loss(batch)
    assert stats["loss/pt"] == pytest.approx(float(want), rel=1e-10)
    assert loss.item() == pytest.approx(without.item() + 0.4 * float(want), rel=1e-10)


@pytest.mark.parametrize("name", ["iql_bd_math", "iql_bd_released"])
def test_bd_lm_term_on_the_corpus_batch(name, synthetic_buffer):
    """lm_batch=corpus: the BD terms on the distillation batch plus the LM term on the corpus batch; the CE of
    lm_batch=expert is on the distillation batch and ignores an attached corpus batch."""
    policy = _policy()
    algo = make_preset(name, policy, {}, total_steps=10)
    assert algo.config.lm_batch == "corpus" and algo.needs_lm_batch
    batch = with_lm_batch(synthetic_buffer.sample(8, torch.Generator().manual_seed(2), top_p=0.8), algo,
                          synthetic_buffer, seed=3)
    loss, stats = algo.compute_loss(batch)
    cfg = algo.config
    bd_only = make_preset(name, policy, {"ce_coef": 0.0, "kd_coef": 0.0}).compute_loss(batch)[0]
    lm = batch.lm_batch
    nll, kl, _, _ = _loop_terms(policy(lm)[:, : lm.actions_BT.shape[1]], lm)
    assert loss.item() == pytest.approx(bd_only.item() + cfg.ce_coef * nll.item() + cfg.kd_coef * kl.item(), rel=1e-7)
    assert stats["loss/lm"] == pytest.approx(nll.item(), rel=1e-10)
    expert = make_preset(name, policy, {"lm_batch": "expert"})
    assert not expert.needs_lm_batch
    plain = dataclasses.replace(batch, lm_batch=None)
    assert expert.compute_loss(batch)[0].item() == expert.compute_loss(plain)[0].item()
    with pytest.raises(ValueError, match="asks for a pre-training batch"):
        algo.compute_loss(plain)
    with pytest.raises(ValueError, match=r"algo.lm_batch='openwebtext': must be one of"):
        make_preset(name, policy, {"lm_batch": "openwebtext"})


def test_kd_pbc_and_bd_kd_are_kd_plus_the_matched_terms(synthetic_buffer):
    policy = _policy()
    batch = synthetic_buffer.sample(8, torch.Generator().manual_seed(4), top_p=0.8)
    T = batch.actions_BT.shape[1]
    logits_BTV = policy(batch)[:, :T]
    _, kl, proj, _ = _loop_terms(logits_BTV, batch)
    loss, stats = make_preset("kd_pbc", policy).compute_loss(batch)
    assert stats["loss/kl"] == pytest.approx(kl.item(), rel=1e-7)
    assert stats["loss/pbc"] == pytest.approx(proj.item(), rel=1e-10)
    assert loss.item() == pytest.approx(kl.item() + proj.item(), rel=1e-7)
    for norm in ("vocab", "top_p"):  # the projected BC term does not depend on how KD normalises the student
        assert make_preset("kd_pbc", policy, {"student_norm": norm}).compute_loss(batch)[1]["loss/pbc"] == stats["loss/pbc"]
    bd_kd = make_preset("bd_kd", policy)
    assert (bd_kd.config.ce_coef, bd_kd.config.kd_coef, bd_kd.config.lm_batch) == (0.0, 1.0, "expert")
    loss, stats = bd_kd.compute_loss(batch)
    bd_only = make_algorithm("iql_bd", policy, {"ce_coef": 0.0}).compute_loss(batch)[0]
    assert stats["loss/kd"] == pytest.approx(kl.item(), rel=1e-7) and "loss/lm" not in stats
    assert loss.item() == pytest.approx(bd_only.item() + kl.item(), rel=1e-7)


def test_which_presets_ask_for_a_pre_training_batch():
    policy = _policy()
    asks = {name: make_preset(name, policy).needs_lm_batch for name in (
        "bc", "kd", "kd_pbc", "iql_bd", "bd_kd", "iql_bd_math", "iql_bd_released", "soft_q", "gkd", "minillm")}
    assert {name for name, yes in asks.items() if yes} == {"iql_bd_math", "iql_bd_released", "minillm"}
    assert not make_algorithm("minillm", policy, {"pt_coef": 0.0}).needs_lm_batch
    assert not make_preset("iql_bd_math", policy, {"ce_coef": 0.0}).needs_lm_batch  # no LM term at all
    with pytest.raises(ValueError, match="algo.pt_coef=-1.0: must be >= 0"):
        make_algorithm("minillm", policy, {"pt_coef": -1.0})


RUN = {
    "steps": 4, "sft_steps": 2, "batch_size": 4, "eval": {"seeds": [0]}, "teacher_eval": False, "init_eval": False,
    "progress": False, "checkpoint_seconds": 0,
    "task": {"n_train_prompts": 16, "samples_per_prompt": 1, "n_val_prompts": 2, "n_test_prompts": 3,
             "max_new_tokens": 6, "corpus_sequences": 24, "corpus_max_tokens": 8},
}


def test_runs_that_ask_for_the_corpus_get_it_reproducibly(tmp_path):
    def train(label, algo):
        metrics = run(make_run_config({**RUN, "data_dir": str(tmp_path / "data"), "algo": algo}), str(tmp_path / label))
        return metrics, load_file(os.path.join(tmp_path, label, "student.safetensors"))

    first, student = train("a", algo_options("iql_bd_math"))
    again, student_again = train("b", algo_options("iql_bd_math"))
    assert not first["corpus"]["corpus/cached"] and again["corpus"]["corpus/cached"]
    assert first["corpus"]["corpus/rows"] == 24 and math.isfinite(first["train"]["last_stats"]["loss/lm"])
    assert first["train"]["last_stats"] == again["train"]["last_stats"]
    assert all(torch.equal(student[k], student_again[k]) for k in student)
    expert, student_expert = train("c", {**algo_options("iql_bd_math"), "lm_batch": "expert"})
    assert "corpus" not in expert and not all(torch.equal(student[k], student_expert[k]) for k in student)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["train"]["corpus_s"] > 0
