"""The on-policy hooks (rollout policy, behaviour sync, batch mix) and the trainer's timed rollout collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms import make_algorithm
from tests.conftest import tiny_llama
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.data.samplers import BatchSampler, RolloutMix
from tokenrl.run.config import make_run_config
from tokenrl.evaluation.metrics import evaluate
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.rollouts import StageClock, collect_rollouts, once_per_state
from tokenrl.core.top_p import top_p_mask
from tokenrl.evaluation.student import evaluate_student
from tokenrl.run.inputs import build_task
from tokenrl.run.trainer import run

V = 8


def _fns(seed: int = 0):
    """Fixed random student and teacher logits functions of the state (they ignore it) and their tensors."""
    g = torch.Generator().manual_seed(seed)
    s_BV, t_BV = torch.randn(3, V, generator=g), torch.randn(3, V, generator=g) * 3
    return (lambda *_: s_BV.clone()), (lambda *_: t_BV.clone()), s_BV, t_BV


def _policy():
    return CausalLMPolicy(tiny_llama(vocab_size=V), vocab_size=V)


def _probs_inside_teacher_set(logits_BV: torch.Tensor, teacher_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Slow reference: softmax over the teacher's top-p set, by a loop over rows."""
    out = torch.zeros_like(logits_BV)
    for b in range(logits_BV.shape[0]):
        keep = top_p_mask(teacher_BV[b], p)
        out[b, keep] = torch.softmax(logits_BV[b, keep], -1)
    return out


def test_once_per_state_calls_once_per_distinct_state():
    calls = []

    def fn(tokens_BL, lengths_B):
        calls.append(1)
        return tokens_BL.float().sum(-1, keepdim=True)

    cached = once_per_state(fn)
    tokens, lengths = torch.tensor([[1, 2, 0]]), torch.tensor([2])
    a = cached(tokens, lengths)
    b = cached(tokens.clone(), lengths.clone())
    assert len(calls) == 1 and torch.equal(a, b)
    tokens[0, 2] = 5  # the env writes the next token in place: a new state
    c = cached(tokens, torch.tensor([3]))
    assert len(calls) == 2 and c.item() == 8.0


@pytest.mark.parametrize("name", ["gkd", "minillm", "soft_q"])
def test_rollout_policy_at_top_p_one_is_unrestricted(name):
    s_fn, t_fn, s_BV, t_BV = _fns()
    algo = make_algorithm(name, _policy(), {"top_p": 1.0}, total_steps=4)
    logits_BV = algo.rollout_policy(s_fn, t_fn)(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, dtype=torch.long))
    probs = torch.softmax(logits_BV, -1)
    if name == "minillm":
        mix = algo.config.mix
        want = mix * torch.softmax(t_BV, -1) + (1 - mix) * torch.softmax(s_BV, -1)
    else:
        want = torch.softmax(s_BV, -1)
    torch.testing.assert_close(probs, want)


@pytest.mark.parametrize("name", ["gkd", "minillm", "soft_q"])
def test_rollout_policy_samples_inside_the_teacher_set(name):
    s_fn, t_fn, s_BV, t_BV = _fns(1)
    p = 0.6
    algo = make_algorithm(name, _policy(), {"top_p": p, **({"temperature": 0.7} if name == "gkd" else {})})
    probs = torch.softmax(algo.rollout_policy(s_fn, t_fn)(torch.zeros(3, 2, dtype=torch.long), torch.ones(3)), -1)
    outside = ~top_p_mask(t_BV, p)
    assert (outside.sum(-1) > 0).all(), "the test needs tokens outside the set"
    assert (probs[outside] == 0).all()
    if name == "minillm":
        mix = algo.config.mix
        want = mix * _probs_inside_teacher_set(t_BV, t_BV, p) + (1 - mix) * _probs_inside_teacher_set(s_BV, t_BV, p)
    elif name == "gkd":
        want = _probs_inside_teacher_set(s_BV / 0.7, t_BV, p)
    else:
        want = _probs_inside_teacher_set(s_BV, t_BV, p)
    torch.testing.assert_close(probs, want)


def test_minillm_before_rollout_syncs_the_behaviour_policy(synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("minillm", policy, {"top_p": 0.8, "pt_coef": 0.0}, total_steps=4)  # no corpus batch here
    algo.after_rollout(range(len(synthetic_buffer)))  # any rows will do as "rollouts" for one update
    algo.update(algo.sampler.batch(synthetic_buffer, 4, torch.Generator().manual_seed(0), algo.top_p))
    differs = lambda: any(  # noqa: E731
        not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), algo.behaviour.state_dict().values())
    )
    assert differs()
    algo.before_rollout()
    assert not differs()


def _mixed_buffer(synthetic_buffer, n_expert: int = 20, n_rollout: int = 6) -> ReplayBuffer:
    buf = ReplayBuffer(pad_id=0, cache_top_p=synthetic_buffer.cache_top_p)
    for lo, hi, expert in ((0, n_expert, True), (n_expert, n_expert + n_rollout, False)):
        src = synthetic_buffer
        buf.add(
            [p.tolist() for p in src.prompts[lo:hi]], [r.tolist() for r in src.responses[lo:hi]],
            src.terminated[lo:hi], src.truncated[lo:hi], caches=src.caches[lo:hi], is_expert=expert,
        )
    return buf


