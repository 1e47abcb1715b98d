"""The envs as the Gymnasium ecosystem expects them: registered ids, a ``VectorEnv``, ``action_masks()``.

Registered on ``import envs`` (``gymnasium.make(id, **kwargs)``):

===================================  ======================================================================
``tokenrl/TokenGeneration-v0``       :class:`envs.token_env.TokenGenerationEnv` (its constructor's kwargs)
``tokenrl/RandomMDP-v0``             :func:`make_random_mdp_env`: a random tabular MDP, optional top-p mask
``tokenrl/RandomTokenMDP-v0``        :func:`make_random_token_mdp_env`: a tabular token MDP over prefixes
``tokenrl/ToyTokenGeneration-v0``    :func:`make_toy_token_generation_env`: the token env with a tabular
                                     teacher, wrapped in :class:`envs.top_p_wrapper.TopPActionWrapper`
                                     and :class:`ActionMasks` (reward ``log pi_teacher(a|s)``)
``tokenrl/SyntheticDistill-v0``      :mod:`envs.distill`: the synthetic task's teacher, its top-p mask and
                                     reward ``log pi_teacher(a|s)``; ``make_vec`` gives the batched env
``tokenrl/HFDistill-v0``             :mod:`envs.distill`: the same on a transformers teacher from local files
===================================  ======================================================================

Maskable-RL libraries (sb3-contrib's ``MaskablePPO``) read the legal actions from an ``action_masks()``
method; :class:`ActionMasks` provides it from the Gymnasium-convention ``info["action_mask"]`` that the
top-p wrapper and :class:`envs.toy_mdps.TabularMDPEnv` emit. :class:`TokenGenerationVectorEnv` is the
batched env as a ``gymnasium.vector.VectorEnv`` (next-step or same-step autoreset) with batched top-p masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.checks import reset_options, validate_prompt
from envs.token_env import BatchedTokenGenerationEnv, BatchRewardFn, TokenGenerationEnv
from envs.top_p_wrapper import TopPActionWrapper
from envs.toy_mdps import TabularMDP, TabularMDPEnv, random_mdp, random_token_mdp, token_prefixes
from tokenrl.core.distributions import project_to_set
from tokenrl.core.teachers import Teacher
from tokenrl.core.top_p import check_p, top_p_mask
from tokenrl.theory.tabular import top_p_support


class ActionMasks(gym.Wrapper):
    """Adds ``action_masks() -> bool [n]``, the last ``info["action_mask"]`` (all True if there is none)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._mask: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._mask = info.get("action_mask")
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._mask = info.get("action_mask")
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """Legal actions of the current state as a bool array (sb3-contrib's protocol)."""
        if self._mask is None:
            return np.ones(self.action_space.n, dtype=bool)
        return self._mask.astype(bool)


def _support(mdp: TabularMDP, top_p: float) -> np.ndarray | None:
    return None if top_p >= 1.0 else top_p_support(mdp.teacher_SA, top_p)


def make_random_mdp_env(
    n_states: int = 8, n_actions: int = 4, seed: int = 0, gamma: float = 0.9, n_terminal: int = 1, top_p: float = 1.0
) -> gym.Env:
    """:func:`envs.toy_mdps.random_mdp` as an env; ``top_p < 1`` masks actions to the teacher's top-p set."""
    mdp = random_mdp(n_states, n_actions, np.random.default_rng(seed), gamma=gamma, n_terminal=n_terminal)
    return ActionMasks(TabularMDPEnv(mdp, support_SA=_support(mdp, top_p)))


def make_random_token_mdp_env(
    vocab_size: int = 4, max_len: int = 3, seed: int = 0, gamma: float = 0.9, concentration: float = 0.1,
    top_p: float = 1.0,
) -> gym.Env:
    """:func:`envs.toy_mdps.random_token_mdp` as an env; ``top_p < 1`` masks actions to the teacher's set."""
    mdp = random_token_mdp(vocab_size, max_len, np.random.default_rng(seed), gamma=gamma, concentration=concentration)
    return ActionMasks(TabularMDPEnv(mdp, support_SA=_support(mdp, top_p)))


