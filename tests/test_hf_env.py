"""The token env, the top-p wrapper and ``tokenrl/HFDistill-v0`` on a real (tiny) transformers teacher."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import BatchedTokenGenerationEnv, TokenGenerationEnv, TopPActionWrapper
from tests.conftest import tiny_llama as conftest_llama
from tests.test_models import tiny_llama, word_tokenizer, write_tiny_llama_gguf
from tokenrl.lm.models import HFTeacher, IncrementalTeacher
from tokenrl.core.top_p import top_p_mask, top_p_restricted_policy


def _teacher():
    tok = word_tokenizer()
    return HFTeacher(tiny_llama(len(tok), layers=2), tok)


def test_check_env_with_transformers_teacher():
    teacher = _teacher()
    env = TokenGenerationEnv(
        vocab_size=teacher.vocab_size, eos_token_id=teacher.eos_token_id, max_new_tokens=5, max_prompt_len=4,
        prompt_sampler=lambda rng: rng.integers(4, teacher.vocab_size, size=3).tolist(),
    )
    wrapped = TopPActionWrapper(env, teacher, p=0.8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unwrapped.*")
        check_env(wrapped, skip_render_check=True)
    obs, info = wrapped.reset(seed=0)
    prefix = torch.as_tensor(obs["tokens"][: obs["length"]])[None]
    expected = top_p_mask(teacher.next_token_logits(prefix, torch.tensor([prefix.shape[1]])), 0.8)[0]
    assert np.array_equal(info["action_mask"].astype(bool), expected.numpy())


def test_incremental_teacher_matches_uncached_in_a_batched_rollout():
    teacher = _teacher()
    student = tiny_llama(teacher.vocab_size, layers=1, seed=3)

    def student_logits(tokens_BT, lengths_B):
        with torch.no_grad():
            out = student(input_ids=tokens_BT, attention_mask=(torch.arange(tokens_BT.shape[1])[None] < lengths_B[:, None]).long())
        return out.logits[torch.arange(len(lengths_B)), lengths_B - 1]

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    results = []
    calls = {"start": 0, "advance": 0}
    for cached in (False, True):
        t = IncrementalTeacher(teacher) if cached else teacher
        if cached:
            for name in ("start", "advance"):
                fn = getattr(teacher.stepper, name)
                setattr(teacher.stepper, name, lambda *a, _fn=fn, _n=name: (calls.__setitem__(_n, calls[_n] + 1), _fn(*a))[1])
        env = BatchedTokenGenerationEnv(teacher.vocab_size, teacher.eos_token_id, max_new_tokens=6, max_prompt_len=4)
        results.append(env.rollout(top_p_restricted_policy(student_logits, t.next_token_logits, 0.9), prompts=prompts, seed=0))
    plain, cached = results
    assert plain.responses == cached.responses and plain.terminated == cached.terminated
    assert calls["start"] == 1 and calls["advance"] >= 1  # one prompt encoding, then one cached step per env step


def _saved_teacher(tmp_path):
    """A tiny Llama teacher and its word tokenizer saved by save_pretrained (nothing comes from a hub)."""
    tok = word_tokenizer()
    model = conftest_llama(len(tok), seed=1, eos_token_id=3, pad_token_id=1, bos_token_id=2)
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), HFTeacher(model.eval(), tok)


def _first_legal(mask):
    return int(np.flatnonzero(mask)[0]) if mask.any() else 0


PROMPTS = ["the cat sat on the mat", "a dog ran under the rug", "the big red dog", "a small blue cat sat"]


def test_hf_distill_id_from_a_local_directory_passes_check_env_with_masks_and_rewards(tmp_path):
    path, oracle = _saved_teacher(tmp_path)
    env = gym.make("tokenrl/HFDistill-v0", teacher=path, prompts=PROMPTS, max_new_tokens=6, top_p=0.9)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unwrapped.*")
        check_env(env, skip_render_check=True)
    rng = np.random.default_rng(0)
    strict_subset = False
    for episode in range(3):
        obs, info = env.reset(seed=episode)
        done = False
        while not done:
            tokens_1T = torch.as_tensor(obs["tokens"][: obs["length"]])[None]
            logits_1V = oracle.next_token_logits(tokens_1T, torch.tensor([tokens_1T.shape[1]]))
            expected = top_p_mask(logits_1V, 0.9)[0].numpy()
            assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (oracle.vocab_size,)
            np.testing.assert_array_equal(info["action_mask"].astype(bool), expected)
            np.testing.assert_array_equal(env.get_wrapper_attr("action_masks")(), expected)
            strict_subset |= bool(expected.sum() < expected.size)
            action = int(rng.choice(np.flatnonzero(expected)))
            obs, reward, terminated, truncated, info = env.step(action)
            assert reward == pytest.approx(float(torch.log_softmax(logits_1V.double(), -1)[0, action]), abs=1e-5)
            done = terminated or truncated
    assert strict_subset


def test_hf_distill_make_vec_emits_masks_and_never_downloads(tmp_path):
    path, oracle = _saved_teacher(tmp_path)
    env = gym.make_vec(
        "tokenrl/HFDistill-v0", num_envs=3, vectorization_mode="vector_entry_point", teacher=path, prompts=PROMPTS,
        max_new_tokens=4,
    )
    obs, info = env.reset(seed=0)
    for _ in range(6):
        masks = env.action_masks()
        np.testing.assert_array_equal(info["action_mask"].astype(bool), masks)
        live = masks.any(1)  # rows whose observation is not a terminal state
        logits_BV = oracle.next_token_logits(torch.as_tensor(obs["tokens"]), torch.as_tensor(obs["length"]))
        np.testing.assert_array_equal(masks[live], top_p_mask(logits_BV, 0.8)[torch.as_tensor(live)].numpy())
        obs, rewards, terminated, truncated, info = env.step(np.array([_first_legal(m) for m in masks]))
        assert rewards.shape == (3,) and np.all(rewards <= 0)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        gym.make("tokenrl/HFDistill-v0", teacher="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="max_prompt_tokens=2"):
        gym.make("tokenrl/HFDistill-v0", teacher=path, prompts=PROMPTS, max_prompt_tokens=2)


def test_hf_distill_from_a_gguf_file(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    reference, _ = write_tiny_llama_gguf(gguf_path)
    env = gym.make("tokenrl/HFDistill-v0", teacher=gguf_path, prompts=[" the cat", " a the"], max_new_tokens=3)
    obs, info = env.reset(seed=0)
    tokens_1T = torch.as_tensor(obs["tokens"][: obs["length"]])[None]
    with torch.no_grad():
        logits_1V = reference(tokens_1T).logits[:, -1]
    np.testing.assert_array_equal(info["action_mask"].astype(bool), top_p_mask(logits_1V, 0.8)[0].numpy())
    action = int(np.flatnonzero(info["action_mask"])[0])
    _, reward, _, _, _ = env.step(action)
    assert reward == pytest.approx(float(torch.log_softmax(logits_1V.double(), -1)[0, action]), abs=1e-4)
