"""One optimiser step of any algorithm: the only way the trainer updates a student (the SFT warm start too).

1. **Batches** (:func:`draw_batches`): the algorithm's sampler (:mod:`tokenrl.data.samplers`) draws the rows of
   the global batch with the run's seeded generator; every rank draws the same rows and keeps its micro-batches
   of them (:func:`tokenrl.run.distributed.local_micro_batches`; one process without accumulation keeps one
   micro-batch, the whole batch). For an algorithm with ``needs_lm_batch`` the uniform sampler then draws a
   pre-training batch from the corpus with the same generator, split alike, one part attached to each
   micro-batch (``batch.lm_batch``).
2. **Teacher scores**: for an algorithm with ``needs_teacher_logprobs`` the teacher scores every micro-batch over
   the whole vocabulary (:func:`tokenrl.lm.scoring.with_teacher_logprobs`).
3. **Update** (:func:`optimizer_update`): the algorithm's loss on each micro-batch, asked for through the
   student's DDP/FSDP wrapper (:class:`tokenrl.run.distributed.LossForward`), refused by the divergence guard or
   backpropagated with its share of the global batch's response tokens as weight (gradients synchronised on the
   last micro-batch only); then one optimiser step of the algorithm.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from torch import nn

from algorithms import Algorithm
from tokenrl.data.buffer import Batch, ReplayBuffer
from tokenrl.data.samplers import BatchSampler
from tokenrl.lm.scoring import with_teacher_logprobs
from tokenrl.run import distributed
from tokenrl.run.context import RunContext
from tokenrl.run.rollouts import StageClock


def train_step(ctx: RunContext, algo: Algorithm, clock: StageClock | None = None) -> dict[str, float]:
    """One optimiser step of ``algo`` on the next global batch; returns the step's stats.

    ``time/batch_s``, ``time/teacher_score_s`` (algorithms with ``needs_teacher_logprobs``) and
    ``time/update_s`` go on ``clock``.
    """
    cfg = ctx.cfg
    clock = clock or StageClock()
    micro, _ = distributed.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, ctx.dist.world_size)
    with clock.stage("time/batch_s"):
        batches = draw_batches(ctx, algo, micro)
    if algo.needs_teacher_logprobs:
        with clock.stage("time/teacher_score_s"):
            batches = [with_teacher_logprobs(b, ctx.task.teacher, ctx.task.pad_token_id) for b in batches]
    with clock.stage("time/update_s"):
        return optimizer_update(algo, batches, ctx.loss_fn, ctx.dist)


def draw_batches(ctx: RunContext, algo: Algorithm, micro: int) -> list[Batch]:
    """This rank's micro-batches of the next global batch (``cfg.batch_size`` rows of ``algo.sampler``), on the
    run's device, with the cached sets at the algorithm's ``top_p``; with their parts of a pre-training batch
    attached when the algorithm ``needs_lm_batch``.

    The pre-training batch has ``batch_size`` corpus rows drawn uniformly with the run's batch generator right
    after the distillation batch, so a run and its resumption draw the same ones. Each micro-batch's LM term is
    a mean over its own part.

    Raises:
        ValueError: the algorithm needs pre-training batches and the run loaded no corpus.
    """
    cfg = ctx.cfg
    rows = algo.sampler.rows(ctx.buffer, cfg.batch_size, ctx.generator)
    batches = _collate_parts(ctx, ctx.buffer, rows, micro, algo.top_p)
    if not algo.needs_lm_batch:
        return batches
    if ctx.corpus is None:
        raise ValueError(f"algo={cfg.algo_name} needs pre-training batches but the run loaded no corpus")
    lm_rows = BatchSampler().rows(ctx.corpus, cfg.batch_size, ctx.generator)
    lm_batches = _collate_parts(ctx, ctx.corpus, lm_rows, micro, algo.top_p)
    return [dataclasses.replace(batch, lm_batch=lm) for batch, lm in zip(batches, lm_batches)]


def _collate_parts(ctx: RunContext, buffer: ReplayBuffer, rows: list[int], micro: int, top_p: float | None) -> list[Batch]:
    """This rank's micro-batches of the global ``rows`` of ``buffer``, collated at ``top_p`` on the run's device."""
    parts = distributed.local_micro_batches(rows, ctx.dist, micro)
    return [buffer.collate(part, top_p=top_p).to(ctx.cfg.device) for part in parts]


def optimizer_update(
    algo: Algorithm, micro_batches: list[Batch], loss_fn: nn.Module, dist: distributed.DistContext
) -> dict[str, float]:
    """One optimiser step of ``algo`` on this rank's micro-batches of a global batch.

    Each micro-batch's loss comes from ``loss_fn(algo, batch)`` (the student's :class:`LossForward`, DDP/FSDP
    around it under torchrun). A single process with one micro-batch backpropagates it as it is (the unsharded
    step, exactly :meth:`Algorithm.update`); otherwise micro-batch ``i``'s loss is scaled by
    ``world_size * n_i / N`` (its valid response tokens over the global batch's; see
    :mod:`tokenrl.run.distributed`), gradients are synchronised on the last micro-batch only, and the stats are
    the token-weighted mean over every rank's micro-batches.

    Args:
        algo: the algorithm being trained.
        micro_batches: this rank's micro-batches (already on the device).
        loss_fn: the wrapped loss of :func:`tokenrl.run.distributed.wrap_for_training`.
        dist: the data-parallel context.

    Raises:
        DivergenceError: the algorithm's guard refused a loss or the gradient norm (nothing was stepped).
        ValueError: the global batch has no valid response tokens.
    """
    weights = _token_weights(micro_batches, dist)
    algo.zero_grad()
    algo.policy.train()
    per_micro = []
    for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
        with _gradient_sync(loss_fn, i == len(micro_batches) - 1):
            loss, stats = loss_fn(algo, batch)
            algo.backward(loss, stats, loss_scale=weight * dist.world_size)
        per_micro.append(stats)
    if len(per_micro) == 1 and not dist.enabled:
        return algo.optimizer_step(per_micro[0])
    return algo.optimizer_step(distributed.reduce_stats(per_micro, weights))


def _token_weights(micro_batches: list[Batch], dist: distributed.DistContext) -> list[float]:
    """Each micro-batch's share of the global batch's valid response tokens (1.0 for the one batch of one process)."""
    if len(micro_batches) == 1 and not dist.enabled:
        return [1.0]
    tokens = [float(b.action_mask_BT.sum()) for b in micro_batches]
    total = distributed.all_reduce_sum([sum(tokens)])[0]
    if total <= 0:
        raise ValueError("the global batch has no valid response tokens; check the data (empty responses?)")
    return [n / total for n in tokens]


@contextlib.contextmanager
def _gradient_sync(loss_fn: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) unless ``sync`` (the last micro-batch)."""
    if isinstance(loss_fn, nn.parallel.DistributedDataParallel) and not sync:
        with loss_fn.no_sync():
            yield
    elif distributed.is_fsdp(loss_fn):
        loss_fn.set_requires_gradient_sync(sync)
        yield
    else:
        yield