class TabularTokenTeacher:
    """A :class:`tokenrl.core.teachers.Teacher` reading a token MDP's ``teacher_SA`` at the response prefix.

    The response is everything after the first ``prompt_len`` tokens; a prefix of ``max_len`` tokens (where
    the episode truncates, no action left) and positions inside the prompt get uniform logits.

    Args:
        mdp: a :func:`envs.toy_mdps.random_token_mdp` MDP.
        vocab_size: its vocabulary size.
        max_len: its response length limit.
        prompt_len: number of prompt tokens before the response.
        eos_token_id: its EOS id.
    """

    def __init__(self, mdp: TabularMDP, vocab_size: int, max_len: int, prompt_len: int = 1, eos_token_id: int = 0):
        self.vocab_size, self.eos_token_id, self.prompt_len = vocab_size, eos_token_id, prompt_len
        self._index = {prefix: i for i, prefix in enumerate(token_prefixes(vocab_size, max_len, eos_token_id))}
        with np.errstate(divide="ignore"):
            self._logits_SV = torch.from_numpy(np.log(mdp.teacher_SA)).float()

    def _row(self, response: Sequence[int]) -> torch.Tensor:
        state = self._index.get(tuple(int(t) for t in response))
        return torch.zeros(self.vocab_size) if state is None else self._logits_SV[state]

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` teacher logits after each row's ``lengths_B[b]`` tokens."""
        rows = [self._row(tokens_BT[b, self.prompt_len : int(n)].tolist()) for b, n in enumerate(lengths_B)]
        return torch.stack(rows)

    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]``: entry ``t`` is the distribution after ``tokens_BT[b, : t + 1]``."""
        B, T = tokens_BT.shape
        out = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(self.prompt_len - 1, T):
                out[b, t] = self._row(tokens_BT[b, self.prompt_len : t + 1].tolist())
        return out


def make_toy_token_generation_env(
    vocab_size: int = 4, max_len: int = 3, seed: int = 0, concentration: float = 0.3, top_p: float = 0.8,
    on_outside: str = "flag", prompt_token: int = 1,
) -> gym.Env:
    """The token env on a random token MDP's teacher, restricted to its top-p sets, reward ``log pi_teacher``.

    Every episode starts from the one-token prompt ``[prompt_token]``; the response is the token MDP's
    prefix. The reward of a token is the teacher's log-probability of it (the soft-Q reward of the zoo).

    Returns:
        ``ActionMasks(TopPActionWrapper(TokenGenerationEnv(...), teacher, top_p, on_outside))``.
    """
    mdp = random_token_mdp(vocab_size, max_len, np.random.default_rng(seed), concentration=concentration)
    teacher = TabularTokenTeacher(mdp, vocab_size, max_len, prompt_len=1)

    def reward_fn(tokens: np.ndarray, action: int, terminated: bool) -> float:
        logits_1V = teacher.next_token_logits(torch.as_tensor(tokens)[None], torch.tensor([len(tokens)]))
        return float(project_to_set(logits_1V[0])[action])

    env = TokenGenerationEnv(
        vocab_size, 0, max_new_tokens=max_len, max_prompt_len=1, prompts=[[prompt_token]], reward_fn=reward_fn
    )
    return ActionMasks(TopPActionWrapper(env, teacher, top_p, on_outside=on_outside))


class TokenGenerationVectorEnv(VectorEnv):
    """:class:`envs.token_env.BatchedTokenGenerationEnv` as a ``gymnasium.vector.VectorEnv``, with top-p masks.

    ``num_envs`` token-generation episodes, each the MDP of :class:`envs.token_env.TokenGenerationEnv` (same
    single observation and action spaces), stepped by one batched env. Autoreset is Gymnasium's
    ``autoreset_mode``: ``NEXT_STEP`` (default) returns a row's last observation with its flags, and the next
    step ignores that row's action, starts a new episode from a fresh prompt and returns its first observation
    with reward 0 and both flags False; ``SAME_STEP`` starts the new episode in the step that ended the old
    one and puts the old one's last observation in ``info["final_obs"]`` (and its mask in
    ``info["final_info"]``).

    With a ``teacher``, ``info["action_mask"]`` (``[num_envs, V]`` int8, Gymnasium's convention) and
    :meth:`action_masks` (bool, sb3-contrib's protocol) hold the teacher's top-p set of every row's current
    state after each reset and step, as :class:`envs.top_p_wrapper.TopPActionWrapper` does for one env: all
    zeros for a row whose observation is a terminal state (no action exists there; the next step ignores its
    action), the set itself for a truncated one. The mask does not restrict the actions ``step`` accepts.

    Args:
        num_envs: number of rows.
        vocab_size, eos_token_id, max_new_tokens, max_prompt_len, pad_token_id, device: as in
            :class:`envs.token_env.BatchedTokenGenerationEnv`.
        prompts: fixed prompts, drawn uniformly for every (re)started episode.
        prompt_sampler: ``prompt_sampler(n, np_random) -> n prompts`` instead (give exactly one of the two).
        reward_fn: as in :class:`envs.token_env.BatchedTokenGenerationEnv`.
        teacher: the :class:`tokenrl.core.teachers.Teacher` whose top-p sets are the masks; None: no mask
            (``action_masks()`` all True, no ``info["action_mask"]``).
        top_p: the sets' threshold in (0, 1].
        autoreset_mode: ``AutoresetMode.NEXT_STEP`` or ``AutoresetMode.SAME_STEP`` (or their string values).
    """

    def __init__(
        self,
        num_envs: int,
        vocab_size: int,
        eos_token_id: int,
        max_new_tokens: int,
        max_prompt_len: int,
        prompts: Sequence[Sequence[int]] | None = None,
        prompt_sampler: Callable[[int, np.random.Generator], list[list[int]]] | None = None,
        reward_fn: BatchRewardFn | None = None,
        pad_token_id: int | None = None,
        device: str | torch.device = "cpu",
        teacher: Teacher | None = None,
        top_p: float = 1.0,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
    ):
        if (prompts is None) == (prompt_sampler is None):
            raise ValueError("give exactly one of prompts= and prompt_sampler=")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        modes = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)
        if AutoresetMode(autoreset_mode) not in modes:
            raise ValueError(f"autoreset_mode must be one of {[m.value for m in modes]}, got {autoreset_mode!r}")
        if teacher is not None and teacher.vocab_size != vocab_size:
            raise ValueError(f"teacher vocab_size={teacher.vocab_size} differs from the env's vocab_size={vocab_size}")
        self.metadata = {"autoreset_mode": AutoresetMode(autoreset_mode)}
        self.batched = BatchedTokenGenerationEnv(
            vocab_size, eos_token_id, max_new_tokens, max_prompt_len, reward_fn=reward_fn,
            pad_token_id=pad_token_id, device=device,
        )
        self._prompts = None if prompts is None else [validate_prompt(p, vocab_size, max_prompt_len) for p in prompts]
        self._prompt_sampler = prompt_sampler
        self.teacher, self.top_p = teacher, check_p(top_p)
        self.num_envs = num_envs
        single = TokenGenerationEnv(vocab_size, eos_token_id, max_new_tokens, max_prompt_len, pad_token_id=pad_token_id)
        self.single_observation_space = single.observation_space
        self.single_action_space = single.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset_B = np.zeros(num_envs, dtype=bool)
        self._mask_BV = np.ones((num_envs, vocab_size), dtype=np.int8)

    def _draw(self, n: int) -> list[list[int]]:
        if self._prompt_sampler is not None:
            return list(self._prompt_sampler(n, self.np_random))
        return [self._prompts[int(i)].tolist() for i in self.np_random.integers(len(self._prompts), size=n)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start ``num_envs`` episodes (``options={"prompts": [...]}`` gives their prompts)."""
        if seed is not None or self._np_random is None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        options = reset_options(options, "prompts")
        prompts = options.get("prompts") or self._draw(self.num_envs)
        if len(prompts) != self.num_envs:
            raise ValueError(f"got {len(prompts)} prompts for {self.num_envs} envs")
        self.batched.reset(prompts, seed=int(self.np_random.integers(2**62)))
        self._autoreset_B[:] = False
        return self._obs(), self._mask_info(np.zeros(self.num_envs, dtype=bool))

    def step(self, actions):
        """Step every row; under ``NEXT_STEP``, rows that ended on the previous step restart instead."""
        if self.batched.tokens_BL is None:
            raise RuntimeError("step() called before reset()")
        actions_B = np.asarray(actions)
        if actions_B.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions_B.shape}")
        restart_B = self._autoreset_B.copy()
        rewards_B = np.zeros(self.num_envs, dtype=np.float64)
        if not restart_B.all():
            # Restarting rows are still flagged finished in the batched env, which ignores their actions.
            _, r_B, _, _, _ = self.batched.step(torch.as_tensor(actions_B, dtype=torch.long))
            rewards_B = r_B.cpu().numpy().astype(np.float64)
        restart_t = torch.as_tensor(restart_B, device=self.batched.device)
        terminated_B = (self.batched.terminated_B & ~restart_t).cpu().numpy()
        truncated_B = (self.batched.truncated_B & ~restart_t).cpu().numpy()
        ended_B = terminated_B | truncated_B
        infos: dict[str, Any] = {}
        if self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
            if ended_B.any():
                obs, final = self._obs(), self._mask_info(terminated_B)
                for row in np.flatnonzero(ended_B).tolist():
                    final_obs = {key: value[row] for key, value in obs.items()}
                    final_info = {key: value[row] for key, value in final.items() if not key.startswith("_")}
                    infos = self._add_info(infos, {"final_obs": final_obs, "final_info": final_info}, row)
            restart_B, self._autoreset_B = ended_B, np.zeros_like(ended_B)
            terminal_B = np.zeros_like(ended_B)
        else:
            self._autoreset_B, terminal_B = ended_B, terminated_B
        if restart_B.any():
            self._restart_rows(np.flatnonzero(restart_B))
        return self._obs(), rewards_B, terminated_B, truncated_B, {**infos, **self._mask_info(terminal_B)}

    def action_masks(self) -> np.ndarray:
        """``[num_envs, V]`` bool: the legal actions of every row's current state (sb3-contrib's protocol)."""
        return self._mask_BV.astype(bool)

    def _mask_info(self, terminal_B: np.ndarray) -> dict[str, np.ndarray]:
        """Compute the masks of the current states (rows in ``terminal_B`` have none) as ``info`` entries."""
        if self.teacher is None:
            return {}
        env = self.batched
        width = int(env.lengths_B.max())
        logits_BV = self.teacher.next_token_logits(env.tokens_BL[:, :width], env.lengths_B.clone())
        mask_BV = top_p_mask(logits_BV.detach().cpu(), self.top_p).numpy().astype(np.int8)
        mask_BV[terminal_B] = 0
        self._mask_BV = mask_BV
        return {"action_mask": mask_BV.copy(), "_action_mask": np.ones(self.num_envs, dtype=bool)}

    def _restart_rows(self, rows: np.ndarray) -> None:
        env = self.batched
        for row, prompt in zip(rows.tolist(), self._draw(len(rows))):
            arr = torch.from_numpy(validate_prompt(prompt, env.vocab_size, env.max_prompt_len)).to(env.device)
            env.tokens_BL[row] = env.pad_token_id
            env.tokens_BL[row, : arr.numel()] = arr
            env.lengths_B[row] = env.prompt_lengths_B[row] = arr.numel()
            env.terminated_B[row] = env.truncated_B[row] = False

    def _obs(self) -> dict[str, np.ndarray]:
        env = self.batched
        return {
            "tokens": env.tokens_BL.cpu().numpy().copy(),
            "length": env.lengths_B.cpu().numpy().astype(np.int64),
            "prompt_length": env.prompt_lengths_B.cpu().numpy().astype(np.int64),
        }


ENV_IDS = {
    "tokenrl/TokenGeneration-v0": "envs.token_env:TokenGenerationEnv",
    "tokenrl/RandomMDP-v0": "envs.gym_compat:make_random_mdp_env",
    "tokenrl/RandomTokenMDP-v0": "envs.gym_compat:make_random_token_mdp_env",
    "tokenrl/ToyTokenGeneration-v0": "envs.gym_compat:make_toy_token_generation_env",
    "tokenrl/SyntheticDistill-v0": "envs.distill:make_synthetic_distill_env",
    "tokenrl/HFDistill-v0": "envs.distill:make_hf_distill_env",
}
VECTOR_ENTRY_POINTS = {
    "tokenrl/SyntheticDistill-v0": "envs.distill:make_synthetic_distill_vector_env",
    "tokenrl/HFDistill-v0": "envs.distill:make_hf_distill_vector_env",
}
"""``gymnasium.make_vec(id, num_envs=n, vectorization_mode="vector_entry_point")``: one batched env."""


def register_envs() -> None:
    """Register :data:`ENV_IDS` with Gymnasium (idempotent: ids already registered are left alone)."""
    for env_id, entry_point in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, vector_entry_point=VECTOR_ENTRY_POINTS.get(env_id))
