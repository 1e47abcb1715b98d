"""The teacher's top-p action set A_p(s) as a Gymnasium action mask, and its batched counterparts.

The top-p MDP M_p keeps the states, transitions and reward of the token MDP but allows only the actions in
A_p(s), the nucleus of the teacher's next-token distribution at s. :class:`TopPActionWrapper` exposes A_p(s)
of the current state in ``info`` after every reset and step, and decides what an action outside it does.
Set selection is always :mod:`tokenrl.core.top_p`, which also holds the batched forms used by vectorised
rollouts (``teacher_top_p_set``, ``restrict_logits_to_top_p``, ``top_p_restricted_policy``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.checks import check_step
from tokenrl.core.distributions import project_to_set
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import check_p, top_p_sparse

ON_OUTSIDE_CHOICES = ("flag", "project", "raise")


class TopPActionWrapper(gym.Wrapper):
    """Expose the teacher's top-p set of the current state and police actions outside it.

    After ``reset`` and every ``step``, ``info`` holds the set of the new state:
        ``action_mask``: ``[V]`` int8, 1 for tokens in the set (the Gymnasium convention).
        ``top_p_ids``: the K token ids of the set in descending teacher probability (a list of int).
        ``top_p_logprobs``: the teacher log-probabilities of those ids (full distribution, not renormalised; a
        list of float).
    The set's entries are lists because K changes from state to state: Gymnasium's vector envs batch an
    array info entry only when every env's has the same shape, and keep other objects in an object array.
    After a terminating step (EOS) no action exists, so the mask is all zeros and the set empty (and the teacher
    is not called). A truncated state keeps its set: its value is bootstrapped over it.

    ``step`` also reports ``info["action_in_top_p"]`` for the action it was given. An action outside the set is
    handled by ``on_outside``: ``"flag"`` steps it anyway; ``"project"`` replaces it by a token drawn with
    ``self.np_random`` from the teacher's distribution projected onto the set, reported as
    ``info["projected_action"]``; ``"raise"`` raises ValueError without stepping.

    Args:
        env: a token env whose observations hold ``tokens`` (padded ids) and ``length`` (real tokens), such as
            :class:`envs.token_env.TokenGenerationEnv`.
        teacher: the :class:`tokenrl.core.teachers.Teacher` defining the sets; same vocabulary as ``env``.
        p: top-p threshold in (0, 1].
        on_outside: one of ``"flag"``, ``"project"``, ``"raise"``.
    """

    def __init__(self, env: gym.Env, teacher: Teacher, p: float, on_outside: str = "flag"):
        super().__init__(env)
        self.p = check_p(p)
        if on_outside not in ON_OUTSIDE_CHOICES:
            raise ValueError(f"on_outside must be one of {ON_OUTSIDE_CHOICES}, got {on_outside!r}")
        if teacher.vocab_size != env.action_space.n:
            raise ValueError(
                f"teacher vocab_size={teacher.vocab_size} differs from the env's {env.action_space.n} actions"
            )
        self.teacher = teacher
        self.on_outside = on_outside
        self._set_ids: np.ndarray | None = None
        self._set_logprobs: np.ndarray | None = None
        self._episode_over = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset the env and add the top-p set of the initial state to ``info``."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode_over = False
        return obs, {**info, **self._update_set(obs, terminated=False)}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Step the env, applying the ``on_outside`` rule, and add the next state's top-p set to ``info``.

        Raises:
            RuntimeError: before reset or after the episode ended.
            ValueError: if ``action`` is not a token id, or (``on_outside="raise"``) is outside the set.
        """
        check_step(self._set_ids is not None, self._episode_over, self.action_space, action, "a token id")
        in_top_p = bool(np.any(self._set_ids == int(action)))
        extra: dict[str, Any] = {"action_in_top_p": in_top_p}
        if not in_top_p and self.on_outside == "raise":
            raise ValueError(
                f"action {int(action)} is outside the teacher's top-p set (p={self.p}, "
                f"{self._set_ids.size} tokens: {self._set_ids.tolist()[:10]}{'...' if self._set_ids.size > 10 else ''})"
            )
        if not in_top_p and self.on_outside == "project":
            probs_K = project_to_set(torch.from_numpy(self._set_logprobs.astype(np.float64)), log=False).numpy()
            action = int(self._set_ids[self.np_random.choice(self._set_ids.size, p=probs_K)])
            extra["projected_action"] = action
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._episode_over = terminated or truncated
        return obs, reward, terminated, truncated, {**info, **extra, **self._update_set(obs, terminated)}

    def _update_set(self, obs: dict[str, Any], terminated: bool) -> dict[str, np.ndarray]:
        """Store the top-p set of the state in ``obs`` and return it as fresh ``info`` entries."""
        if terminated:
            ids = np.zeros(0, dtype=np.int64)
            logprobs = np.zeros(0, dtype=np.float32)
        else:
            length = int(obs["length"])
            tokens_1T = torch.as_tensor(obs["tokens"][:length], dtype=torch.long).unsqueeze(0)
            logits_1V = self.teacher.next_token_logits(tokens_1T, torch.tensor([length]))
            # A batch of one has no padding: K equals the set size.
            top = top_p_sparse(logits_1V.detach().cpu(), self.p)
            ids = top.ids[0].numpy().astype(np.int64)
            logprobs = top.logprobs[0].numpy().astype(np.float32)
        self._set_ids, self._set_logprobs = ids, logprobs
        mask = np.zeros(self.action_space.n, dtype=np.int8)
        mask[ids] = 1
        return {"action_mask": mask, "top_p_ids": ids.tolist(), "top_p_logprobs": logprobs.tolist()}
