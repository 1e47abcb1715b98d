"""Tests of tokenrl.evaluation.metrics: exact teacher scores against SyntheticLanguage, Rouge-L edge cases,
teacher-forced KL and the full evaluate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.reference import sequence_logprob
from tests.test_sampling import EOS, V, random_prompts, slow_logits, tiny_llama
from tokenrl.evaluation.metrics import evaluate, evaluate_decodings, evaluate_teacher_samples, rouge_l
from tokenrl.evaluation.teacher_forced import (
    SET_METRIC_KEYS,
    set_metrics_per_token,
    teacher_forced_kl,
    teacher_forced_set_metrics,
    teacher_nll,
)
from tokenrl.lm.sampling import sample_responses


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


class ModelTeacher:
    """Teacher adapter over a causal LM, so a student can be compared with itself."""

    def __init__(self, model: torch.nn.Module, vocab_size: int = V, eos_token_id: int = EOS):
        self.model, self.vocab_size, self.eos_token_id = model, vocab_size, eos_token_id

    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        mask_BT = (torch.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]).long()
        with torch.inference_mode():
            return self.model(input_ids=tokens_BT, attention_mask=mask_BT).logits[..., : self.vocab_size]

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        logits_BTV = self.sequence_logits(tokens_BT, lengths_B)
        return logits_BTV[torch.arange(len(lengths_B)), lengths_B - 1]

    def position_logits(self, at, chunk):
        yield from self.sequence_logits(at.tokens_BT, at.lengths_B)[at.rows_N, at.cols_N].split(chunk)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def test_teacher_nll_equals_synthetic_sequence_logprob(lang):
    rng = np.random.default_rng(0)
    prompts = lang.sample_prompts(20, rng)
    responses = [r for r, _ in lang.sample_continuations(prompts, 15, rng)]
    responses[0] = []  # an empty response scores to an empty array
    nll = teacher_nll(lang, prompts, responses, batch_size=7)
    for prompt, response, values in zip(prompts, responses, nll):
        seq = torch.tensor([prompt + response])
        reference = -sequence_logprob(lang, seq, len(prompt), torch.tensor([seq.shape[1]]))[0, len(prompt) :]
        assert values.shape == (len(response),)
        np.testing.assert_allclose(values, reference.numpy(), rtol=1e-5, atol=1e-5)


def test_rouge_l_identical_disjoint_and_best_reference():
    assert rouge_l(["t1 t2 t3"], [["t1 t2 t3"]]) == pytest.approx(100.0)
    assert rouge_l(["t1 t2 t3"], [["t4 t5"]]) == pytest.approx(0.0)
    assert rouge_l(["", "t1"], [["t1"], ["t1"]]) == pytest.approx(50.0)
    assert rouge_l(["t1 t2"], [["t9", "t1 t2"]]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        rouge_l(["a"], [[]])


def test_teacher_forced_kl_is_zero_against_itself_and_positive_otherwise(llama):
    prompts = random_prompts(9, seed=5)
    responses = sample_responses(llama, prompts, 10, EOS, EOS, seed=0)
    same = teacher_forced_kl(llama, ModelTeacher(llama), prompts, responses, batch_size=4)
    assert same["kl_student_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)

    other = tiny_llama(seed=1)
    kl = teacher_forced_kl(llama, ModelTeacher(other), prompts, responses, batch_size=4)
    # Slow reference: unpadded forwards, per response position, token-weighted mean.
    st, ts, n = 0.0, 0.0, 0
    for prompt, response in zip(prompts, responses):
        for t in range(len(response)):
            logp_s = torch.log_softmax(slow_logits(llama, prompt + response[:t]).double(), -1)
            logp_t = torch.log_softmax(slow_logits(other, prompt + response[:t]).double(), -1)
            st += float((logp_s.exp() * (logp_s - logp_t)).sum())
            ts += float((logp_t.exp() * (logp_t - logp_s)).sum())
            n += 1
    assert kl["kl_student_teacher"] > 0 and kl["kl_teacher_student"] > 0
    assert kl["kl_student_teacher"] == pytest.approx(st / n, rel=1e-4)
    assert kl["kl_teacher_student"] == pytest.approx(ts / n, rel=1e-4)


def _set_metrics_loop(student_logits: list[float], teacher_logits: list[float], p: float) -> dict[str, float]:
    """One state's set metrics with plain Python floats: the slow reference of :func:`set_metrics_per_token`."""
    def softmax(xs):
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) for e in exps]

    ps, pt = softmax(student_logits), softmax(teacher_logits)
    # The teacher's top-p set: the shortest most-likely-first prefix whose mass reaches p.
    members, mass = [], 0.0
    for a in sorted(range(len(pt)), key=lambda a: -pt[a]):
        members.append(a)
        mass += pt[a]
        if mass >= p:
            break
    s_in, t_in = sum(ps[a] for a in members), sum(pt[a] for a in members)
    return {
        "mass_outside_set": 1.0 - s_in,
        "kl_teacher_student_on_set": sum(
            pt[a] / t_in * math.log((pt[a] / t_in) / (ps[a] / s_in)) for a in members
        ),
        # The data's sampling distribution (the teacher renormalised on its set) against the whole student.
        "kl_set_teacher_student": sum(pt[a] / t_in * math.log((pt[a] / t_in) / ps[a]) for a in members),
        "student_entropy": -sum(x * math.log(x) for x in ps if x > 0),
        "teacher_entropy": -sum(x * math.log(x) for x in pt if x > 0),
    }


