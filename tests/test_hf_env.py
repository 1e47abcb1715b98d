"""The token env and the top-p wrapper on a real (tiny) transformers teacher, with and without KV cache."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gymnasium.utils.env_checker import check_env

from envs import BatchedTokenGenerationEnv, TokenGenerationEnv, TopPActionWrapper
from tokenrl.core.top_p import top_p_restricted_policy
from tests.test_models import tiny_llama, word_tokenizer
from tokenrl.lm.models import HFTeacher, IncrementalTeacher
from tokenrl.core.top_p import top_p_mask


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
