"""The distillation envs: token generation on a teacher, with its top-p mask and its log-likelihood as reward.

What an outside RL library trains on (registered in :mod:`envs.gym_compat`; ``gymnasium.make(id)`` alone gives
a masked, rewarded env, ``gymnasium.make_vec(id, num_envs=n, vectorization_mode="vector_entry_point")`` the
batched one):

=============================  =====================================================================================
``tokenrl/SyntheticDistill-v0``  the exact synthetic teacher of ``task=synthetic`` on its training prompts
                                 (:func:`synthetic_source`)
``tokenrl/HFDistill-v0``         a transformers teacher from a local directory or GGUF file, never downloaded
                                 (:func:`hf_source`; default: SmolLM2 after ``scripts/fetch_smollm2.sh``)
=============================  =====================================================================================

An episode: a prompt drawn from the source's prompts, one token per step until EOS (terminated) or
``max_new_tokens`` (truncated), as :class:`envs.token_env.TokenGenerationEnv`. Options of every id:

* ``top_p`` (default 0.8, the tasks' p): ``info["action_mask"]`` (int8 ``[V]``) and ``action_masks()`` (bool)
  hold the teacher's top-p set A_p(s) (:class:`envs.top_p_wrapper.TopPActionWrapper`, which also flags or
  polices actions outside it by ``on_outside``); None: no mask.
* ``reward``: ``"teacher_logprob"`` (default), r(s, a) = log pi*(a|s), the teacher's log-likelihood of the token
  (the return is the response's log-likelihood; with an entropy bonus of weight 1 per token, the soft-RL optimum
  is the teacher itself), or ``"none"``: 0, the imitation setting where the reward is unknown.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import gymnasium as gym
import numpy as np
import torch

from envs.gym_compat import ActionMasks, TokenGenerationVectorEnv
from envs.token_env import BatchRewardFn, RewardFn, TokenGenerationEnv
from envs.top_p_wrapper import TopPActionWrapper
from tokenrl.core.distributions import project_to_set
from tokenrl.core.teachers import Teacher, TokenPositions
from tokenrl.lm.loading import load_causal_lm
from tokenrl.lm.models import HFTeacher, IncrementalTeacher
from tokenrl.tasks.base import SyntheticTaskConfig, build_synthetic_task
from tokenrl.tasks.hf import _tokenize_prompts
from tokenrl.tasks.prompts import load_jsonl_prompts, split_examples

REWARDS = ("teacher_logprob", "none")
SPLITS = ("train", "val", "test")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The teacher of ``tokenrl/HFDistill-v0`` without arguments: ``$SMOLLM2_DIR`` (default ``models/smollm2``)."""
REPO_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "smollm2_prompts.jsonl")
"""The repository's 385 instruction prompts (CC0), the prompts of ``task=smollm2``."""


@dataclass
class DistillSource:
    """What a distillation env is built from: a teacher, its prompts and the episode sizes.

    Attributes:
        teacher: the :class:`tokenrl.core.teachers.Teacher` (masks and rewards).
        prompts: the prompts episodes start from, drawn uniformly (token lists).
        vocab_size: the action space size.
        eos_token_id: ends a response.
        pad_token_id: pads the observation's token array.
        max_new_tokens: response budget (truncation).
        max_prompt_len: longest prompt the observation holds.
    """

    teacher: Teacher
    prompts: list[list[int]]
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    max_new_tokens: int
    max_prompt_len: int


