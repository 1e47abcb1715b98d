"""Tests of tokenrl.evaluation: the KV-cache sampler against a slow full-forward reference, exact teacher
scores against SyntheticLanguage, Rouge-L edge cases, teacher-forced KL and the full evaluate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tokenrl.evaluation import (
    _sample_batch,
    evaluate,
    evaluate_teacher_samples,
    rouge_l,
    sample_responses,
    teacher_forced_kl,
    teacher_nll,
)
from tokenrl.synthetic import SyntheticLanguage
from tokenrl.top_p import top_p_mask

V = 64
EOS = 0


def tiny_llama(seed: int = 0, vocab_size: int = V, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        # A larger init than the default gives peaked distributions, so top-p sets are small and
        # greedy decoding has no near-ties.
        initializer_range=0.2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2))


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Variable lengths exercise the left padding; EOS never appears in a prompt.
    return [rng.integers(1, V, size=int(rng.integers(1, 10))).tolist() for _ in range(n)]


def slow_logits(model: torch.nn.Module, tokens: list[int], vocab_size: int = V) -> torch.Tensor:
    """Reference: next-token logits ``[V]`` from one unpadded full forward, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0, -1, :vocab_size].float()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def lang() -> SyntheticLanguage:
    return SyntheticLanguage()


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

    def position_logits(self, tokens_BT, lengths_B, rows_N, cols_N, chunk):
        yield from self.sequence_logits(tokens_BT, lengths_B)[rows_N, cols_N].split(chunk)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def test_sample_responses_deterministic_per_seed_and_varies_across_seeds(llama):
    prompts = random_prompts(12)
    a = sample_responses(llama, prompts, 16, EOS, EOS, seed=3, batch_size=5)
    b = sample_responses(llama, prompts, 16, EOS, EOS, seed=3, batch_size=5)
    c = sample_responses(llama, prompts, 16, EOS, EOS, seed=4, batch_size=5)
    assert a == b
    assert a != c


def test_sample_responses_stops_at_eos_and_respects_max_new_tokens(llama):
    prompts = random_prompts(64, seed=1)
    # Bias the logits toward EOS so many rows terminate early while others run to the cap.
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.5 * model.lm_head.weight.std() * torch.randn(64)
        model.lm_head.weight[EOS] *= 3.0
    responses = sample_responses(model, prompts, 12, EOS, EOS, seed=0)
    assert len(responses) == len(prompts)
    n_terminated = 0
    for response in responses:
        assert 1 <= len(response) <= 12
        assert EOS not in response[:-1]
        n_terminated += response[-1] == EOS
        assert all(0 <= t < V for t in response)
    assert 0 < n_terminated < len(prompts)
    assert sample_responses(model, prompts[:3], 0, EOS, EOS, seed=0) == [[], [], []]


def test_sample_responses_restores_train_mode(llama):
    llama.train()
    sample_responses(llama, random_prompts(2), 3, EOS, EOS, seed=0)
    assert llama.training
    llama.eval()
    sample_responses(llama, random_prompts(2), 3, EOS, EOS, seed=0)
    assert not llama.training


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_samples_stay_in_the_students_top_p_set(llama, temperature):
    prompts = random_prompts(16, seed=2)
    top_p = 0.6
    responses = sample_responses(llama, prompts, 10, EOS, EOS, seed=1, temperature=temperature, top_p=top_p)
    sizes = []
    for prompt, response in zip(prompts, responses):
        for t, token in enumerate(response):
            mask_V = top_p_mask(slow_logits(llama, prompt + response[:t]) / temperature, top_p)
            sizes.append(int(mask_V.sum()))
            assert mask_V[token], f"token {token} at step {t} is outside the top-p set"
    # The check is only meaningful if the sets actually exclude tokens.
    assert np.mean(sizes) < V / 2


@pytest.mark.parametrize(
    "make_model", [tiny_llama, lambda: tiny_llama(attn="eager"), tiny_gpt2], ids=["llama-sdpa", "llama-eager", "gpt2"]
)
def test_kv_cache_logprobs_match_slow_full_forward(make_model):
    model = make_model().eval()
    prompts = random_prompts(6, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        responses, logprobs = _sample_batch(model, prompts, 12, EOS, EOS, generator, 1.0, 1.0, V)
    for prompt, response, row_logprobs in zip(prompts, responses, logprobs):
        assert len(row_logprobs) == len(response) > 0
        for t, token in enumerate(response):
            reference = torch.log_softmax(slow_logits(model, prompt + response[:t]), -1)[token]
            assert row_logprobs[t] == pytest.approx(float(reference), abs=1e-4)


def test_greedy_matches_slow_greedy_reference(llama):
    prompts = random_prompts(5, seed=4)
    responses = sample_responses(llama, prompts, 8, EOS, EOS, seed=0, temperature=0.0, batch_size=3)
    for prompt, response in zip(prompts, responses):
        expected: list[int] = []
        for _ in range(8):
            token = int(slow_logits(llama, prompt + expected).argmax())
            expected.append(token)
            if token == EOS:
                break
        assert response == expected


def test_vocab_slicing_never_samples_padded_embedding_rows():
    model = tiny_llama(vocab_size=V + 8)
    with torch.no_grad():
        model.lm_head.weight[V:] += 10.0  # the padded rows would dominate if they were not sliced off
    responses = sample_responses(model, random_prompts(8), 8, EOS, EOS, seed=0, vocab_size=V)
    assert all(0 <= t < V for r in responses for t in r)


def test_sampling_rejects_bad_arguments(llama):
    with pytest.raises(ValueError, match="empty"):
        sample_responses(llama, [[1, 2], []], 4, EOS, EOS, seed=0)
    with pytest.raises(ValueError, match="top-p"):
        sample_responses(llama, [[1]], 4, EOS, EOS, seed=0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_responses(llama, [[1]], 4, EOS, EOS, seed=0, temperature=-1.0)


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
        reference = -lang.sequence_logprob(seq, len(prompt), torch.tensor([seq.shape[1]]))[0, len(prompt) :]
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
