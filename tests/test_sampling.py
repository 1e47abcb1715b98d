"""Tests of tokenrl.lm.sampling: the KV-cache stepper and sampler against a slow full-forward reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from tests.conftest import tiny_llama as conftest_llama

from tokenrl.lm.sampling import KVCacheStepper, _sample_batch, sample_responses
from tokenrl.core.top_p import top_p_mask

V = 64
EOS = 0


def tiny_llama(seed: int = 0, vocab_size: int = V, attn: str = "sdpa") -> LlamaForCausalLM:
    # A larger init than the default gives peaked distributions, so top-p sets are small and greedy decoding
    # has no near-ties. The token ids are LlamaConfig's defaults (no padding row in the embedding).
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    ids = dict(eos_token_id=2, pad_token_id=None, bos_token_id=1)
    return conftest_llama(vocab_size, seed, initializer_range=0.2, attn_implementation=attn, **sizes, **ids)


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


@torch.no_grad()
def test_stepper_cached_steps_match_uncached_forward(llama):
    prompts = random_prompts(5, seed=4)
    sequences = [list(p) for p in prompts]
    stepper = KVCacheStepper(llama.eval(), pad_token_id=EOS, vocab_size=V)

    def padded(rows):
        width = max(map(len, rows))
        return torch.tensor([r + [EOS] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])

    logits_BV = stepper.start(*padded(sequences))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        torch.testing.assert_close(logits_BV, stepper.next_token_logits(*padded(sequences)), atol=1e-4, rtol=1e-4)
        for b, row in enumerate(sequences):
            torch.testing.assert_close(logits_BV[b], slow_logits(llama, row), atol=1e-4, rtol=1e-4)
        next_B = torch.randint(1, V, (len(sequences),), generator=generator)
        for row, token in zip(sequences, next_B.tolist()):
            row.append(token)
        logits_BV = stepper.advance(next_B)
    stepper.stop()
    with pytest.raises(RuntimeError, match="start"):
        stepper.advance(next_B)


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
def test_top_p_samples_stay_in_the_studentsprobed_top_p_sets(llama, temperature):
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
        responses, logprobs, _ = _sample_batch(model, prompts, 12, EOS, EOS, generator, 1.0, 1.0, V)
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
# The probed top-p sets of the sampling pass against the exact rule (tokenrl.core.top_p)
# --------------------------------------------------------------------------------------------------
def _probe_cases() -> list[tuple[str, torch.Tensor]]:
    """Logit rows that take both branches of ``probed_top_p_sets``: sharp and flat rows, sets larger than the probe,
    bf16-rounded rows (ties inside and across the boundary), rows whose tail mass sits at ``1 - p``, and a
    vocabulary smaller than the probe."""
    gen = torch.Generator().manual_seed(0)
    vocab = 3000
    base = torch.randn(64, vocab, generator=gen)
    # Two tokens of mass ~0.45 / 0.35 / rest: the p = 0.8 boundary falls on the second token's tail mass.
    boundary = torch.full((4, vocab), -30.0)
    boundary[:, 0], boundary[:, 1] = 0.0, float(np.log(0.35 / 0.45))
    boundary[:, 2:] += torch.randn(4, vocab - 2, generator=gen) * 1e-3
    return [
        ("sharp", base * 6.0),
        ("flat (sets beyond the probe)", base * 0.5),
        ("bf16 ties", (base * 4.0).bfloat16().float()),
        ("equal top logits", torch.cat([torch.full((8, 3), 2.0), base[:8, 3:] * 3.0], dim=1)),
        ("tail mass at the boundary", boundary),
        ("vocabulary below the probe", base[:, :40] * 3.0),
    ]


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95, 1.0])
def test_probed_top_p_sets_equal_the_exact_rule_bit_for_bit(p):
    from tokenrl.core.top_p import top_p_sparse
    from tokenrl.lm.probed_sets import probed_top_p_sets

    branches = set()
    for name, logits_BV in _probe_cases():
        sets = probed_top_p_sets(logits_BV, torch.log_softmax(logits_BV, -1), p)
        exact = top_p_sparse(logits_BV, p)
        assert torch.equal(sets.sizes_B, exact.sizes), name
        for b, n in enumerate(exact.sizes.tolist()):
            assert torch.equal(sets.ids_BK[b, :n], exact.ids[b, :n]), (name, b)
            assert torch.equal(sets.logprobs_BK[b, :n], exact.logprobs[b, :n]), (name, b)
        assert torch.equal(sets.mask(logits_BV), top_p_mask(logits_BV, p)), name
        sizes, ids, logprobs = sets.to_numpy()
        assert sizes.dtype == ids.dtype == np.int32 and logprobs.dtype == np.float16
        branches |= set(sets.exact_B.tolist())
    # p = 1 keeps every token of non-zero probability: no set ends inside the probe.
    assert branches == ({True} if p == 1.0 else {True, False}), "both branches must be exercised"
