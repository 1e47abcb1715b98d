"""SyntheticLanguage: the exact teacher against per-token loops over its own tables, and its samplers
against its probabilities (chi-square goodness of fit)."""

import numpy as np
import pytest
import scipy.stats
import torch

from tests.reference import sequence_logprob
from tokenrl.tasks.synthetic import SyntheticLanguage, SyntheticLanguageConfig
from tokenrl.core.top_p import top_p_mask

EOS = SyntheticLanguage.eos_token_id


def walk(lang, tokens, state=None):
    """Slow reference: the FSM state after each token of a list (one Python step per token)."""
    s = lang.start_state if state is None else state
    out = []
    for tok in tokens:
        s = int(lang.next_state_SV[s, tok])
        out.append(s)
    return out


def state_after(lang, tokens):
    return walk(lang, tokens)[-1] if tokens else lang.start_state


def random_sequences(lang, n, t_max, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t_max + 1, size=n)
    tokens = rng.integers(0, lang.vocab_size, size=(n, t_max))
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


def chi2_pvalue(samples, probs, min_expected=5.0):
    """Chi-square goodness of fit of integer samples to ``probs``; bins with small expectation are pooled."""
    n = len(samples)
    counts = np.bincount(np.asarray(samples), minlength=len(probs)).astype(float)
    expected = n * np.asarray(probs, dtype=float)
    assert counts[expected == 0].sum() == 0, "a sample fell on a zero-probability token"
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    assert len(obs) >= 2, "need at least two bins for a goodness-of-fit test"
    exp = exp * obs.sum() / exp.sum()
    return scipy.stats.chisquare(obs, exp).pvalue


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def test_emission_rows_are_strictly_positive_distributions(lang):
    probs = lang.probs_SV
    assert probs.shape == (lang.n_states, lang.vocab_size)
    assert np.all(probs > 0)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(lang.log_emission_SV), probs, rtol=1e-12)
    assert lang.next_state_SV.min() >= 0 and lang.next_state_SV.max() < lang.n_states - 1  # start never revisited


def test_entropy_per_state(lang):
    np.testing.assert_allclose(lang.entropy_per_state(), scipy.stats.entropy(lang.probs_SV, axis=1), rtol=1e-10)


def test_top_p_sets_are_sparse(lang):
    """The promise of the task: top-0.8 sets are a handful of tokens in a 64-token vocabulary."""
    sizes = top_p_mask(torch.from_numpy(lang.log_emission_SV), 0.8).sum(-1).double()
    assert sizes.mean() < 5
    assert sizes.min() >= 1
    # ... while p = 1 keeps everything (smoothing gives every token mass).
    assert bool(top_p_mask(torch.from_numpy(lang.log_emission_SV), 1.0).all())


def test_tables_are_deterministic_in_the_seed():
    a, b = SyntheticLanguage(SyntheticLanguageConfig(seed=3)), SyntheticLanguage(SyntheticLanguageConfig(seed=3))
    c = SyntheticLanguage(SyntheticLanguageConfig(seed=4))
    assert np.array_equal(a.probs_SV, b.probs_SV) and np.array_equal(a.next_state_SV, b.next_state_SV)
    assert not np.array_equal(a.probs_SV, c.probs_SV)


# ------------------------------------------------------------------------------------------------
# Teacher interface against per-token loops
# ------------------------------------------------------------------------------------------------
def test_states_match_a_per_token_walk(lang):
    tokens, _ = random_sequences(lang, 12, 15, seed=0)
    st = lang.states(tokens)
    for b in range(tokens.shape[0]):
        assert st[b].tolist() == walk(lang, tokens[b].tolist())


def test_next_token_logits_matches_loop(lang):
    tokens, lengths = random_sequences(lang, 16, 12, seed=1)
    lengths[0] = 0  # empty prefix: the start state
    logits = lang.next_token_logits(tokens, lengths)
    assert logits.shape == (16, lang.vocab_size) and logits.dtype == torch.float32
    for b in range(16):
        s = state_after(lang, tokens[b, : lengths[b]].tolist())
        np.testing.assert_allclose(logits[b].numpy(), lang.log_emission_SV[s], rtol=1e-6)
    # Padding content after the length does not matter.
    scrambled = tokens.clone()
    for b in range(16):
        scrambled[b, lengths[b] :] = (scrambled[b, lengths[b] :] + 5) % lang.vocab_size
    assert torch.equal(lang.next_token_logits(scrambled, lengths), logits)


def test_sequence_logits_matches_loop(lang):
    tokens, lengths = random_sequences(lang, 10, 9, seed=2)
    logits = lang.sequence_logits(tokens, lengths)
    assert logits.shape == (10, 9, lang.vocab_size) and logits.dtype == torch.float32
    for b in range(10):
        for t in range(9):
            s = state_after(lang, tokens[b, : t + 1].tolist())
            np.testing.assert_allclose(logits[b, t].numpy(), lang.log_emission_SV[s], rtol=1e-6)
    # Teacher-forced column t is the next-token distribution after t + 1 tokens.
    t = 4
    torch.testing.assert_close(logits[:, t], lang.next_token_logits(tokens, torch.full((10,), t + 1)))