class MemoTeacher:
    """A teacher that answers a repeated ``next_token_logits`` call from memory.

    The env asks for the teacher's logits at a state twice: for its top-p set when the state is reached, and
    for the reward of the action taken in it. Remembering the last call makes that one forward per step.

    Args:
        teacher: the teacher to ask otherwise.
    """

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.vocab_size, self.eos_token_id = teacher.vocab_size, teacher.eos_token_id
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits after each row's ``lengths_B[b]`` tokens (the previous answer if the rows are the same)."""
        width = int(lengths_B.max())
        real_BT = torch.arange(width, device=tokens_BT.device)[None, :] < lengths_B[:, None]
        prefixes_BT = torch.where(real_BT, tokens_BT[:, :width], -1)
        # Ids are >= 0, so the -1 fill makes equal tensors mean equal lengths and equal real tokens.
        if self._last is not None and self._last[0].shape == prefixes_BT.shape and torch.equal(self._last[0], prefixes_BT):
            return self._last[1].clone()
        logits_BV = self.teacher.next_token_logits(tokens_BT, lengths_B)
        self._last = (prefixes_BT, logits_BV)
        return logits_BV.clone()

    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """The teacher's own (not remembered)."""
        return self.teacher.sequence_logits(tokens_BT, lengths_B)

    def position_logits(self, at: TokenPositions, chunk: int) -> Iterator[torch.Tensor]:
        """The teacher's own (not remembered)."""
        return self.teacher.position_logits(at, chunk)


def teacher_logprob_rewards(teacher: Teacher) -> tuple[RewardFn, BatchRewardFn]:
    """The reward r(s, a) = log pi*(a|s) as the single env's and the batched env's reward functions.

    Both compute it the same way (float64 log-softmax of the teacher's logits, returned as float32), so a
    batched rollout and single-env rollouts of the same tokens get the same rewards.
    """

    def batch_reward(
        tokens_BL: torch.Tensor, lengths_B: torch.Tensor, actions_B: torch.Tensor, terminated_B: torch.Tensor
    ) -> torch.Tensor:
        logp_BV = project_to_set(teacher.next_token_logits(tokens_BL, lengths_B).double())
        return logp_BV.gather(1, actions_B.long()[:, None].to(logp_BV.device))[:, 0].float().to(actions_B.device)

    def reward(tokens: np.ndarray, action: int, terminated: bool) -> float:
        tokens_1L = torch.as_tensor(tokens, dtype=torch.long)[None]
        return float(
            batch_reward(tokens_1L, torch.tensor([tokens_1L.shape[1]]), torch.tensor([action]), torch.tensor([terminated]))[0]
        )

    return reward, batch_reward


def _check_options(top_p: float | None, reward: str) -> None:
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None for no mask), got {top_p!r}")


def make_distill_env(
    source: DistillSource, top_p: float | None = 0.8, reward: str = "teacher_logprob", on_outside: str = "flag"
) -> gym.Env:
    """One distillation episode at a time (see the module docstring for the options).

    Returns:
        ``ActionMasks(TopPActionWrapper(TokenGenerationEnv(...)))``, without the top-p wrapper when ``top_p``
        is None.
    """
    _check_options(top_p, reward)
    teacher = MemoTeacher(source.teacher)
    env = TokenGenerationEnv(
        source.vocab_size, source.eos_token_id, source.max_new_tokens, source.max_prompt_len, prompts=source.prompts,
        reward_fn=teacher_logprob_rewards(teacher)[0] if reward == "teacher_logprob" else None,
        pad_token_id=source.pad_token_id,
    )
    if top_p is not None:
        env = TopPActionWrapper(env, teacher, top_p, on_outside=on_outside)
    return ActionMasks(env)


def make_distill_vector_env(
    source: DistillSource, num_envs: int = 1, top_p: float | None = 0.8, reward: str = "teacher_logprob",
    autoreset_mode: str = "NextStep",
) -> TokenGenerationVectorEnv:
    """``num_envs`` distillation episodes stepped as a batch (one teacher forward per step for all rows).

    Returns:
        A :class:`envs.gym_compat.TokenGenerationVectorEnv` with the teacher's top-p masks (none when ``top_p``
        is None) and ``autoreset_mode`` (``"NextStep"``, ``"SameStep"``).
    """
    _check_options(top_p, reward)
    teacher = MemoTeacher(source.teacher)
    return TokenGenerationVectorEnv(
        num_envs, source.vocab_size, source.eos_token_id, source.max_new_tokens, source.max_prompt_len,
        prompts=source.prompts,
        reward_fn=teacher_logprob_rewards(teacher)[1] if reward == "teacher_logprob" else None,
        pad_token_id=source.pad_token_id, teacher=None if top_p is None else teacher, top_p=top_p or 1.0,
        autoreset_mode=autoreset_mode,
    )


