"""Token generation as a Gymnasium MDP, one sequence at a time or a batch in lock-step.

State ``s_t`` = the prompt followed by the tokens generated so far; action ``a_t`` = the next token id; the
transition appends it. Emitting EOS terminates the episode (the terminal state has value 0); reaching
``max_new_tokens`` without EOS truncates it (that last state is bootstrapped like any other). The reward is
pluggable and 0 by default: in distillation the teacher is the expert and the reward is unknown.

:class:`TokenGenerationEnv` is the single-sequence ``gymnasium.Env`` (what wrappers and ``check_env`` see).
:class:`BatchedTokenGenerationEnv` steps B sequences on torch tensors so that a policy or teacher runs one
forward per step for the whole batch; its :meth:`~BatchedTokenGenerationEnv.rollout` returns
:class:`Trajectories` for the replay buffer. Both check their arguments with :mod:`envs.checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding

from envs.checks import check_step, reset_options, set_sizes, validate_prompt
from tokenrl.core.top_p import PolicyFn

RewardFn = Callable[[np.ndarray, int, bool], float]
"""``reward_fn(tokens, action, terminated) -> reward`` of :class:`TokenGenerationEnv`; ``tokens`` is the
state the action is taken in (prompt + response so far, before the action)."""

BatchRewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``reward_fn(tokens_BL, lengths_B, actions_B, terminated_B) -> rewards_B`` of
:class:`BatchedTokenGenerationEnv`; ``tokens_BL``/``lengths_B`` are the states before the actions (read-only:
``tokens_BL`` is a view of the env's state)."""


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


