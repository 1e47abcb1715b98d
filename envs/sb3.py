"""A Gymnasium ``VectorEnv`` as a stable-baselines3 ``VecEnv``: sb3 and sb3-contrib learners on the batched env.

stable-baselines3 steps its own vector API, not Gymnasium's: ``reset() -> obs``, ``step(actions) -> (obs,
rewards, dones, infos)`` with one info dict per row, the episode restarted in the step that ends it and its last
observation in ``infos[i]["terminal_observation"]`` (``"TimeLimit.truncated"`` when it was cut, so the learner
bootstraps it). That is Gymnasium's ``SAME_STEP`` autoreset with other names, so :class:`SB3VecEnv` takes a
vector env in that mode (``gymnasium.make_vec(id, num_envs=n, vectorization_mode="vector_entry_point",
autoreset_mode="SameStep")``) and renames. sb3-contrib's ``MaskablePPO`` reads the masks through
``env_method("action_masks")``, answered by the vector env's batched :meth:`action_masks`.

Needs stable-baselines3, a dev/test extra: ``pip install -e ".[dev]"`` (or ``pip install sb3-contrib``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices


class SB3VecEnv(VecEnv):
    """stable-baselines3's ``VecEnv`` interface on a Gymnasium ``VectorEnv`` with ``SAME_STEP`` autoreset.

    ``env_method(name)`` calls the vector env's batched method once and hands each row its entry of the result
    (``action_masks`` gives ``[num_envs, V]``, so row ``i`` gets ``[V]``); ``get_attr`` gives every row the
    vector env's attribute.

    Args:
        env: the vector env, e.g. :class:`envs.gym_compat.TokenGenerationVectorEnv`.

    Raises:
        ValueError: when ``env`` does not autoreset in the same step.
    """

    def __init__(self, env: VectorEnv):
        if env.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3VecEnv needs a vector env with autoreset_mode SameStep (stable-baselines3 restarts an episode "
                f"in the step that ends it), got {env.metadata.get('autoreset_mode')}; make it with "
                "autoreset_mode='SameStep'"
            )
        self.env = env
        self._actions: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> Any:
        """Start every row; the seed set by ``seed()`` seeds the vector env's one generator (its first entry)."""
        obs, _ = self.env.reset(seed=self._seeds[0], options=self._options[0] or None)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards_B, terminated_B, truncated_B, info = self.env.step(self._actions)
        dones_B = terminated_B | truncated_B
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for row in np.flatnonzero(dones_B).tolist():
            infos[row] = {
                "terminal_observation": info["final_obs"][row],
                "TimeLimit.truncated": bool(truncated_B[row] and not terminated_B[row]),
            }
        return obs, rewards_B.astype(np.float32), dones_B, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.env, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        batched = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [batched[i] for i in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> Sequence[bool]:
        return [False for _ in self._get_indices(indices)]