def synthetic_source(task: SyntheticTaskConfig | dict | None = None, split: str = "train") -> DistillSource:
    """The exact synthetic teacher of ``task=synthetic`` and the prompts of one of its splits.

    Args:
        task: the task's settings (a :class:`tokenrl.tasks.base.SyntheticTaskConfig` or a dict of its fields,
            e.g. ``{"language": {"vocab_size": 32}, "max_new_tokens": 16}``); None: the default task.
        split: ``"train"`` (the offline data's prompts), ``"val"`` or ``"test"`` (the evaluation's prompts).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(task, dict):
        unknown = set(task) - {f.name for f in fields(SyntheticTaskConfig)}
        if unknown:
            raise ValueError(f"unknown task keys {sorted(unknown)}; the keys are the fields of SyntheticTaskConfig")
        task = SyntheticTaskConfig(**task)
    built = build_synthetic_task(task or SyntheticTaskConfig())
    return DistillSource(
        teacher=built.teacher,
        prompts=getattr(built, f"{split}_prompts"),
        vocab_size=built.vocab_size,
        eos_token_id=built.eos_token_id,
        pad_token_id=built.pad_token_id,
        max_new_tokens=built.max_new_tokens,
        max_prompt_len=built.teacher.config.prompt_len_max,
    )


def hf_source(
    teacher: str | None = None,
    gguf_file: str | None = None,
    prompts: Sequence[str] | None = None,
    prompts_file: str | None = None,
    template: str | None = None,
    split: str = "train",
    max_prompt_tokens: int = 192,
    max_new_tokens: int = 48,
    dtype: str = "float32",
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    data_seed: int = 1234,
) -> DistillSource:
    """A transformers teacher loaded from local files, and prompt texts or a prompt file split as the hf tasks do.

    Args:
        teacher: a local directory saved by ``save_pretrained``, a directory holding ``gguf_file``, or a
            ``.gguf`` file. Nothing is downloaded. None: the SmolLM2 GGUF in ``$SMOLLM2_DIR`` (default
            ``models/smollm2``; fetch it once with ``scripts/fetch_smollm2.sh``).
        gguf_file: the GGUF file name inside ``teacher``.
        prompts: prompt texts, tokenized as they are (no template, no split); give this or ``prompts_file``.
        prompts_file: a Dolly-style JSONL (``instruction``, ``context``, ``response``), rendered with
            ``template`` and split; None (and no ``prompts``): the repository's ``data/smollm2_prompts.jsonl``.
        template: ``"chat"`` (the tokenizer's chat template) or ``"minillm"`` (the MiniLLM/BD template); None:
            ``"chat"`` when the tokenizer has a chat template.
        split: ``"train"``, ``"val"`` or ``"test"`` of the file (:func:`tokenrl.tasks.prompts.split_examples`
            with ``val_fraction``, ``test_fraction``, ``data_seed``: the ``task=smollm2`` split by default).
        max_prompt_tokens: longer prompts are dropped.
        max_new_tokens: response budget.
        dtype: the teacher's parameter dtype.

    Raises:
        FileNotFoundError: the teacher or the prompts file is not on disk.
        ValueError: both ``prompts`` and ``prompts_file``, or no prompt short enough.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if prompts is not None and prompts_file is not None:
        raise ValueError("give at most one of prompts= (texts) and prompts_file= (a JSONL file)")
    if teacher is None:
        teacher, gguf_file = os.environ.get("SMOLLM2_DIR", "models/smollm2"), gguf_file or SMOLLM2_GGUF
    where = os.path.join(teacher, gguf_file) if gguf_file else teacher
    if not os.path.exists(where):
        raise FileNotFoundError(
            f"teacher {where!r} does not exist (cwd {os.getcwd()}). tokenrl/HFDistill-v0 loads a local "
            "save_pretrained directory or .gguf file and never downloads: pass teacher=PATH, or fetch SmolLM2 "
            "once with scripts/fetch_smollm2.sh (or set SMOLLM2_DIR)."
        )
    if prompts is None:
        prompts_file = prompts_file or REPO_PROMPTS
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts_file {prompts_file!r} does not exist (cwd {os.getcwd()}).")
    model, tokenizer = load_causal_lm(teacher, gguf_file=gguf_file, dtype=dtype)
    if prompts is not None:
        token_prompts = [tokenizer(text)["input_ids"] for text in prompts]
    else:
        if template is None:
            template = "chat" if getattr(tokenizer, "chat_template", None) else "minillm"
        examples = split_examples(load_jsonl_prompts(prompts_file), val_fraction, test_fraction, data_seed)
        token_prompts = _tokenize_prompts(examples[SPLITS.index(split)], tokenizer, template)
    token_prompts = [p for p in token_prompts if 0 < len(p) <= max_prompt_tokens]
    if not token_prompts:
        raise ValueError(
            f"no prompt ({'prompts=' if prompts is not None else f'{split} split of {prompts_file}'}) has 1 to "
            f"max_prompt_tokens={max_prompt_tokens} tokens; raise max_prompt_tokens or pass other prompts"
        )
    hf_teacher = HFTeacher(model, tokenizer)
    return DistillSource(
        # The env's calls extend the previous prefix by one token: the KV cache makes each step one token's forward.
        teacher=IncrementalTeacher(hf_teacher),
        prompts=token_prompts,
        vocab_size=hf_teacher.vocab_size,
        eos_token_id=hf_teacher.eos_token_id,
        pad_token_id=hf_teacher.pad_token_id,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_tokens,
    )


def _on_source(make: Callable[..., gym.Env], source: Callable[..., DistillSource], kwargs: dict) -> gym.Env:
    """``make(source(**rest), **own)``: an entry point's keyword arguments split between ``make``'s own options
    (``top_p``, ``reward``, ...) and the source's, so each option and its default is written once."""
    own = inspect.signature(make).parameters.keys() - {"source"}
    env_kwargs = {k: v for k, v in kwargs.items() if k in own}
    source_kwargs = {k: v for k, v in kwargs.items() if k not in own}
    return make(source(**source_kwargs), **env_kwargs)


# The entry points stay module-level functions: Gymnasium loads them from "module:function" strings and the
# async vector envs pickle them.
def make_synthetic_distill_env(**kwargs) -> gym.Env:
    """``tokenrl/SyntheticDistill-v0``: :func:`make_distill_env` on :func:`synthetic_source`, each with its keywords."""
    return _on_source(make_distill_env, synthetic_source, kwargs)


def make_synthetic_distill_vector_env(**kwargs) -> TokenGenerationVectorEnv:
    """The vector entry point of ``tokenrl/SyntheticDistill-v0``: :func:`make_distill_vector_env`, likewise."""
    return _on_source(make_distill_vector_env, synthetic_source, kwargs)


def make_hf_distill_env(**kwargs) -> gym.Env:
    """``tokenrl/HFDistill-v0``: :func:`make_distill_env` on :func:`hf_source` (``teacher=PATH``, ...)."""
    return _on_source(make_distill_env, hf_source, kwargs)


def make_hf_distill_vector_env(**kwargs) -> TokenGenerationVectorEnv:
    """The vector entry point of ``tokenrl/HFDistill-v0``: :func:`make_distill_vector_env`, likewise."""
    return _on_source(make_distill_vector_env, hf_source, kwargs)
