"""Gymnasium environments and wrappers: token generation, the top-p action restriction, the distillation envs, toy MDPs."""

from envs.token_env import BatchedTokenGenerationEnv, TokenGenerationEnv
from envs.top_p_wrapper import TopPActionWrapper
from envs.toy_mdps import *  # noqa: F401,F403  (names listed in envs.toy_mdps.__all__)
from envs.gym_compat import ActionMasks, TokenGenerationVectorEnv, register_envs

# gymnasium.make("tokenrl/...") works once envs is imported (ids in envs.gym_compat.ENV_IDS).
register_envs()
