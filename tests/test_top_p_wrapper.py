"""TopPActionWrapper (info["action_mask"] = the teacher's top-p set) and the batched top-p helpers."""

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs.token_env import BatchedTokenGenerationEnv, TokenGenerationEnv
from envs.top_p_wrapper import TopPActionWrapper
from tokenrl.core.top_p import (
    restrict_logits_to_top_p,
    teacher_top_p_set,
    top_p_mask,
    top_p_restricted_policy,
    top_p_sparse,
)

EOS = 0
PROMPT = [3, 17, 5, 9]


def make_wrapped(teacher, p=0.8, on_outside="flag", max_new_tokens=6, max_prompt_len=8, prompt_sampler=None):
    def sample_synthetic_prompt(rng):
        return teacher.sample_prompts(1, rng)[0]

    env = TokenGenerationEnv(
        teacher.vocab_size,
        teacher.eos_token_id,
        max_new_tokens,
        max_prompt_len,
        prompt_sampler=prompt_sampler or sample_synthetic_prompt,
    )
    return TopPActionWrapper(env, teacher, p, on_outside=on_outside)


def check_env_strict(env):
    """check_env with every warning an error, except the advice to check the unwrapped env: checking the
    wrapper itself is the point (gymnasium allows it; the set logic lives in the wrapper)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=r".*different from the unwrapped version")
        check_env(env, skip_render_check=True)


def exact_mask(lang, tokens, p):
    tokens_1T = torch.tensor([tokens])
    return top_p_mask(lang.next_token_logits(tokens_1T, torch.tensor([len(tokens)])), p)[0]


@pytest.mark.parametrize("on_outside", ["flag", "project"])
def test_check_env_passes_on_the_wrapper(lang, on_outside):
    check_env_strict(make_wrapped(lang, on_outside=on_outside))


def test_action_mask_is_the_exact_top_p_set_of_the_current_prefix(lang):
    env = make_wrapped(lang, p=0.8, max_new_tokens=5)
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=0, options={"prompt": PROMPT})
    tokens = list(PROMPT)
    for _ in range(5):
        mask = exact_mask(lang, tokens, 0.8)
        assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (lang.vocab_size,)
        np.testing.assert_array_equal(info["action_mask"], mask.numpy().astype(np.int8))
        logprobs = lang.next_token_logits(torch.tensor([tokens]), torch.tensor([len(tokens)]))[0].numpy()
        ids = np.asarray(info["top_p_ids"])
        assert sorted(info["top_p_ids"]) == mask.nonzero().flatten().tolist()
        np.testing.assert_allclose(info["top_p_logprobs"], logprobs[ids], atol=1e-6)
        assert (np.diff(info["top_p_logprobs"]) <= 0).all()
        action = int(rng.choice(ids[ids != EOS]))
        obs, _, terminated, truncated, info = env.step(action)
        assert info["action_in_top_p"] is True
        tokens.append(action)
    assert truncated and not terminated
    # A truncated state is bootstrapped, so its set is still reported.
    np.testing.assert_array_equal(info["action_mask"], exact_mask(lang, tokens, 0.8).numpy().astype(np.int8))


def test_p_one_allows_every_token_and_termination_empties_the_set(lang):
    env = make_wrapped(lang, p=1.0)
    _, info = env.reset(seed=0, options={"prompt": PROMPT})
    assert info["action_mask"].all()  # smoothing puts mass on every token
    _, _, terminated, _, info = env.step(EOS)
    assert terminated and not info["action_mask"].any() and info["top_p_ids"] == []


def outside_action(info):
    return int(np.flatnonzero(info["action_mask"] == 0)[0])


def test_flag_steps_an_outside_action_and_reports_it(lang):
    env = make_wrapped(lang, on_outside="flag")
    _, info = env.reset(seed=0, options={"prompt": PROMPT})
    action = outside_action(info)
    obs, _, _, _, info = env.step(action)
    assert info["action_in_top_p"] is False and "projected_action" not in info
    assert obs["tokens"][obs["length"] - 1] == action


def test_project_draws_the_replacement_from_the_projected_teacher(lang):
    env = make_wrapped(lang, on_outside="project")
    _, info = env.reset(seed=0, options={"prompt": PROMPT})
    ids, logprobs = info["top_p_ids"], np.asarray(info["top_p_logprobs"])
    action = outside_action(info)
    counts = dict.fromkeys(ids, 0)
    n = 2000
    for _ in range(n):
        env.reset(options={"prompt": PROMPT})
        obs, _, _, _, info = env.step(action)
        assert info["action_in_top_p"] is False
        assert obs["tokens"][obs["length"] - 1] == info["projected_action"]
        counts[info["projected_action"]] += 1
    projected = np.exp(logprobs.astype(np.float64)) / np.exp(logprobs.astype(np.float64)).sum()
    freqs = np.array([counts[i] for i in ids]) / n
    np.testing.assert_allclose(freqs, projected, atol=4 * np.sqrt(0.25 / n))
    # Inside actions are never replaced.
    env.reset(options={"prompt": PROMPT})
    _, _, _, _, info = env.step(int(ids[-1]))
    assert info["action_in_top_p"] is True and "projected_action" not in info


def test_raise_rejects_an_outside_action_without_stepping(lang):
    env = make_wrapped(lang, on_outside="raise")
    _, info = env.reset(seed=0, options={"prompt": PROMPT})
    action, size = outside_action(info), int(info["action_mask"].sum())
    with pytest.raises(ValueError, match=rf"action {action} is outside .*{size} tokens"):
        env.step(action)
    obs, _, _, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
    assert obs["length"] == len(PROMPT) + 1 and info["action_in_top_p"] is True


def test_wrapper_validates_its_arguments_and_use(lang):
    for p in (0.0, 1.5, "x"):
        with pytest.raises(ValueError, match="top-p threshold"):
            make_wrapped(lang, p=p)
    with pytest.raises(ValueError, match="on_outside"):
        make_wrapped(lang, on_outside="clip")
    small = TokenGenerationEnv(32, EOS, 4, 8)
    with pytest.raises(ValueError, match="vocab_size"):
        TopPActionWrapper(small, lang, 0.8)
    env = make_wrapped(lang, on_outside="project")
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(1)
    env.reset(seed=0, options={"prompt": PROMPT})
    with pytest.raises(ValueError, match="not a token id"):
        env.step(lang.vocab_size)  # out of range must not be "projected" into the set
    env = make_wrapped(lang, on_outside="flag")
    env.reset(seed=0, options={"prompt": PROMPT})
    env.step(EOS)
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(1)


def test_teacher_top_p_set_and_restriction_match_top_p(lang):
    prompts = lang.sample_prompts(6, np.random.default_rng(0))
    env = BatchedTokenGenerationEnv(lang.vocab_size, EOS, 4, 8)
    obs, _ = env.reset(prompts)
    logits_BV = lang.next_token_logits(obs["tokens_BL"], obs["lengths_B"])
    top = teacher_top_p_set(lang, obs["tokens_BL"], obs["lengths_B"], 0.8)
    expected = top_p_sparse(logits_BV, 0.8)
    assert torch.equal(top.ids, expected.ids) and torch.equal(top.mask, expected.mask)

    student_logits_BV = torch.randn(6, lang.vocab_size)
    restricted_BV = restrict_logits_to_top_p(student_logits_BV, logits_BV, 0.8)
    keep_BV = top_p_mask(logits_BV, 0.8)
    assert torch.equal(restricted_BV[keep_BV], student_logits_BV[keep_BV])
    assert torch.isneginf(restricted_BV[~keep_BV]).all()
    with pytest.raises(ValueError, match="same shape"):
        restrict_logits_to_top_p(student_logits_BV, logits_BV[:3], 0.8)


def test_restricted_rollout_stays_inside_the_teacher_set(lang):
    p, max_new = 0.5, 10
    calls = []

    def student_logits_fn(tokens_BL, lengths_B):
        calls.append(1)
        return torch.zeros(tokens_BL.shape[0], lang.vocab_size)  # uniform student

    env = BatchedTokenGenerationEnv(lang.vocab_size, EOS, max_new, 8, batch_size=64, prompt_sampler=lang.sample_prompts)
    traj = env.rollout(top_p_restricted_policy(student_logits_fn, lang.next_token_logits, p), seed=0)
    assert len(calls) == max(len(r) for r in traj.responses)
    for prompt, response in zip(traj.prompts, traj.responses):
        for t, action in enumerate(response):
            assert exact_mask(lang, prompt + response[:t], p)[action]


class TinyLlamaTeacher:
    """Minimal Teacher over a randomly initialised 1-layer Llama (no KV cache; tokenrl.lm.models has the real one)."""

    vocab_size = 64
    eos_token_id = 0

    def __init__(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        )
        self.model = LlamaForCausalLM(config).eval()

    @torch.no_grad()
    def sequence_logits(self, tokens_BL, lengths_B):
        attention_mask_BT = torch.arange(tokens_BL.shape[1])[None, :] < lengths_B[:, None]
        return self.model(input_ids=tokens_BL, attention_mask=attention_mask_BT.long()).logits

    def next_token_logits(self, tokens_BL, lengths_B):
        # Right padding: the last real token of row b sits at lengths_B[b] - 1.
        return self.sequence_logits(tokens_BL, lengths_B)[torch.arange(tokens_BL.shape[0]), lengths_B - 1]


def test_check_env_with_a_tiny_transformers_teacher():
    teacher = TinyLlamaTeacher()
    padded = teacher.next_token_logits(torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([3, 2]))
    alone = teacher.next_token_logits(torch.tensor([[5, 6]]), torch.tensor([2]))
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-4, atol=1e-5)

    def random_prompt(rng):
        return rng.integers(1, teacher.vocab_size, size=int(rng.integers(1, 9))).tolist()

    env = make_wrapped(teacher, p=0.8, prompt_sampler=random_prompt)
    check_env_strict(env)
    _, info = env.reset(seed=0, options={"prompt": [5, 6]})
    np.testing.assert_array_equal(info["action_mask"], top_p_mask(alone, 0.8)[0].numpy().astype(np.int8))
