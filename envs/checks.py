"""The argument checks of the envs here: the sizes and prompts a token env takes, and the checks that open ``reset``
and ``step`` in every env (Gymnasium's call contract)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces


def reset_options(options: dict[str, Any] | None, allowed: str) -> dict[str, Any]:
    """``options`` (None as ``{}``) once it is known to hold no key but the env's one reset option.

    Raises:
        ValueError: on any other key.
    """
    options = options or {}
    unknown = set(options) - {allowed}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; the only option is {allowed!r}")
    return options


def check_step(started: bool, episode_over: bool, action_space: spaces.Discrete, action: Any, what: str) -> None:
    """The preconditions of a single-episode ``step(action)``.

    Args:
        started: whether ``reset`` has been called.
        episode_over: whether the episode has terminated or been truncated.
        action_space: the env's action space.
        action: the action passed to ``step``.
        what: what an action is, for the message (``"a token id"``, ``"an action"``).

    Raises:
        RuntimeError: before reset or after the episode ended.
        ValueError: if ``action`` is not in ``action_space``.
    """
    if not started:
        raise RuntimeError("step() called before reset()")
    if episode_over:
        raise RuntimeError("step() called after the episode ended (terminated or truncated); call reset()")
    if not action_space.contains(action):
        raise ValueError(f"action {action!r} is not {what} in [0, {action_space.n})")


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
