"""The toy tabular MDPs of :mod:`tokenrl.theory.mdps` as Gymnasium environments.

- :class:`TabularMDPEnv`: any :class:`~tokenrl.theory.mdps.TabularMDP` as a ``gymnasium.Env``, with the action
  set exposed as ``info["action_mask"]``. The MDP containers and generators are re-exported here so that
  ``from envs import random_mdp`` keeps working.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.checks import check_step, reset_options

from tokenrl.theory.mdps import TabularMDP, random_mdp, random_token_mdp, token_prefixes
from tokenrl.theory.tabular import _check_support

__all__ = ["TabularMDP", "TabularMDPEnv", "random_mdp", "random_token_mdp", "token_prefixes"]


class TabularMDPEnv(gym.Env):
    """A :class:`TabularMDP` as a Gymnasium environment.

    Observation: the state index in ``Discrete(S)``. Action: ``Discrete(A)``. Reward ``r(s, a)``; the next
    state is drawn from ``P(.|s, a)`` with ``self.np_random``. ``terminated`` is True on reaching a terminal
    state that is not in ``truncated_S``; ``truncated`` is True on reaching a ``truncated_S`` state or after
    ``max_episode_steps`` steps.

    With ``support_SA`` (e.g. a top-p set from :func:`tokenrl.theory.tabular.top_p_support`), reset and step info hold
    ``action_mask``: ``[A]`` int8, 1 for the actions allowed in the new state (all zero at a terminal state),
    and step info holds ``action_in_support`` for the action taken. An action outside the set is still
    executed with the full MDP's dynamics; callers enforce the mask.

    Args:
        mdp: the MDP.
        support_SA: optional ``[S, A]`` bool action sets, non-empty at every non-terminal state.
        max_episode_steps: optional step limit (>= 1).

    ``reset(options={"state": s})`` starts from live state ``s`` instead of drawing from ``mdp.initial_S``.
    """

    metadata = {"render_modes": []}

    def __init__(self, mdp: TabularMDP, support_SA: np.ndarray | None = None, max_episode_steps: int | None = None):
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {max_episode_steps!r}")
        self.mdp = mdp
        self.support_SA = (
            None if support_SA is None else _check_support(support_SA, mdp.r_SA.shape, mdp.terminal_S).copy()
        )
        self.max_episode_steps = max_episode_steps
        self.observation_space = spaces.Discrete(mdp.n_states)
        self.action_space = spaces.Discrete(mdp.n_actions)
        self._state: int | None = None
        self._steps = 0
        self._episode_over = False

    @property
    def state(self) -> int | None:
        """The current state index (None before the first reset)."""
        return self._state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Start an episode from ``options["state"]`` if given, else from a draw of ``mdp.initial_S``.

        Raises:
            ValueError: on unknown option keys or a start state that is out of range or terminal.
        """
        super().reset(seed=seed)
        options = reset_options(options, "state")
        if "state" in options:
            state = int(options["state"])
            if not (0 <= state < self.mdp.n_states) or self.mdp.terminal_S[state]:
                raise ValueError(f"start state must be a live state in [0, {self.mdp.n_states}), got {state}")
        else:
            state = int(self.np_random.choice(self.mdp.n_states, p=self.mdp.initial_S))
        self._state, self._steps, self._episode_over = state, 0, False
        return state, self._mask_info(state)

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        """Take ``action`` in the current state.

        Raises:
            RuntimeError: before reset or after the episode ended.
            ValueError: if ``action`` is not in the action space.
        """
        check_step(self._state is not None, self._episode_over, self.action_space, action, "an action")
        state, action = self._state, int(action)
        reward = float(self.mdp.r_SA[state, action])
        next_state = int(self.np_random.choice(self.mdp.n_states, p=self.mdp.P_SAS[state, action]))
        self._steps += 1
        cut = bool(self.mdp.truncated_S[next_state])
        terminated = bool(self.mdp.terminal_S[next_state]) and not cut
        truncated = not terminated and (
            cut or (self.max_episode_steps is not None and self._steps >= self.max_episode_steps)
        )
        self._state, self._episode_over = next_state, terminated or truncated
        info = self._mask_info(next_state)
        if self.support_SA is not None:
            info["action_in_support"] = bool(self.support_SA[state, action])
        return next_state, reward, terminated, truncated, info

    def _mask_info(self, state: int) -> dict[str, Any]:
        if self.support_SA is None:
            return {}
        # Terminal states have no actions, whatever their row of support_SA says.
        allowed_A = self.support_SA[state] & ~self.mdp.terminal_S[state]
        return {"action_mask": allowed_A.astype(np.int8)}
