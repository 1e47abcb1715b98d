"""The argument checks that open ``reset`` and ``step`` in every env here (Gymnasium's call contract)."""

from __future__ import annotations

from typing import Any

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
