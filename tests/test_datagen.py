"""Offline teacher data: the top-p cache against a per-state loop, and resumable sharded generation."""

import json
import os
import time

import numpy as np
import pytest
import torch

from tests.conftest import edit_manifest
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.core.padding import right_pad
from tokenrl.tasks.datagen import compute_top_p_cache, generate_teacher_data, load_teacher_data
from tokenrl.core.top_p import top_p_sparse

MAX_NEW = 8
MANIFEST = {"teacher": "synthetic-seed0", "tokenizer": "synthetic", "sample_top_p": 1.0, "temperature": 1.0}


def sampler_for(lang):
    def sampler(prompts, seed):
        return lang.sample_continuations(prompts, MAX_NEW, np.random.default_rng(seed))

    return sampler


def trajectories(lang, n, seed):
    rng = np.random.default_rng(seed)
    prompts = lang.sample_prompts(n, rng)
    responses = [r for r, _ in lang.sample_continuations(prompts, MAX_NEW, rng)]
    # Also arbitrary responses (no EOS) that often leave the teacher's top-p sets.
    for i in range(0, n, 4):
        responses[i] = rng.integers(1, lang.vocab_size, size=int(rng.integers(1, MAX_NEW + 1))).tolist()
    return prompts, responses


def sorted_pairs(ids, logprobs):
    return sorted(zip((-np.asarray(logprobs, np.float64)).tolist(), np.asarray(ids).tolist()))


def loop_cache(lang, prompt, response, p, max_k=None):
    """Slow reference: one teacher call and one top_p_sparse per state s_t = prompt + response[:t]."""
    states = []
    for t in range(len(response) + 1):
        prefix = list(prompt) + list(response[:t])
        logits = lang.next_token_logits(torch.tensor([prefix]), torch.tensor([len(prefix)]))[0]
        sets = top_p_sparse(logits, p, max_k=max_k)
        n = int(sets.sizes)
        states.append((sets.ids[:n].numpy(), sets.logprobs[:n].numpy()))
    return states


@pytest.mark.parametrize("p, max_k, batch_size", [(0.8, None, 32), (0.95, None, 3), (1.0, None, 5), (0.95, 2, 4)])
def test_compute_top_p_cache_matches_per_state_loop(lang, p, max_k, batch_size):
    prompts, responses = trajectories(lang, 10, seed=int(p * 100) + batch_size)
    caches = compute_top_p_cache(lang, prompts, responses, p, batch_size=batch_size, max_k=max_k)
    assert len(caches) == len(prompts)
    for prompt, resp, cache in zip(prompts, responses, caches):
        assert cache.ids.dtype == np.int32 and cache.logprobs.dtype == np.float16
        assert cache.sizes.shape == (len(resp) + 1,)
        assert cache.ids.shape == cache.logprobs.shape == (int(cache.sizes.sum()),)
        ref = loop_cache(lang, prompt, resp, p, max_k)
        offset = 0
        for t, (ids, lps) in enumerate(ref):
            n = int(cache.sizes[t])
            assert n == len(ids), f"state {t}: set size {n} vs {len(ids)}"
            got_ids, got_lps = cache.ids[offset : offset + n], cache.logprobs[offset : offset + n]
            offset += n
            # Same members with the same log-probs (ties among equal log-probs may be listed in any order) ...
            assert sorted_pairs(got_ids, got_lps) == sorted_pairs(ids, lps.astype(np.float16))
            # ... stored in descending probability.
            assert np.all(np.diff(got_lps.astype(np.float32)) <= 0)
        if max_k is not None:
            assert cache.sizes.max() <= max_k


def test_compute_top_p_cache_is_independent_of_batching(lang):
    prompts, responses = trajectories(lang, 9, seed=1)
    a = compute_top_p_cache(lang, prompts, responses, 0.9, batch_size=1)
    b = compute_top_p_cache(lang, prompts, responses, 0.9, batch_size=64)
    for x, y in zip(a, b):
        assert np.array_equal(x.sizes, y.sizes)
        for t0, n in zip(np.cumsum(x.sizes) - x.sizes, x.sizes):
            assert sorted_pairs(x.ids[t0 : t0 + n], x.logprobs[t0 : t0 + n]) == sorted_pairs(
                y.ids[t0 : t0 + n], y.logprobs[t0 : t0 + n])


def test_compute_top_p_cache_rejects_bad_p(lang):
    with pytest.raises(ValueError, match="p"):
        compute_top_p_cache(lang, [[1]], [[2]], 0.0)


