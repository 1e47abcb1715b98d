"""Token generation as a Gymnasium MDP, one sequence at a time (the batch in lock-step: :mod:`envs.batched_env`).

State ``s_t`` = the prompt followed by the tokens generated so far; action ``a_t`` = the next token id; the
transition appends it. Emitting EOS terminates the episode (the terminal state has value 0); reaching
``max_new_tokens`` without EOS truncates it (that last state is bootstrapped like any other). The reward is
pluggable and 0 by default: in distillation the teacher is the expert and the reward is unknown.

:class:`TokenGenerationEnv` is the single-sequence ``gymnasium.Env`` (what wrappers and ``check_env`` see);
:func:`set_sizes` and :func:`validate_prompt` check what every token env takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.checks import check_step, reset_options

RewardFn = Callable[[np.ndarray, int, bool], float]
"""``reward_fn(tokens, action, terminated) -> reward`` of :class:`TokenGenerationEnv`; ``tokens`` is the
state the action is taken in (prompt + response so far, before the action)."""


def set_sizes(
    env, vocab_size: int, eos_token_id: int, max_new_tokens: int, max_prompt_len: int, pad_token_id: int | None
) -> None:
    """Check the sizes every token env takes and set them on ``env``: ``vocab_size``, ``eos_token_id``,
    ``max_new_tokens``, ``max_prompt_len``, ``max_len`` (prompt and response) and ``pad_token_id`` (EOS when None).

    Raises:
        ValueError: naming the bad argument.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (EOS and at least one other token), got {vocab_size}")
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is not a token id in [0, {vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    # Padding must be a valid id so padded token arrays stay inside the observation space and gathers stay in range.
    if not 0 <= pad < vocab_size:
        raise ValueError(f"pad_token_id={pad} is not a token id in [0, {vocab_size})")
    env.vocab_size, env.eos_token_id, env.pad_token_id = vocab_size, eos_token_id, pad
    env.max_new_tokens, env.max_prompt_len, env.max_len = max_new_tokens, max_prompt_len, max_prompt_len + max_new_tokens


def validate_prompt(prompt: Sequence[int] | np.ndarray, vocab_size: int, max_prompt_len: int) -> np.ndarray:
    """Return ``prompt`` as an int64 array, or raise ValueError naming what is wrong with it."""
    arr = np.asarray(prompt)
    if arr.ndim != 1:
        raise ValueError(f"a prompt must be a flat sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("a prompt must hold at least one token (the first action is conditioned on it)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt token ids must be integers, got dtype {arr.dtype}")
    if arr.size > max_prompt_len:
        raise ValueError(f"prompt has {arr.size} tokens, more than max_prompt_len={max_prompt_len}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


class TokenGenerationEnv(gym.Env):
    """One prompt, one response, one token per step.

    Observation (a dict; token arrays have fixed width ``T = max_prompt_len + max_new_tokens``):
        ``tokens``: ``[T]`` int64, prompt + response so far, then ``pad_token_id``.
        ``length``: number of real tokens in ``tokens``.
        ``prompt_length``: number of prompt tokens.

    Action: a token id in ``Discrete(vocab_size)``. ``terminated`` is True when the action is EOS (EOS is kept
    as the last response token); ``truncated`` is True when the response reaches ``max_new_tokens`` tokens
    without EOS. Reset info and step info hold ``prompt_length``.

    Args:
        vocab_size: number of token ids.
        eos_token_id: the token that ends a response.
        max_new_tokens: response budget; the episode truncates after this many tokens.
        max_prompt_len: longest accepted prompt.
        prompts: optional fixed prompts; ``reset`` draws one uniformly with ``self.np_random``.
        prompt_sampler: optional ``prompt_sampler(np_random) -> list[int]`` drawing a prompt, e.g.
            ``lambda rng: lang.sample_prompts(1, rng)[0]``. Give at most one of ``prompts`` and
            ``prompt_sampler``; with neither, every reset needs ``options={"prompt": [...]}``.
        reward_fn: ``reward_fn(tokens, action, terminated) -> float`` where ``tokens`` is a copy of the state
            the action is taken in (prompt + response before the action). Default: reward 0.
        pad_token_id: id used for padding in ``tokens`` (default: ``eos_token_id``).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int,
        max_new_tokens: int,
        max_prompt_len: int,
        prompts: Sequence[Sequence[int]] | None = None,
        prompt_sampler: Callable[[np.random.Generator], Sequence[int]] | None = None,
        reward_fn: RewardFn | None = None,
        pad_token_id: int | None = None,
    ):
        set_sizes(self, vocab_size, eos_token_id, max_new_tokens, max_prompt_len, pad_token_id)
        if prompts is not None and prompt_sampler is not None:
            raise ValueError("give at most one of prompts and prompt_sampler")
        if prompts is not None and len(prompts) == 0:
            raise ValueError("prompts is empty; pass None to supply prompts through reset(options={'prompt': ...})")
        self._prompts = None if prompts is None else [validate_prompt(p, vocab_size, max_prompt_len) for p in prompts]
        self._prompt_sampler = prompt_sampler
        self._reward_fn = reward_fn
        self.action_space = spaces.Discrete(vocab_size)
        self.observation_space = spaces.Dict(
            {
                "tokens": spaces.MultiDiscrete(np.full(self.max_len, vocab_size), dtype=np.int64),
                "length": spaces.Discrete(self.max_len + 1),
                "prompt_length": spaces.Discrete(max_prompt_len + 1),
            }
        )
        self._tokens = np.full(self.max_len, self.pad_token_id, dtype=np.int64)
        self._length = 0
        self._prompt_length = 0
        self._has_reset = False
        self._episode_over = False

    @property
    def tokens(self) -> np.ndarray:
        """Copy of the current prompt + response (no padding)."""
        return self._tokens[: self._length].copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start an episode from ``options["prompt"]`` if given, else from the configured prompt source.

        Raises:
            ValueError: on unknown option keys, an invalid prompt, or no prompt source at all.
        """
        super().reset(seed=seed)
        options = reset_options(options, "prompt")
        if "prompt" in options:
            prompt = options["prompt"]
        elif self._prompt_sampler is not None:
            prompt = self._prompt_sampler(self.np_random)
        elif self._prompts is not None:
            prompt = self._prompts[int(self.np_random.integers(len(self._prompts)))]
        else:
            raise ValueError(
                "no prompt to start from: pass prompts= or prompt_sampler= to the constructor, "
                "or options={'prompt': [...]} to reset()"
            )
        prompt = validate_prompt(prompt, self.vocab_size, self.max_prompt_len)
        self._tokens.fill(self.pad_token_id)
        self._tokens[: prompt.size] = prompt
        self._length = self._prompt_length = prompt.size
        self._has_reset = True
        self._episode_over = False
        return self._obs(), {"prompt_length": self._prompt_length}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Append ``action`` to the sequence.

        Raises:
            RuntimeError: before the first reset or after the episode ended.
            ValueError: if ``action`` is not a token id.
        """
        check_step(self._has_reset, self._episode_over, self.action_space, action, "a token id")
        action = int(action)
        terminated = action == self.eos_token_id
        reward = 0.0 if self._reward_fn is None else float(self._reward_fn(self.tokens, action, terminated))
        self._tokens[self._length] = action
        self._length += 1
        truncated = not terminated and self._length - self._prompt_length == self.max_new_tokens
        self._episode_over = terminated or truncated
        return self._obs(), reward, terminated, truncated, {"prompt_length": self._prompt_length}

    def _obs(self) -> dict[str, Any]:
        # A fresh array every call: callers keep observations (replay buffers), so they must not alias state.
        return {
            "tokens": self._tokens.copy(),
            "length": np.int64(self._length),
            "prompt_length": np.int64(self._prompt_length),
        }