@pytest.mark.parametrize("start_kind", ["int", "tensor"])
def test_sequence_logprob_matches_loop(lang, start_kind):
    tokens, lengths = random_sequences(lang, 10, 14, seed=3)
    rng = np.random.default_rng(3)
    starts = torch.from_numpy(rng.integers(0, 5, size=10))
    start = 2 if start_kind == "int" else starts
    lp = sequence_logprob(lang, tokens, start, lengths)
    assert lp.shape == tokens.shape and lp.dtype == torch.float64
    for b in range(10):
        st = start if start_kind == "int" else int(starts[b])
        s, total = lang.start_state, 0.0
        for t, tok in enumerate(tokens[b].tolist()):
            expected = lang.log_emission_SV[s, tok] if st <= t < lengths[b] else 0.0
            assert lp[b, t].item() == pytest.approx(expected, abs=1e-12)
            if st <= t < lengths[b]:
                total += lang.log_emission_SV[s, tok]
            s = int(lang.next_state_SV[s, tok])
        assert lp[b].sum().item() == pytest.approx(total, abs=1e-10)


def test_state_validation(lang):
    with pytest.raises(ValueError, match="2-D"):
        lang.states(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        lang.states(torch.tensor([[1, lang.vocab_size]]))
    with pytest.raises(ValueError, match="token ids"):
        lang.states(torch.tensor([[-1, 2]]))


# ------------------------------------------------------------------------------------------------
# Topic: a long-range dependency fixed by the first token
# ------------------------------------------------------------------------------------------------
def test_first_token_determines_the_topic(lang):
    Z = lang.config.n_topics
    rng = np.random.default_rng(5)
    n_pairs, suffix_len = 20, 12
    for _ in range(n_pairs):
        suffix = rng.integers(1, lang.vocab_size, size=suffix_len).tolist()
        first_a, first_b = rng.choice(np.arange(1, Z + 1), size=2, replace=False).tolist()
        same_topic = first_a + Z  # same topic as first_a ((tok - 1) % Z)
        rows = torch.tensor([[first_a] + suffix, [first_b] + suffix, [same_topic] + suffix])
        logits = lang.next_token_logits(rows, torch.full((3,), suffix_len + 1))
        # Different topic: a different distribution even 12 tokens later.
        assert (logits[0] - logits[1]).abs().max() > 1e-3
        # Same topic: the identical distribution at every later position.
        seq = lang.sequence_logits(rows)
        torch.testing.assert_close(seq[0, 1:], seq[2, 1:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def test_prompts_never_contain_eos_and_respect_lengths(lang):
    rng = np.random.default_rng(0)
    prompts = lang.sample_prompts(3000, rng)
    cfg = lang.config
    assert all(EOS not in p for p in prompts)
    lens = [len(p) for p in prompts]
    assert min(lens) == cfg.prompt_len_min and max(lens) == cfg.prompt_len_max
    assert all(0 <= t < lang.vocab_size for p in prompts for t in p)


def test_first_prompt_token_follows_start_distribution_without_eos(lang):
    prompts = lang.sample_prompts(6000, np.random.default_rng(1))
    probs = lang.probs_SV[lang.start_state].copy()
    probs[EOS] = 0.0
    probs /= probs.sum()
    assert chi2_pvalue([p[0] for p in prompts], probs) > 1e-3


def test_first_response_token_follows_the_teacher(lang):
    prompt = lang.sample_prompts(1, np.random.default_rng(2))[0]
    out = lang.sample_continuations([prompt] * 20000, 1, np.random.default_rng(2))
    firsts = [r[0] for r, _ in out]
    s = state_after(lang, prompt)
    assert chi2_pvalue(firsts, lang.probs_SV[s]) > 1e-3
    # The test has power: the same samples are rejected against another state's distribution.
    other = (s + 1) % (lang.n_states - 1)
    assert chi2_pvalue(firsts, lang.probs_SV[other]) < 1e-6


def test_tokens_at_a_fixed_later_state_follow_the_teacher(lang):
    """Second response tokens, given the most likely first token: a fixed state reached by sampling."""
    prompt = [2, 9, 17, 33]
    s0 = state_after(lang, prompt)
    out = lang.sample_continuations([prompt] * 20000, 2, np.random.default_rng(3))
    first = int(np.argmax(lang.probs_SV[s0]))
    seconds = [r[1] for r, _ in out if r[0] == first and len(r) == 2]
    assert len(seconds) > 2000
    s1 = int(lang.next_state_SV[s0, first])
    assert chi2_pvalue(seconds, lang.probs_SV[s1]) > 1e-3


def test_temperature_sampling_follows_tempered_distribution(lang):
    prompt = [5, 6, 7]
    s = state_after(lang, prompt)
    out = lang.sample_continuations([prompt] * 15000, 1, np.random.default_rng(4), temperature=2.0)
    tempered = np.exp(lang.log_emission_SV[s] / 2.0)
    assert chi2_pvalue([r[0] for r, _ in out], tempered / tempered.sum()) > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        lang.sample_continuations([prompt], 1, np.random.default_rng(0), temperature=0.0)


def test_top_p_sampling_stays_in_the_top_p_set_and_follows_the_projection(lang):
    p = 0.8
    allowed_SV = top_p_mask(torch.from_numpy(lang.log_emission_SV), p).numpy()
    rng = np.random.default_rng(5)
    prompts = lang.sample_prompts(400, rng)
    out = lang.sample_continuations(prompts, 20, rng, top_p=p)
    n_tokens = 0
    for prompt, (resp, term) in zip(prompts, out):
        s = state_after(lang, prompt)
        for tok in resp:
            assert allowed_SV[s, tok], f"token {tok} outside the top-{p} set of state {s}"
            s = int(lang.next_state_SV[s, tok])
            n_tokens += 1
        assert term == (resp[-1] == EOS)
        assert EOS not in resp[:-1]
        assert term or len(resp) == 20
    assert n_tokens > 1000
    # Distribution: the teacher projected onto its top-p set.
    prompt = next(pr for pr in prompts if allowed_SV[state_after(lang, pr)].sum() >= 3)
    s = state_after(lang, prompt)
    firsts = [r[0] for r, _ in lang.sample_continuations([prompt] * 10000, 1, np.random.default_rng(6), top_p=p)]
    proj = lang.probs_SV[s] * allowed_SV[s]
    assert chi2_pvalue(firsts, proj / proj.sum()) > 1e-3


def test_continuations_end_at_eos_or_budget(lang):
    rng = np.random.default_rng(7)
    prompts = lang.sample_prompts(300, rng)
    out = lang.sample_continuations(prompts, 6, rng)
    n_term = 0
    for resp, term in out:
        assert 1 <= len(resp) <= 6
        assert EOS not in resp[:-1]
        assert term == (resp[-1] == EOS)
        assert term or len(resp) == 6
        n_term += term
    assert 0 < n_term < len(out)
    with pytest.raises(ValueError):
        lang.sample_continuations(prompts[:1], 3, rng, top_p=0.0)


def test_sampling_is_reproducible_from_the_rng(lang):
    a = lang.sample_continuations([[1, 2, 3]] * 20, 10, np.random.default_rng(8))
    b = lang.sample_continuations([[1, 2, 3]] * 20, 10, np.random.default_rng(8))
    assert a == b


def test_token_to_text(lang):
    assert lang.token_to_text([3, 17, EOS]) == "t3 t17"


# ------------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(vocab_size=9, n_topics=8), "vocab_size"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(smoothing=-0.1), "smoothing"),
        (dict(prompt_len_min=0), "prompt_len_min"),
        (dict(prompt_len_min=5, prompt_len_max=4), "prompt_len"),
        (dict(vocab_size=16, max_support=16), "max_support"),
        (dict(support_log_std=-1.0), "support_log_std"),
        (dict(transitions="bigram"), "transitions"),
    ],
)
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticLanguage(SyntheticLanguageConfig(**kwargs))


def test_smallest_valid_vocab_builds():
    lang = SyntheticLanguage(SyntheticLanguageConfig(vocab_size=10, n_topics=8))
    assert np.all(lang.probs_SV > 0)


def test_heavy_tailed_options_give_lm_like_set_sizes_and_last_token_states():
    """The synthetic_lm options: many single-token top-0.8 sets and a long tail of wide ones."""
    Q = 16
    lang = SyntheticLanguage(SyntheticLanguageConfig(
        vocab_size=256, n_local_states=Q, mean_support=6.0, support_log_std=1.8, max_support=255,
        concentration=0.5, concentration_log_std=1.5, transitions="last_token",
    ))
    sizes = top_p_mask(torch.from_numpy(lang.log_emission_SV[:-1]), 0.8).sum(-1).numpy()
    assert (sizes == 1).mean() > 0.1 and sizes.max() > 20 and np.median(sizes) < 10
    # With last_token transitions the next local state depends on the topic and the token only.
    for z in range(lang.config.n_topics):
        block = lang.next_state_SV[z * Q : (z + 1) * Q]
        assert (block == block[0]).all() and ((block >= z * Q) & (block < (z + 1) * Q)).all()
    default = SyntheticLanguage(SyntheticLanguageConfig(vocab_size=256, max_support=255))
    default_sizes = top_p_mask(torch.from_numpy(default.log_emission_SV[:-1]), 0.8).sum(-1).numpy()
    assert default_sizes.max() < sizes.max()  # the default Poisson supports (mean 3) stay narrow