def test_right_pad():
    tokens, lengths = right_pad([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1]


# ------------------------------------------------------------------------------------------------
# Sharded, resumable generation
# ------------------------------------------------------------------------------------------------
def generate(lang, out_dir, prompts, sampler=None, manifest=MANIFEST, **kw):
    args = dict(samples_per_prompt=2, cache_top_p=0.9, shard_prompts=4, seed=3, progress=False)
    args.update(kw)
    return generate_teacher_data(lang, sampler or sampler_for(lang), prompts, str(out_dir), manifest=manifest, **args)


def assert_buffers_equal(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert len(a) == len(b)
    assert a.pad_id == b.pad_id and a.cache_top_p == b.cache_top_p
    for name in ("prompts", "responses", "rewards"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert np.array_equal(x, y)
    for name in ("terminated", "truncated", "is_expert"):
        assert getattr(a, name) == getattr(b, name)
    for x, y in zip(a.caches, b.caches):
        for f in ("sizes", "ids", "logprobs"):
            assert np.array_equal(getattr(x, f), getattr(y, f))


@pytest.fixture(scope="module")
def prompts(lang):
    return lang.sample_prompts(10, np.random.default_rng(11))


def test_generate_and_load_round_trip(lang, prompts, tmp_path):
    out = tmp_path / "data"
    buf = generate(lang, out, prompts)
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors",
                                       "shard-00002.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    for k, v in MANIFEST.items():
        assert manifest[k] == v
    assert manifest["n_shards"] == 3 and manifest["n_prompts"] == 10 and manifest["cache_top_p"] == 0.9
    # Contents: each prompt twice, in order, every trajectory expert data with the teacher's cache.
    assert len(buf) == 20
    assert [p.tolist() for p in buf.prompts] == [list(p) for p in prompts for _ in range(2)]
    assert all(buf.is_expert)
    for resp, term, trunc in zip(buf.responses, buf.terminated, buf.truncated):
        assert term == (resp[-1] == lang.eos_token_id) and trunc == (not term) and (term or len(resp) == MAX_NEW)
    expected = compute_top_p_cache(lang, [p.tolist() for p in buf.prompts], [r.tolist() for r in buf.responses], 0.9)
    for got, want in zip(buf.caches, expected):
        assert np.array_equal(got.sizes, want.sizes) and np.array_equal(got.ids, want.ids)
        assert np.array_equal(got.logprobs, want.logprobs)
    loaded = load_teacher_data(str(out))
    assert_buffers_equal(buf, loaded)
    assert_buffers_equal(buf, load_teacher_data(str(out), manifest=MANIFEST))
    # The shard seeds make the data a function of the settings: regenerating elsewhere gives the same data.
    assert_buffers_equal(buf, generate(lang, tmp_path / "again", prompts))
    assert not any(".tmp" in name for name in os.listdir(out))


def test_interrupted_generation_resumes_without_rewriting_done_shards(lang, prompts, tmp_path):
    reference = generate(lang, tmp_path / "uninterrupted", prompts)
    out = tmp_path / "data"
    good = sampler_for(lang)
    calls = []

    def flaky(ps, seed):
        calls.append(seed)
        if len(calls) > 1:
            raise RuntimeError("killed after the first shard")
        return good(ps, seed)

    with pytest.raises(RuntimeError, match="killed"):
        generate(lang, out, prompts, sampler=flaky)
    first = out / "shard-00000.safetensors"
    assert first.exists() and not (out / "shard-00001.safetensors").exists()
    assert not any(".tmp" in name for name in os.listdir(out))
    with pytest.raises(FileNotFoundError, match="resume"):
        load_teacher_data(str(out))
    stat_before, bytes_before = first.stat(), first.read_bytes()
    time.sleep(0.05)

    seeds = []

    def recording(ps, seed):
        seeds.append(seed)
        return good(ps, seed)

    resumed = generate(lang, out, prompts, sampler=recording)
    stat_after = first.stat()
    assert stat_after.st_mtime_ns == stat_before.st_mtime_ns and stat_after.st_ino == stat_before.st_ino
    assert first.read_bytes() == bytes_before
    assert seeds == [3 * 1_000_003 + 1, 3 * 1_000_003 + 2]  # only the missing shards were sampled
    assert_buffers_equal(resumed, reference)
    assert_buffers_equal(load_teacher_data(str(out)), reference)
    # A complete dataset reruns without sampling at all.
    seeds.clear()
    assert_buffers_equal(generate(lang, out, prompts, sampler=recording), reference)
    assert seeds == []


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(manifest={**MANIFEST, "teacher": "another-teacher"}), "teacher"),
        (dict(manifest={**MANIFEST, "temperature": 0.7}), "temperature"),
        (dict(cache_top_p=0.8), "cache_top_p"),
        (dict(samples_per_prompt=3), "samples_per_prompt"),
        (dict(seed=4), "seed"),
        (dict(shard_prompts=5), "shard_prompts"),
    ],
)
def test_manifest_mismatch_raises_naming_the_key(lang, prompts, tmp_path, change, key):
    out = tmp_path / "data"
    generate(lang, out, prompts[:4])
    files_before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=key) as err:
        generate(lang, out, prompts[:4], **change)
    assert "stored" in str(err.value) and "requested" in str(err.value)
    assert sorted(os.listdir(out)) == files_before  # nothing written on mismatch


def test_manifest_mismatch_on_load_and_different_prompt_count(lang, prompts, tmp_path):
    out = tmp_path / "data"
    generate(lang, out, prompts[:4])
    with pytest.raises(ValueError, match="teacher"):
        load_teacher_data(str(out), manifest={"teacher": "another-teacher"})
    with pytest.raises(ValueError, match="n_prompts"):
        generate(lang, out, prompts[:6])
    # Keys that agree do not raise.
    assert len(load_teacher_data(str(out), manifest={"teacher": MANIFEST["teacher"]})) == 8