@pytest.mark.parametrize("lmbda", [0.0, 0.25, 0.5, 1.0])
def test_gkd_batch_holds_lmbda_newest_rollouts(synthetic_buffer, lmbda):
    buf = _mixed_buffer(synthetic_buffer)
    algo = make_algorithm("gkd", _policy(), {"lmbda": lmbda})
    newest = [23, 24, 25]  # the last rollout batch; rows 20-22 are older rollouts
    algo.after_rollout(newest)
    batch = algo.sampler.batch(buf, 8, torch.Generator().manual_seed(0), algo.top_p)
    n_student = int((~batch.is_expert_B).sum())
    assert n_student == round(lmbda * 8) and algo.needs_rollouts == (lmbda > 0)
    # Rows are recognised by their response: rollout rows must be copies of the newest ones only.
    newest_responses = {tuple(buf.responses[i].tolist()) for i in newest}
    for b in range(8):
        response = tuple(batch.actions_BT[b, : batch.lengths_B[b]].tolist())
        if not batch.is_expert_B[b]:
            assert response in newest_responses


def test_minillm_batch_is_all_newest_rollouts_and_needs_some(synthetic_buffer):
    buf = _mixed_buffer(synthetic_buffer)
    algo = make_algorithm("minillm", _policy(), {})
    with pytest.raises(ValueError, match="rollout_every"):
        algo.sampler.batch(buf, 4, torch.Generator().manual_seed(0), algo.top_p)
    algo.after_rollout(range(20, 26))
    assert not algo.sampler.batch(buf, 16, torch.Generator().manual_seed(0), algo.top_p).is_expert_B.any()


def test_rollout_mix_without_teacher_data_names_the_problem(synthetic_buffer):
    buf = _mixed_buffer(synthetic_buffer, n_expert=0)
    mix = RolloutMix(0.5)
    mix.rollouts_added([0, 1])
    with pytest.raises(ValueError, match="is_expert=True"):
        mix.rows(buf, 4, torch.Generator())


def test_uniform_sampler_draws_the_buffer_sample_stream(synthetic_buffer):
    """The trainer's one draw (sampler rows, then collate) is the batch ``ReplayBuffer.sample`` draws: runs keep
    their batches across the move of batch drawing into the sampler."""
    sampler = make_algorithm("bc", _policy(), {}).sampler
    assert type(sampler) is BatchSampler and sampler.splittable and not RolloutMix(0.5).splittable
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        drawn, sampled = sampler.batch(synthetic_buffer, 6, g1, 0.5), synthetic_buffer.sample(6, g2, top_p=0.5)
        assert torch.equal(drawn.input_ids_BL, sampled.input_ids_BL)
        assert torch.equal(drawn.cand_mask_BSK, sampled.cand_mask_BSK)


@pytest.mark.parametrize("algo", ["gkd", "minillm"])
def test_run_refuses_accumulation_for_a_sampler_that_does_not_split(tmp_path, algo):
    """A rollout mix is drawn whole: micro_batch_size (and torchrun) is refused before any data or model work."""
    cfg = make_run_config({"algo": {"name": algo}, "batch_size": 8, "micro_batch_size": 4, "progress": False,
                           "data_dir": str(tmp_path / "data")})
    with pytest.raises(ValueError, match="RolloutMix.*micro_batch_size"):
        run(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "data").exists()


TINY_TASK = {
    "n_train_prompts": 24, "samples_per_prompt": 1, "n_val_prompts": 4, "n_test_prompts": 6, "max_new_tokens": 8,
}


@pytest.fixture(scope="module")
def tiny_task():
    return build_task(make_run_config({"algo": {"name": "bc"}, "task": TINY_TASK}))


def test_collect_rollouts_adds_scored_student_rollouts_in_timed_stages(tiny_task, synthetic_buffer):
    policy = CausalLMPolicy(tiny_llama(), vocab_size=64)
    algo = make_algorithm("minillm", policy, {"top_p": 0.8})
    buf = _mixed_buffer(synthetic_buffer, n_rollout=0)
    clock = StageClock()
    stats = collect_rollouts(policy.model, tiny_task, buf, algo, n_prompts=5, seed=3, clock=clock)
    assert len(buf) == 25 and stats["rollout/buffer_size"] == 25 and stats["rollout/n"] == 5
    assert algo.sampler.newest == [20, 21, 22, 23, 24] and not any(buf.is_expert[20:])
    assert set(clock.totals) == {"time/rollout_s", "time/teacher_score_s", "time/buffer_add_s"}
    # Scored by the teacher: every rollout state has its top-p cache, and every action lies in the set.
    batch = buf.collate(list(range(20, 25)), top_p=0.8)
    assert batch.cand_mask_BSK[batch.state_mask_BS].any(-1).all()
    assert batch.action_in_set_BT[batch.action_mask_BT].float().mean() >= 0.9  # float16 cache at the set edge
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), algo.behaviour.state_dict().values()))


def test_onpolicy_kl_does_not_change_the_other_metrics(tiny_task):
    cfg = make_run_config({"algo": {"name": "bc"}, "task": TINY_TASK, "eval": {"seeds": [0, 1]}})
    model = tiny_llama()
    got = evaluate_student(model, tiny_task, cfg.eval, cfg.eval.seeds)
    alone = evaluate(
        model, tiny_task.teacher, tiny_task.test_prompts, tiny_task.test_references, tiny_task.decode,
        eos_token_id=tiny_task.eos_token_id, pad_token_id=tiny_task.pad_token_id,
        max_new_tokens=tiny_task.max_new_tokens, seeds=[0, 1], heldout=tiny_task.test_heldout,
        batch_size=cfg.eval.batch_size, vocab_size=tiny_task.vocab_size,
    )
    other_decodings = {k for k in got if k.startswith("eval_p")}  # eval.decode_top_p beyond the first
    assert set(got) - set(alone) - other_decodings == {"eval/onpolicy_kl", "eval/onpolicy_kl_exact_state"}
    for k, v in alone.items():
        assert np.array_equal(np.asarray(got[k]), np.asarray(v)), k
    assert np.isfinite(got["eval/onpolicy_kl"]) and got["eval/onpolicy_kl_exact_state"] > 0