@pytest.mark.parametrize("p", [0.5, 0.8, 1.0])
def test_set_metrics_per_token_match_a_per_state_loop(p):
    gen = torch.Generator().manual_seed(3)
    student_NV = torch.randn(7, 11, generator=gen, dtype=torch.float64) * 2
    # Peaked teachers, so that the sets have 1 to a few members.
    teacher_NV = torch.randn(7, 11, generator=gen, dtype=torch.float64) * 3
    fast = set_metrics_per_token(student_NV, teacher_NV, p)
    assert set(fast) == set(SET_METRIC_KEYS)
    for n in range(7):
        slow = _set_metrics_loop(student_NV[n].tolist(), teacher_NV[n].tolist(), p)
        for key in SET_METRIC_KEYS:
            assert float(fast[key][n]) == pytest.approx(slow[key], rel=1e-9, abs=1e-12), (key, n)
    # The identity the docstring states: the set KL plus the price of the mass left outside.
    assert torch.allclose(
        fast["kl_set_teacher_student"],
        fast["kl_teacher_student_on_set"] - torch.log1p(-fast["mass_outside_set"]), rtol=1e-9, atol=1e-12,
    )
    if p == 1.0:  # the set is the whole vocabulary: nothing outside, the full forward KL
        assert torch.allclose(fast["mass_outside_set"], torch.zeros(7, dtype=torch.float64), atol=1e-12)