@dataclass
class Trajectories:
    """Finished episodes of a batched rollout, one entry per row (B rows).

    Attributes:
        prompts: B prompts, token ids.
        responses: B responses, token ids. A terminated response ends with EOS; a truncated one holds
            exactly ``max_new_tokens`` tokens.
        terminated: B flags, True when the response ended with EOS (terminal value 0).
        truncated: B flags, True when the response was cut at ``max_new_tokens`` (bootstrap the last state).
        rewards: B lists, ``rewards[b][t]`` is the reward of response token ``t``; ``len(rewards[b]) ==
            len(responses[b])``.
        pad_token_id: id filling the padding of the tensor views.
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    terminated: list[bool]
    truncated: list[bool]
    rewards: list[list[float]]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def response_ids_BT(self) -> torch.Tensor:
        """``[B, T]`` long responses right-padded with ``pad_token_id`` (T = longest response)."""
        return self._pad([torch.tensor(r, dtype=torch.long) for r in self.responses], self.pad_token_id)

    @property
    def response_mask_BT(self) -> torch.Tensor:
        """``[B, T]`` bool, True on real response tokens."""
        lengths_B = torch.tensor([len(r) for r in self.responses])
        width = int(lengths_B.max()) if len(self) else 0
        return torch.arange(width)[None, :] < lengths_B[:, None]

    @property
    def rewards_BT(self) -> torch.Tensor:
        """``[B, T]`` float32 per-token rewards, 0 on padding."""
        return self._pad([torch.tensor(r, dtype=torch.float32) for r in self.rewards], 0.0)

    @staticmethod
    def _pad(rows: list[torch.Tensor], value: float) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


class BatchedTokenGenerationEnv:
    """B token-generation episodes stepped in lock-step on torch tensors.

    Same MDP as :class:`TokenGenerationEnv`, row by row. A row that has terminated or truncated stays finished:
    its later actions are ignored (recorded as ``pad_token_id``, reward 0) while the other rows go on, so the
    batch shape never changes and a policy or teacher runs one forward per step for all rows.

    Observation (a dict of tensors on ``device``): ``tokens_BL`` ``[B, L]`` long, right-padded with
    ``pad_token_id``, ``L`` = the longest current row (prompt and response so far); ``lengths_B`` ``[B]`` long, real tokens per row;
    ``prompt_lengths_B`` ``[B]`` long.

    Args:
        vocab_size: number of token ids.
        eos_token_id: the token that ends a response.
        max_new_tokens: response budget per row.
        max_prompt_len: longest accepted prompt.
        batch_size: rows drawn from ``prompt_sampler`` when ``reset`` gets no prompts.
        prompt_sampler: optional ``prompt_sampler(n, np_random) -> list[list[int]]``, e.g.
            ``SyntheticLanguage.sample_prompts``.
        reward_fn: optional :data:`BatchRewardFn`; finished rows get reward 0 whatever it returns.
            Default: reward 0.
        pad_token_id: padding id (default: ``eos_token_id``).
        device: where the state tensors live.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int,
        max_new_tokens: int,
        max_prompt_len: int,
        batch_size: int | None = None,
        prompt_sampler: Callable[[int, np.random.Generator], list[list[int]]] | None = None,
        reward_fn: BatchRewardFn | None = None,
        pad_token_id: int | None = None,
        device: str | torch.device = "cpu",
    ):
        set_sizes(self, vocab_size, eos_token_id, max_new_tokens, max_prompt_len, pad_token_id)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._prompt_sampler = prompt_sampler
        self._reward_fn = reward_fn
        self.np_random: np.random.Generator | None = None
        self._torch_generator: torch.Generator | None = None
        self.tokens_BL: torch.Tensor | None = None
        self.lengths_B: torch.Tensor | None = None
        self.prompt_lengths_B: torch.Tensor | None = None
        self.terminated_B: torch.Tensor | None = None
        self.truncated_B: torch.Tensor | None = None

    def reset(
        self, prompts: Sequence[Sequence[int]] | None = None, seed: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Start B episodes, one per prompt (or ``batch_size`` prompts from ``prompt_sampler``).

        Args:
            prompts: B prompts; None draws ``batch_size`` prompts from ``prompt_sampler``.
            seed: reseeds ``np_random`` (and the sampler of :meth:`rollout`) like ``gymnasium.Env.reset``.

        Returns:
            ``(obs, info)``; ``info`` is empty.
        """
        if seed is not None or self.np_random is None:
            self.np_random, _ = seeding.np_random(seed)
        if prompts is None:
            if self._prompt_sampler is None or self.batch_size is None:
                raise ValueError("reset() without prompts needs prompt_sampler= and batch_size= in the constructor")
            prompts = self._prompt_sampler(self.batch_size, self.np_random)
        if len(prompts) == 0:
            raise ValueError("reset() needs at least one prompt")
        arrays = [validate_prompt(p, self.vocab_size, self.max_prompt_len) for p in prompts]
        tokens_BL = torch.full((len(arrays), self.max_len), self.pad_token_id, dtype=torch.long)
        for b, arr in enumerate(arrays):
            tokens_BL[b, : arr.size] = torch.from_numpy(arr)
        self.tokens_BL = tokens_BL.to(self.device)
        self.lengths_B = torch.tensor([a.size for a in arrays], dtype=torch.long, device=self.device)
        self.prompt_lengths_B = self.lengths_B.clone()
        self.terminated_B = torch.zeros(len(arrays), dtype=torch.bool, device=self.device)
        self.truncated_B = torch.zeros_like(self.terminated_B)
        # Rollout sampling draws from a torch generator derived from np_random so one seed fixes everything.
        self._torch_generator = torch.Generator(device=self.device)
        self._torch_generator.manual_seed(int(self.np_random.integers(2**62)))
        return self._obs(), {}

    def step(
        self, actions_B: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Append one token to every unfinished row.

        Args:
            actions_B: ``[B]`` integer token ids; entries of finished rows are ignored (any value).

        Returns:
            ``(obs, rewards_B, terminated_B, truncated_B, info)``. ``rewards_B`` ``[B]`` float32 is 0 for rows
            finished before this step. ``terminated_B``/``truncated_B`` ``[B]`` bool are sticky: True from the
            step a row ended onwards. ``info["active_B"]`` ``[B]`` bool marks the rows this step advanced (the
            valid transitions) and ``info["actions_B"]`` the tokens written (pad for inactive rows).

        Raises:
            RuntimeError: before reset, or when every row has finished.
            ValueError: on a wrongly shaped or non-integer ``actions_B``, or an out-of-range id in an active row.
        """
        if self.tokens_BL is None:
            raise RuntimeError("step() called before reset()")
        active_B = ~(self.terminated_B | self.truncated_B)
        if not bool(active_B.any()):
            raise RuntimeError("step() called after every row finished; call reset()")
        actions_B = torch.as_tensor(actions_B, device=self.device)
        if actions_B.shape != active_B.shape or actions_B.is_floating_point() or actions_B.is_complex():
            raise ValueError(
                f"actions_B must be an integer tensor of shape {tuple(active_B.shape)}, "
                f"got {actions_B.dtype} of shape {tuple(actions_B.shape)}"
            )
        actions_B = actions_B.long()
        bad_B = active_B & ((actions_B < 0) | (actions_B >= self.vocab_size))
        if bool(bad_B.any()):
            rows = bad_B.nonzero().flatten().tolist()
            raise ValueError(
                f"actions {actions_B[bad_B].tolist()} in rows {rows} are not token ids in [0, {self.vocab_size})"
            )
        actions_B = torch.where(active_B, actions_B, torch.full_like(actions_B, self.pad_token_id))
        terminated_now_B = active_B & (actions_B == self.eos_token_id)
        if self._reward_fn is None:
            rewards_B = torch.zeros(active_B.shape, dtype=torch.float32, device=self.device)
        else:
            state_BL = self.tokens_BL[:, : int(self.lengths_B.max())]
            rewards_B = self._reward_fn(state_BL, self.lengths_B.clone(), actions_B, terminated_now_B)
            rewards_B = torch.where(active_B, rewards_B.to(torch.float32), torch.zeros((), device=self.device))
        rows_A = active_B.nonzero().flatten()
        self.tokens_BL[rows_A, self.lengths_B[rows_A]] = actions_B[rows_A]
        self.lengths_B += active_B.long()
        full_B = self.lengths_B - self.prompt_lengths_B == self.max_new_tokens
        self.terminated_B |= terminated_now_B
        self.truncated_B |= active_B & ~terminated_now_B & full_B
        info = {"active_B": active_B, "actions_B": actions_B}
        return self._obs(), rewards_B, self.terminated_B.clone(), self.truncated_B.clone(), info

    def rollout(
        self, policy_fn: PolicyFn, prompts: Sequence[Sequence[int]] | None = None, seed: int | None = None
    ) -> Trajectories:
        """Reset, then step until every row has finished, calling ``policy_fn`` once per step for all rows.

        Args:
            policy_fn: ``policy_fn(tokens_BL, lengths_B)`` on the current (right-padded) states of all rows,
                finished ones included so the batch shape is fixed; it must not modify its inputs. It returns
                either actions ``[B]`` (integer) or logits ``[B, V]`` (float) to sample from with the env's
                seeded generator.
            prompts: as in :meth:`reset`.
            seed: as in :meth:`reset`.

        Returns:
            The finished episodes as :class:`Trajectories`.
        """
        obs, _ = self.reset(prompts, seed)
        rewards_BT = torch.zeros(len(self.lengths_B), self.max_new_tokens, dtype=torch.float32, device=self.device)
        done_B = self.terminated_B | self.truncated_B
        t = 0
        while not bool(done_B.all()):
            actions_B = self._actions_from_policy_output(policy_fn(obs["tokens_BL"], obs["lengths_B"]))
            obs, rewards_B, terminated_B, truncated_B, _ = self.step(actions_B)
            rewards_BT[:, t] = rewards_B
            done_B = terminated_B | truncated_B
            t += 1
        return self.trajectories(rewards_BT)

    def trajectories(self, rewards_BT: torch.Tensor | None = None) -> Trajectories:
        """The current episodes as :class:`Trajectories` (meant for after every row finished).

        Args:
            rewards_BT: ``[B, max_new_tokens]`` per-step rewards collected by the caller; None means zeros.
        """
        if self.tokens_BL is None:
            raise RuntimeError("trajectories() called before reset()")
        tokens = self.tokens_BL.cpu().tolist()
        lengths = self.lengths_B.cpu().tolist()
        prompt_lengths = self.prompt_lengths_B.cpu().tolist()
        rewards = None if rewards_BT is None else rewards_BT.cpu().tolist()
        responses = [row[p:n] for row, p, n in zip(tokens, prompt_lengths, lengths)]
        return Trajectories(
            prompts=[row[:p] for row, p in zip(tokens, prompt_lengths)],
            responses=responses,
            terminated=self.terminated_B.cpu().tolist(),
            truncated=self.truncated_B.cpu().tolist(),
            rewards=[[0.0] * len(r) if rewards is None else rewards[b][: len(r)] for b, r in enumerate(responses)],
            pad_token_id=self.pad_token_id,
        )

    def _actions_from_policy_output(self, out_B: torch.Tensor) -> torch.Tensor:
        n_rows = len(self.lengths_B)
        if out_B.dim() == 1 and not out_B.is_floating_point():
            return out_B
        if out_B.dim() == 2 and out_B.is_floating_point() and out_B.shape == (n_rows, self.vocab_size):
            probs_BV = torch.softmax(out_B.detach().float(), dim=-1).to(self.device)
            return torch.multinomial(probs_BV, 1, generator=self._torch_generator).squeeze(1)
        raise ValueError(
            f"policy_fn must return integer actions [{n_rows}] or float logits [{n_rows}, {self.vocab_size}], "
            f"got {out_B.dtype} of shape {tuple(out_B.shape)}"
        )

    def _obs(self) -> dict[str, torch.Tensor]:
        # Trim to the longest row: a teacher without a KV cache pays for every column it is given.
        width = int(self.lengths_B.max())
        return {
            "tokens_BL": self.tokens_BL[:, :width].clone(),
            "lengths_B": self.lengths_B.clone(),
            "prompt_lengths_B": self.prompt_lengths_B.clone(),
        }
