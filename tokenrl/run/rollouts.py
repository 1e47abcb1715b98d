"""On-policy data for the trainer: student rollouts through the batched env, scored by the teacher, in timed stages.

One collection (:func:`collect_rollouts`) runs three stages, each timed on a :class:`StageClock`:

* ``time/rollout_s``: :meth:`Algorithm.before_rollout`, then ``env.rollout`` with the algorithm's
  :meth:`Algorithm.rollout_policy` built from the student's and the teacher's next-token logits
  (KV-cached for transformers models);
* ``time/teacher_score_s``: the teacher's top-p cache over the new trajectories
  (:func:`tokenrl.tasks.datagen.compute_top_p_cache`), what every loss reads;
* ``time/buffer_add_s``: the trajectories go into the buffer (``is_expert=False``) and the algorithm is
  told their indices (:meth:`Algorithm.after_rollout`).

The trainer times batch drawing (``time/batch_s``, the algorithm's sampler) and the gradient step
(``time/update_s``) on the same clock (:mod:`tokenrl.run.step`), so the wall-clock of an on-policy run is
attributable stage by stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import torch

from algorithms import Algorithm
from envs import BatchedTokenGenerationEnv
from tokenrl.run import distributed
from tokenrl.core.top_p import PolicyFn
from tokenrl.data.buffer import ReplayBuffer
from tokenrl.tasks.datagen import compute_top_p_cache
from tokenrl.lm.models import HFTeacher, IncrementalTeacher
from tokenrl.lm.sampling import KVCacheStepper
from tokenrl.tasks.base import Task


class StageClock:
    """Seconds spent per named stage, summed over every entry of :meth:`stage`.

    Attributes:
        totals: ``{key: seconds}`` in first-entry order (keys like ``time/update_s``).
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Add the seconds spent in the block to ``totals[key]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - start

    @property
    def total_s(self) -> float:
        """Seconds over all stages."""
        return sum(self.totals.values())


def once_per_state(fn: PolicyFn) -> PolicyFn:
    """``fn`` evaluated once per state: a repeated call on equal ``(tokens_BL, lengths_B)`` returns the last result.

    Rollout hooks may ask for the teacher's logits more than once per env step (to restrict the student and to
    mix the teacher in); a KV-cached teacher (:class:`~tokenrl.lm.models.IncrementalTeacher`) must see each state
    only once, and a second forward would be wasted anyway.
    """
    last: list = [None, None, None]  # tokens_BL, lengths_B, logits_BV of the previous call

    def cached(tokens_BL: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        prev_tokens, prev_lengths, prev_out = last
        if (
            prev_out is not None
            and prev_tokens.shape == tokens_BL.shape
            and torch.equal(prev_lengths, lengths_B)
            and torch.equal(prev_tokens, tokens_BL)
        ):
            return prev_out
        out = fn(tokens_BL, lengths_B)
        last[:] = [tokens_BL.clone(), lengths_B.clone(), out]
        return out

    return cached


def student_and_teacher_fns(model: torch.nn.Module, task: Task) -> tuple[PolicyFn, PolicyFn]:
    """Next-token logits functions of the student and the teacher for lock-step env rollouts.

    Transformers models run one KV-cached step per env step (:class:`~tokenrl.lm.models.IncrementalTeacher`,
    :class:`~tokenrl.lm.sampling.KVCacheStepper`); the teacher's function is wrapped by :func:`once_per_state`.

    Returns:
        ``(student_fn, teacher_fn)``, each ``(tokens_BL, lengths_B) -> logits_BV``, without gradient, on the
        tokens' device (the Teacher interface's rule), so the rollout hooks can combine the two whatever device
        the student is on.
    """
    teacher = task.teacher
    if task.tokenizer is not None:
        student_fn = IncrementalTeacher(HFTeacher(model, task.tokenizer)).next_token_logits
        if isinstance(teacher, HFTeacher):
            teacher = IncrementalTeacher(teacher)
    else:
        stepper = KVCacheStepper(model, task.pad_token_id, task.vocab_size)

        @torch.no_grad()
        def student_fn(tokens_BL: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
            return stepper.next_token_logits(tokens_BL, lengths_B).to(tokens_BL.device)

    return student_fn, once_per_state(teacher.next_token_logits)


def collect_rollouts(
    model: torch.nn.Module,
    task: Task,
    buffer: ReplayBuffer,
    algo: Algorithm,
    n_prompts: int,
    seed: int,
    clock: StageClock,
    dist_ctx: distributed.DistContext = distributed.DistContext(),
) -> dict[str, float]:
    """Sample rollouts of ``algo.rollout_policy`` on training prompts, score them with the teacher, add them.

    Under torchrun the ``n_prompts`` drawn prompts are split evenly over the ranks; each rank rolls out its
    part (sampling seed ``seed * world_size + rank``) into its own buffer, and the stats are rank averages
    (``rollout/n`` the total).

    Args:
        model: the student network (put in eval mode while sampling, its mode restored after).
        task: prompts, teacher and the env's sizes.
        buffer: receives the trajectories with ``is_expert=False`` and their top-p cache.
        algo: supplies :meth:`~Algorithm.rollout_policy`, :meth:`~Algorithm.before_rollout` and
            :meth:`~Algorithm.after_rollout`.
        n_prompts: prompts per collection (drawn without replacement, capped at the training set).
        seed: picks the prompts and seeds the env's sampler.
        clock: receives ``time/rollout_s``, ``time/teacher_score_s`` and ``time/buffer_add_s``.
        dist_ctx: this process's rank and the world size (a world of one by default).

    Returns:
        ``rollout/*`` statistics: ``n`` trajectories added, ``mean_len``, ``terminated_frac``, ``buffer_size``.
    """
    world = dist_ctx.world_size
    n_prompts = min(n_prompts, len(task.train_prompts))
    if n_prompts % world:
        raise ValueError(
            f"rollout_prompts ({n_prompts} after capping at the training prompts) must be a multiple of the world "
            f"size ({world}) so that every rank's buffer grows alike; change rollout_prompts"
        )
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(task.train_prompts), size=n_prompts, replace=False)
    if world > 1:
        idx, seed = np.array_split(idx, world)[dist_ctx.rank], seed * world + dist_ctx.rank
    prompts = [task.train_prompts[i] for i in idx]
    with clock.stage("time/rollout_s"):
        env = BatchedTokenGenerationEnv(
            task.vocab_size, task.eos_token_id, task.max_new_tokens, max(len(p) for p in prompts),
            pad_token_id=task.pad_token_id,
        )
        was_training = model.training
        model.eval()
        try:
            algo.before_rollout()
            traj = env.rollout(algo.rollout_policy(*student_and_teacher_fns(model, task)), prompts=prompts, seed=seed)
        finally:
            model.train(was_training)
    with clock.stage("time/teacher_score_s"):
        caches = compute_top_p_cache(
            task.teacher, traj.prompts, traj.responses, buffer.cache_top_p, pad_id=task.pad_token_id
        )
    with clock.stage("time/buffer_add_s"):
        buffer.add(
            traj.prompts, traj.responses, traj.terminated, traj.truncated, caches=caches, rewards=traj.rewards,
            is_expert=False,
        )
        n = len(traj.responses)
        algo.after_rollout(range(len(buffer) - n, len(buffer)))
    stats = {
        "rollout/n": float(n * world),
        "rollout/mean_len": float(np.mean([len(r) for r in traj.responses])),
        "rollout/terminated_frac": float(np.mean(traj.terminated)),
        "rollout/buffer_size": float(len(buffer)),
    }
    return distributed.reduce_stats([stats], [1.0 / world]) if world > 1 else stats