def test_missing_shard_on_load_raises_with_resume_hint(lang, prompts, tmp_path):
    out = tmp_path / "data"
    generate(lang, out, prompts)
    os.remove(out / "shard-00001.safetensors")
    with pytest.raises(FileNotFoundError, match="resume") as err:
        load_teacher_data(str(out))
    assert "shard-00001" in str(err.value)
    # Rerunning the generation fills the hole.
    generate(lang, out, prompts)
    assert len(load_teacher_data(str(out))) == 20


def test_load_without_manifest_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_teacher_data(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------------
# Top-p sets from the sampling pass (one teacher pass) vs the teacher-forced cache pass (two passes)
# ------------------------------------------------------------------------------------------------
def _hf_teacher_and_sampler(temperature: float, top_p: float):
    from tests.conftest import tiny_llama
    from tests.test_models import word_tokenizer
    from tokenrl.lm.models import HFTeacher
    from tokenrl.lm.sampling import TeacherSampler

    tokenizer = word_tokenizer()
    # Three padded embedding rows (sliced off by both passes); a larger init gives instruct-LM-like peaked sets.
    model = tiny_llama(len(tokenizer) + 3, seed=2, num_hidden_layers=2, initializer_range=0.3,
                       eos_token_id=3, pad_token_id=1, bos_token_id=2)
    with torch.no_grad():
        model.lm_head.weight[3] *= 3.0  # EOS likely enough that some responses terminate and others truncate
    teacher = HFTeacher(model.eval(), tokenizer, max_batch=3)
    sampler = TeacherSampler(model, MAX_NEW, teacher.eos_token_id, teacher.pad_token_id, temperature=temperature,
                             top_p=top_p, batch_size=3, vocab_size=teacher.vocab_size)
    return teacher, sampler


def assert_caches_close(got, want) -> None:
    """Same sets (members per state) and log-probs equal to float16 rounding of float32 noise."""
    assert np.array_equal(got.sizes, want.sizes)
    for t0, n in zip(np.cumsum(want.sizes) - want.sizes, want.sizes):
        order_got, order_want = np.argsort(got.ids[t0 : t0 + n]), np.argsort(want.ids[t0 : t0 + n])
        assert np.array_equal(got.ids[t0 : t0 + n][order_got], want.ids[t0 : t0 + n][order_want])
        np.testing.assert_allclose(got.logprobs[t0 : t0 + n][order_got].astype(np.float32),
                                   want.logprobs[t0 : t0 + n][order_want].astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("temperature, top_p, cache_p", [(1.0, 1.0, 0.8), (0.7, 0.9, 0.95), (1.0, 0.8, 1.0)])
def test_sampling_pass_sets_equal_the_teacher_forced_pass(temperature, top_p, cache_p, tmp_path):
    teacher, sampler = _hf_teacher_and_sampler(temperature, top_p)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(4, teacher.vocab_size, size=int(rng.integers(1, 6))).tolist() for _ in range(5)]

    def two_pass_sampler(ps, seed):  # a plain Sampler: generate_teacher_data then runs compute_top_p_cache
        return sampler(ps, seed)

    kw = dict(samples_per_prompt=2, cache_top_p=cache_p, shard_prompts=2, seed=1, progress=False, cache_batch_size=4,
              pad_id=teacher.pad_token_id)
    one = generate_teacher_data(teacher, sampler, prompts, str(tmp_path / "one"), manifest=MANIFEST, **kw)
    two = generate_teacher_data(teacher, two_pass_sampler, prompts, str(tmp_path / "two"), manifest=MANIFEST, **kw)
    assert len(one) == len(two) == 10
    for name in ("prompts", "responses"):
        assert all(np.array_equal(x, y) for x, y in zip(getattr(one, name), getattr(two, name)))
    assert one.terminated == two.terminated and one.truncated == two.truncated
    assert any(one.terminated) and not all(one.terminated), "the case needs both terminated and truncated responses"
    for got, want, response in zip(one.caches, two.caches, one.responses):
        assert got.sizes.shape == (len(response) + 1,) and got.ids.dtype == np.int32 and got.logprobs.dtype == np.float16
        assert_caches_close(got, want)
    # Directly against compute_top_p_cache too, with the samples of the plain call (the sampling is unchanged).
    samples, caches = sampler.with_top_p_cache(prompts, 7, cache_p)
    assert samples == sampler(prompts, 7)
    for got, want in zip(caches, compute_top_p_cache(teacher, prompts, [r for r, _ in samples], cache_p, pad_id=1)):
        assert_caches_close(got, want)


def test_data_of_an_older_format_is_refused_with_the_fix(lang, prompts, tmp_path):
    out = tmp_path / "data"
    generate(lang, out, prompts)
    edit_manifest(out, format=2)
    with pytest.raises(ValueError, match=r"data format 2.*format 3.*delete the folder"):
        load_teacher_data(str(out))
    with pytest.raises(ValueError, match=r"data format 2.*regenerate"):
        generate(lang, out, prompts)
