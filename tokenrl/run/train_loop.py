"""The training loop: the algorithm's updates with its rollouts, logging, validation, selection and checkpoints."""

from __future__ import annotations

import signal
import time
from typing import Any

from algorithms import Algorithm
from tokenrl.core.divergence import WEIGHTS, DivergenceError, weight_norm
from tokenrl.core.progress import track
from tokenrl.evaluation.student import validation_record
from tokenrl.run import distributed
from tokenrl.run.checkpoint import checkpoint_decision, checkpoint_path, deferred_signals
from tokenrl.run.context import RunContext, log_scalars
from tokenrl.run.recovery import divergence_stop, skip_budget_exceeded, skip_budget_message, weight_sign_message
from tokenrl.run.rollouts import StageClock, collect_rollouts
from tokenrl.run.step import train_step
from tokenrl.run.train_state import save_train_state


def train_loop(ctx: RunContext, algo: Algorithm, start_step: int) -> dict[str, float]:
    """Optimiser steps of ``algo`` (:func:`tokenrl.run.step.train_step`) from ``start_step`` to ``steps``, with
    rollouts, logging, validation, the best checkpoint (``selection.every``) and checkpoints.

    Rollout collection, batch drawing and the update are timed stages on one :class:`StageClock` (the
    training clock, ``time/*_s`` in TensorBoard and in ``results["train"]``); validations and checkpoints
    are outside it (a resumed run's clock starts again at 0). The start (step 0) is checkpointed before
    (:func:`tokenrl.run.train_state.start_algorithm`), then every ``checkpoint_every`` steps and every
    ``checkpoint_seconds``. SIGTERM and SIGINT end the run after the current update with a checkpoint; under
    torchrun every rank takes any rank's decision (:func:`tokenrl.run.checkpoint.checkpoint_decision`).

    A diverging update (see :mod:`tokenrl.core.divergence`) is refused before it changes anything, or, when the
    sign is in the weights after it, caught before any checkpoint holds them. ``on_divergence=stop`` then raises,
    naming the last good checkpoint and the fixes a resume accepts (:mod:`tokenrl.run.recovery`); ``skip`` drops
    the batch and counts it in ``train/skipped_steps``, and stops as ``stop`` does on a sign in the weights or once
    more than ``max_skipped_fraction`` of the updates were skipped.

    Returns:
        The last update's statistics.

    Raises:
        DivergenceError: the run diverged (the step, the term and the last good checkpoint are named).
        KeyboardInterrupt: SIGINT or SIGTERM arrived (after the checkpoint is written).
    """
    cfg, task = ctx.cfg, ctx.task
    rollout_every = cfg.rollout_every or (10 if algo.needs_rollouts else 0)
    algo.guard = ctx.guard
    if ctx.guard.start_weight_norm is None:  # a checkpoint written before the weight check
        ctx.guard.start_weight_norm = weight_norm(ctx.model)
    clock = StageClock()
    val_due_s = cfg.eval.val_every_s
    if cfg.eval.val_every_s and start_step == 0:
        validation_eval(ctx, 0, clock)
    stats: dict[str, float] = {}
    last_save = time.monotonic()
    bar = track(
        range(start_step, cfg.steps), f"{cfg.algo_name} train", enabled=cfg.progress, initial=start_step,
        total=cfg.steps,
    )
    with deferred_signals((signal.SIGTERM, signal.SIGINT)) as received:
        for step in bar:
            # The first step of a resumed run collects too: the algorithm's newest-rollout batch is not checkpointed.
            if rollout_every and (step % rollout_every == 0 or step == start_step):
                with distributed.full_parameters(ctx.loss_fn):
                    rollout_stats = collect_rollouts(
                        ctx.model, task, ctx.buffer, algo, cfg.rollout_prompts, cfg.seed * 1_000_003 + step, clock,
                        ctx.dist,
                    )
                log_scalars(ctx.writer, rollout_stats, step)
                count_rollouts(ctx.results, rollout_stats)
            try:
                stats = train_step(ctx, algo, clock)
                ctx.guard.check_weights(step, weight_norm(ctx.model))
                ctx.guard.record(stats)
            except DivergenceError as error:
                if cfg.on_divergence != "skip" or error.term == WEIGHTS:
                    raise _stopped(ctx, weight_sign_message(error, cfg), error) from None
                algo.zero_grad()
                ctx.skipped_steps += 1
                if ctx.guard.first_skip is None:
                    ctx.guard.first_skip = step
                if skip_budget_exceeded(ctx.skipped_steps, step + 1, cfg.max_skipped_fraction):
                    raise _stopped(ctx, skip_budget_message(cfg, ctx.skipped_steps, step + 1), error) from None
            stats["train/skipped_steps"] = float(ctx.skipped_steps)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                log_scalars(ctx.writer, {**stats, **clock.totals}, done)
                bar.set_postfix(loss=f"{stats.get('loss/total', float('nan')):.4f}")
            step_due = cfg.eval.val_every and done % cfg.eval.val_every == 0 and done < cfg.steps
            clock_due = cfg.eval.val_every_s and (clock.total_s >= val_due_s or done == cfg.steps)
            if step_due or clock_due:
                validation_eval(ctx, done, clock)
            if clock_due:
                val_due_s = (clock.total_s // cfg.eval.val_every_s + 1) * cfg.eval.val_every_s
            due = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or (
                cfg.checkpoint_seconds and time.monotonic() - last_save >= cfg.checkpoint_seconds
            )
            if ctx.selector is not None and (done % cfg.selection.every == 0 or done == cfg.steps):
                ctx.selector.consider(done)
            write, stop = checkpoint_decision(due, received)
            if write:
                save_train_state(ctx, algo, done)
                last_save = time.monotonic()
            if stop:
                raise KeyboardInterrupt(
                    f"signal {stop} at step {done}: checkpoint written to {checkpoint_path(ctx.out_dir, done)}; "
                    "rerun with resume=true to continue"
                )
    ctx.timings.update(clock.totals)
    return stats


def _stopped(ctx: RunContext, cause: str, error: DivergenceError) -> DivergenceError:
    """The error that stops a diverged run (rank 0 names the last good checkpoint; nothing of this state is saved)."""
    if ctx.dist.is_main:
        message = divergence_stop(ctx.cfg, ctx.out_dir, cause, error.term, ctx.guard.first_skip)
    else:
        message = f"training diverged: {cause} (rank 0 names the last good checkpoint)"
    return DivergenceError(message, error.step, error.term, error.value)


def validation_eval(ctx: RunContext, step: int, clock: StageClock) -> None:
    """Validate the student (:func:`tokenrl.evaluation.student.validation_record`, on rank 0), log its ``val/*``
    metrics and append the record to ``results["validation"]``."""
    with distributed.full_parameters(ctx.loss_fn):
        if not ctx.dist.is_main:
            return
        record = validation_record(ctx.model, ctx.task, ctx.cfg.eval, step, clock.totals)
    log_scalars(ctx.writer, {k: v for k, v in record.items() if k.startswith("val")}, step)
    ctx.results.setdefault("validation", []).append(record)


def count_rollouts(results: dict[str, Any], rollout_stats: dict[str, float]) -> None:
    """Running totals of the run's rollouts in ``results["rollouts"]`` (collections, trajectories, last stats)."""
    totals = results.setdefault("rollouts", {"rollout/collections": 0, "rollout/trajectories": 0})
    totals["rollout/collections"] += 1
    totals["rollout/trajectories"] += int(rollout_stats["rollout/n"])
    totals.update({k: v for k, v in rollout_stats.items() if k != "rollout/n"})
