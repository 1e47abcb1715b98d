"""Position-chunked scoring (tokenrl.lm.scoring) equals the dense [B, T, V] computation it replaced.

The dense references below are the pre-chunking bodies of ``evaluation.teacher_nll``,
``evaluation.teacher_forced_kl`` and ``datagen.compute_top_p_cache``, kept here as the slow oracle. Every
case uses ragged prompt and response lengths, empty responses and chunk sizes that do not divide the
number of scored positions (``CHUNK_ELEMENTS`` is patched so the call sites chunk too).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenrl.lm import scoring
from tokenrl.core.padding import right_pad
from tokenrl.tasks.datagen import compute_top_p_cache
from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_nll
from tokenrl.lm.models import HFTeacher
from tokenrl.tasks.synthetic import SyntheticLanguage
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import top_p_sparse

# Row 1 has an empty response; with max_batch=2 rows 0-1 form a row group with nothing to score.
PROMPT_LENS = [3, 1, 5, 2, 4]
RESPONSE_LENS = [0, 0, 7, 1, 3]


# --------------------------------------------------------------------------------------------------
# Dense references (the code before chunking)
# --------------------------------------------------------------------------------------------------
def dense_teacher_nll(teacher, prompts, responses, batch_size=64):
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_responses = prompts[start : start + batch_size], responses[start : start + batch_size]
        tokens_BT, lengths_B = right_pad([p + r for p, r in zip(batch_prompts, batch_responses)], teacher.eos_token_id)
        logprobs_BTV = torch.log_softmax(teacher.sequence_logits(tokens_BT, lengths_B).double().cpu(), dim=-1)
        token_logprobs_BT = logprobs_BTV[:, :-1].gather(2, tokens_BT[:, 1:, None])[..., 0]
        for b, (prompt, response) in enumerate(zip(batch_prompts, batch_responses)):
            first = len(prompt) - 1
            out.append(-token_logprobs_BT[b, first : first + len(response)].numpy())
    return out


def dense_kl_per_position(model, teacher, prompts, responses, vocab):
    """``(kl_st_N, kl_ts_N)`` at every response position, row-major (one batch)."""
    tokens_BT, lengths_B = right_pad([p + r for p, r in zip(prompts, responses)], teacher.eos_token_id)
    width = tokens_BT.shape[1]
    attention_mask_BT = (torch.arange(width)[None, :] < lengths_B[:, None]).long()
    with torch.no_grad():
        student_logits_BTV = model(input_ids=tokens_BT, attention_mask=attention_mask_BT).logits[..., :vocab]
    teacher_logits_BTV = teacher.sequence_logits(tokens_BT, lengths_B)
    logp_s_BTV = torch.log_softmax(student_logits_BTV.double(), dim=-1)
    logp_t_BTV = torch.log_softmax(teacher_logits_BTV.double(), dim=-1)
    p_s_BTV, p_t_BTV = logp_s_BTV.exp(), logp_t_BTV.exp()
    kl_st_BT = torch.where(p_s_BTV > 0, p_s_BTV * (logp_s_BTV - logp_t_BTV), 0.0).sum(-1)
    kl_ts_BT = torch.where(p_t_BTV > 0, p_t_BTV * (logp_t_BTV - logp_s_BTV), 0.0).sum(-1)
    t_T = torch.arange(width)
    start_B1 = torch.tensor([len(p) - 1 for p in prompts])[:, None]
    mask_BT = (t_T[None, :] >= start_B1) & (t_T[None, :] < start_B1 + torch.tensor([len(r) for r in responses])[:, None])
    return kl_st_BT[mask_BT], kl_ts_BT[mask_BT]


def dense_top_p_cache(teacher, prompts, responses, p, max_k=None, pad_id=0):
    tokens_BL, lengths_B = right_pad([a + b for a, b in zip(prompts, responses)], pad_id)
    logits_BLV = teacher.sequence_logits(tokens_BL, lengths_B)
    out = []
    for b in range(len(prompts)):
        pl, rl = len(prompts[b]), len(responses[b])
        sets = top_p_sparse(logits_BLV[b, pl - 1 : pl + rl], p, max_k=max_k, pad_id=pad_id)
        out.append((sets.sizes.numpy(), sets.ids[sets.mask].numpy(), sets.logprobs[sets.mask].numpy()))
    return out


# --------------------------------------------------------------------------------------------------
# Fixtures: a synthetic teacher and transformers teachers over a tiny word tokenizer
# --------------------------------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(51)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<eos>", "<pad>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_causal_lm(family: str, vocab_rows: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_rows, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    config = LlamaConfig(
        vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def make_teacher(kind: str) -> Teacher:
    if kind == "synthetic":
        return SyntheticLanguage()
    tokenizer = word_tokenizer()
    # Three padded embedding rows (as Qwen2.5 has) must be sliced off by position_logits as well.
    return HFTeacher(tiny_causal_lm(kind, len(tokenizer) + 3, seed=1), tokenizer, max_batch=2)


def ragged_pairs(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, size=n).tolist() for n in PROMPT_LENS]
    responses = [rng.integers(0, vocab, size=n).tolist() for n in RESPONSE_LENS]
    return prompts, responses


TEACHERS = ["synthetic", "llama", "gpt2"]


@pytest.fixture(scope="module", params=TEACHERS)
def teacher(request) -> Teacher:
    return make_teacher(request.param)


def test_state_positions_match_a_loop():
    prompt_lens_B, n_states_B = torch.tensor(PROMPT_LENS), torch.tensor(RESPONSE_LENS)
    tokens_BT, lengths_B = right_pad([[1] * (p + n) for p, n in zip(PROMPT_LENS, RESPONSE_LENS)], 0)
    at = scoring.state_positions(tokens_BT, lengths_B, prompt_lens_B, n_states_B)
    expected = [(b, p - 1 + j) for b, (p, n) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)) for j in range(n)]
    assert list(zip(at.rows_N.tolist(), at.cols_N.tolist())) == expected
    assert len(at) == len(expected) and at.tokens_BT is tokens_BT and at.lengths_B is lengths_B


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_position_logits_equal_sequence_logits(teacher, chunk):
    assert isinstance(teacher, Teacher)
    prompts, responses = ragged_pairs(teacher.vocab_size)
    tokens_BT, lengths_B = right_pad([p + r for p, r in zip(prompts, responses)], 0)
    prompt_lens_B = torch.tensor(PROMPT_LENS)
    at = scoring.state_positions(tokens_BT, lengths_B, prompt_lens_B, lengths_B - prompt_lens_B + 1)
    blocks = list(teacher.position_logits(at, chunk))
    assert all(block.shape[0] <= chunk and block.dtype == torch.float32 for block in blocks)
    assert [block.shape[0] for block in blocks[:-1]] == [chunk] * (len(blocks) - 1)
    dense_NV = teacher.sequence_logits(tokens_BT, lengths_B)[at.rows_N, at.cols_N]
    torch.testing.assert_close(torch.cat(blocks), dense_NV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_teacher_response_nll_matches_dense(teacher, chunk):
    prompts, responses = ragged_pairs(teacher.vocab_size)
    tokens_BT, lengths_B = right_pad([p + r for p, r in zip(prompts, responses)], teacher.eos_token_id)
    nll_N = scoring.teacher_response_nll(teacher, tokens_BT, lengths_B, torch.tensor(PROMPT_LENS), chunk=chunk)
    assert nll_N.dtype == torch.float64
    expected = np.concatenate(dense_teacher_nll(teacher, prompts, responses))
    np.testing.assert_allclose(nll_N.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_teacher_nll_call_site_matches_dense(teacher, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 3 * teacher.vocab_size)  # 3-position chunks
    prompts, responses = ragged_pairs(teacher.vocab_size, seed=1)
    got = teacher_nll(teacher, prompts, responses, batch_size=3)
    expected = dense_teacher_nll(teacher, prompts, responses, batch_size=3)
    assert [len(a) for a in got] == RESPONSE_LENS
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [4, None])
def test_kl_both_directions_matches_dense(teacher, family, chunk):
    student = tiny_causal_lm(family, teacher.vocab_size + 2, seed=2)  # padded rows, sliced to vocab
    prompts, responses = ragged_pairs(teacher.vocab_size)
    tokens_BT, lengths_B = right_pad([p + r for p, r in zip(prompts, responses)], teacher.eos_token_id)
    with torch.no_grad():
        kl_st_N, kl_ts_N = scoring.kl_both_directions(
            student, teacher, tokens_BT, lengths_B, torch.tensor(PROMPT_LENS), teacher.vocab_size, chunk
        )
    dense_st_N, dense_ts_N = dense_kl_per_position(student, teacher, prompts, responses, teacher.vocab_size)
    assert kl_st_N.dtype == kl_ts_N.dtype == torch.float64 and len(kl_st_N) == sum(RESPONSE_LENS)
    torch.testing.assert_close(kl_st_N, dense_st_N, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_ts_N, dense_ts_N, rtol=1e-5, atol=1e-6)
    assert bool((kl_st_N > 0).all()) and bool((kl_ts_N > 0).all())


def test_teacher_forced_kl_call_site_matches_dense(teacher, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 3 * teacher.vocab_size)
    student = tiny_causal_lm("llama", teacher.vocab_size, seed=3)
    prompts, responses = ragged_pairs(teacher.vocab_size, seed=2)
    kl = teacher_forced_kl(student, teacher, prompts, responses, batch_size=2)
    dense_st_N, dense_ts_N = dense_kl_per_position(student, teacher, prompts, responses, teacher.vocab_size)
    assert kl["kl_student_teacher"] == pytest.approx(float(dense_st_N.mean()), rel=1e-6)
    assert kl["kl_teacher_student"] == pytest.approx(float(dense_ts_N.mean()), rel=1e-6)


def test_kl_with_only_empty_responses_is_nan(teacher):
    student = tiny_causal_lm("llama", teacher.vocab_size)
    kl = teacher_forced_kl(student, teacher, [[1, 2], [3]], [[], []])
    assert np.isnan(kl["kl_student_teacher"]) and np.isnan(kl["kl_teacher_student"])


@pytest.mark.parametrize("max_k", [None, 2])
def test_top_p_cache_matches_dense(teacher, monkeypatch, max_k):
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 3 * teacher.vocab_size)  # sets of a row span chunks
    prompts, responses = ragged_pairs(teacher.vocab_size, seed=3)
    caches = compute_top_p_cache(teacher, prompts, responses, 0.8, batch_size=4, max_k=max_k, pad_id=1)
    expected = dense_top_p_cache(teacher, prompts, responses, 0.8, max_k=max_k, pad_id=1)
    for cache, response, (sizes, ids, logprobs) in zip(caches, responses, expected):
        assert len(cache.sizes) == len(response) + 1
        np.testing.assert_array_equal(cache.sizes, sizes)
        np.testing.assert_array_equal(cache.ids, ids)
        np.testing.assert_allclose(cache.logprobs.astype(np.float32), logprobs, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunk", [5, None])
def test_batch_teacher_logprobs_equal_a_per_state_loop(synthetic_buffer, chunk):
    """with_teacher_logprobs (position-chunked, left-padded prompts re-laid right-padded) = one call per state."""
    from tests.reference import teacher_logprobs_loop

    lang = SyntheticLanguage()  # the language the fixture was sampled from
    batch = synthetic_buffer.sample(7, torch.Generator().manual_seed(3), top_p=1.0)
    assert batch.lengths_B.unique().numel() > 1 and batch.attention_mask_BL[:, 0].min() == 0, "needs ragged rows"
    scored = scoring.with_teacher_logprobs(batch, lang, synthetic_buffer.pad_id, chunk=chunk)
    torch.testing.assert_close(scored.teacher_logprobs_BSV, teacher_logprobs_loop(lang, batch))
    assert batch.teacher_logprobs_BSV is None  # a copy: the drawn batch is unchanged