def test_teacher_forced_set_metrics_average_the_per_token_form(llama, lang):
    prompts = random_prompts(6, seed=2)
    responses = sample_responses(llama, prompts, 8, EOS, EOS, seed=0)
    teacher = ModelTeacher(tiny_llama(seed=1))
    got = teacher_forced_set_metrics(llama, teacher, prompts, responses, 0.8, batch_size=4)
    totals, n = dict.fromkeys(SET_METRIC_KEYS, 0.0), 0
    for prompt, response in zip(prompts, responses):
        for t in range(len(response)):
            slow = _set_metrics_loop(
                slow_logits(llama, prompt + response[:t]).double().tolist(),
                slow_logits(teacher.model, prompt + response[:t]).double().tolist(), 0.8,
            )
            totals = {k: totals[k] + slow[k] for k in SET_METRIC_KEYS}
            n += 1
    for key in SET_METRIC_KEYS:
        assert got[key] == pytest.approx(totals[key] / n, rel=1e-4), key
    assert 0.0 < got["mass_outside_set"] < 1.0
    same = teacher_forced_set_metrics(llama, ModelTeacher(llama), prompts, responses, 0.8, batch_size=4)
    assert same["kl_teacher_student_on_set"] == pytest.approx(0.0, abs=1e-6)
    assert same["student_entropy"] == pytest.approx(same["teacher_entropy"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Full evaluation
# --------------------------------------------------------------------------------------------------
def test_evaluate_and_teacher_row_on_synthetic_language(llama, lang):
    rng = np.random.default_rng(1)
    prompts = lang.sample_prompts(16, rng)
    max_new = 12

    def sampler(batch_prompts, seed):
        pairs = lang.sample_continuations(batch_prompts, max_new, np.random.default_rng(seed))
        return [r for r, _ in pairs]

    references = [[lang.token_to_text(r)] for r in sampler(prompts, 100)]
    heldout = (prompts, sampler(prompts, 101))
    metrics = evaluate(
        llama, lang, prompts, references, lang.token_to_text,
        eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=max_new, seeds=(0, 1), heldout=heldout, batch_size=8,
    )
    teacher = evaluate_teacher_samples(lang, prompts, references, lang.token_to_text, sampler, seeds=(0, 1))
    scalar_keys = [
        "eval/teacher_nll", "eval/teacher_nll_std_seeds", "eval/rougeL", "eval/rougeL_std_seeds",
        "eval/response_len", "eval/eos_rate", "eval/kl_student_teacher", "eval/kl_teacher_student",
    ]
    for result in (metrics, teacher):
        for key in scalar_keys:
            assert isinstance(result[key], float) and math.isfinite(result[key]), key
        assert 0.0 <= result["eval/eos_rate"] <= 1.0
        assert 0.0 <= result["eval/rougeL"] <= 100.0
        curve, counts = result["eval/nll_by_position"], result["eval/nll_by_position_count"]
        assert len(curve) == len(counts) <= max_new
        # Token-weighted mean of the curve = mean NLL pooled over seeds (seeds' token counts may differ).
        pooled = float(np.dot(curve, counts) / np.sum(counts))
        assert pooled == pytest.approx(result["eval/teacher_nll"], rel=0.2)
    # An untrained student writes text the teacher finds far less likely than the teacher's own.
    assert teacher["eval/teacher_nll"] < metrics["eval/teacher_nll"]
    assert metrics["eval/kl_student_teacher"] > 0
    assert teacher["eval/kl_student_teacher"] == 0.0

    no_rouge = evaluate(
        llama, lang, prompts[:4], None, lang.token_to_text,
        eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=4, seeds=(0,),
    )
    assert "eval/rougeL" not in no_rouge and "eval/kl_student_teacher" not in no_rouge
    assert no_rouge["eval/teacher_nll_std_seeds"] == 0.0


def test_evaluate_decodings_reports_each_top_p_under_its_own_prefix(llama, lang):
    prompts = lang.sample_prompts(6, np.random.default_rng(4))
    pairs = lang.sample_continuations(prompts, 6, np.random.default_rng(5))
    heldout = (prompts, [r for r, _ in pairs])
    kwargs = dict(eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=6, seeds=(0,), batch_size=8)
    both = evaluate_decodings(
        llama, lang, prompts, None, lang.token_to_text, decode_top_p=[1.0, 0.8], set_top_p=0.8, heldout=heldout, **kwargs
    )
    first = evaluate(
        llama, lang, prompts, None, lang.token_to_text, top_p=1.0, heldout=heldout, set_top_p=0.8, **kwargs
    )
    second = evaluate(llama, lang, prompts, None, lang.token_to_text, top_p=0.8, **kwargs)
    assert set(both) == set(first) | {key.replace("eval/", "eval_p0.8/") for key in second}
    for key, value in first.items():
        assert both[key] == value, key  # the first decoding keeps the eval/ keys, unchanged
    for key, value in second.items():
        assert both[key.replace("eval/", "eval_p0.8/")] == value, key
    assert "eval_p0.8/kl_student_teacher" not in both  # teacher-forced metrics do not depend on decoding
    set_metrics = teacher_forced_set_metrics(llama, lang, *heldout, 0.8, batch_size=8)
    for key in SET_METRIC_KEYS:
        assert math.isfinite(both[f"eval/{key}"]) and both[f"eval/{key}"] == set_metrics[key]
        assert f"eval_p0.8/{key}" not in both
    with pytest.raises(ValueError, match="decode_top_p"):
        evaluate_decodings(llama, lang, prompts, None, lang.token_to_text, decode_top_p=[], **kwargs)
