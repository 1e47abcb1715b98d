"""A run's train state in its checkpoints: what :func:`save_train_state` writes and :func:`resume` restores.

The state holds everything the rest of the run depends on: the algorithm (student, optimiser, schedule and its
length, target network), the batch generator and torch's RNG, the divergence guard (ranges, the weights' start
norm, the first skipped update) and skipped updates, the best checkpoint so far with its weights
(``selection.every``), the results and timings of the stages before training and of the resumes so far, and the
config. A run resumed from it continues as the uninterrupted run would have, bit for bit
(``tests/test_resume.py``); a resume that changes ``steps`` or a setting of
:data:`tokenrl.run.checkpoint.RESUME_MAY_ADJUST` is recorded (:func:`resume_entry`). The algorithm's start is
checkpointed too (:func:`start_algorithm`), and ``resume=true`` falls back to the SFT warm start's checkpoints
(:mod:`tokenrl.run.sft_checkpoints`) before it. The file format (safetensors and JSON, verified on load) is
:mod:`tokenrl.run.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import torch

from algorithms import Algorithm, make_algorithm
from tokenrl.core.divergence import weight_norm
from tokenrl.run import distributed
from tokenrl.run.checkpoint import (
    CheckpointError,
    ResumeError,
    adjusted_settings,
    check_resume_config,
    load_latest,
    no_checkpoint_message,
    save_checkpoint,
)
from tokenrl.run.config import RunConfig
from tokenrl.run.context import RunContext
from tokenrl.run.recovery import adopt_learning_rate, schedule_note
from tokenrl.run.rundir import read_owner
from tokenrl.run.sft_checkpoints import STAGE as SFT_STAGE
from tokenrl.run.sft_checkpoints import remove_sft_checkpoints

log = logging.getLogger(__name__)

KEPT_ON_RESUME = ("teacher_eval", "init_eval", "sft", "sft_eval", "validation", "rollouts", "resumes")
"""The results a resumed run keeps from before the interruption (the stages before training, the running
records of validations and rollouts, and the resumes so far)."""
TIMINGS_KEPT_ON_RESUME = ("teacher_eval_s", "init_eval_s", "sft_s")  # the seconds of the stages before training


def find_resume_state(cfg: RunConfig, out_dir: str) -> dict | None:
    """The checkpoint ``resume=true`` continues from (the algorithm's newest, else the SFT warm start's), checked
    against ``cfg``; None when not resuming, or when the directory's owner record is this run's but it stopped
    before its first checkpoint (it then starts again).

    Raises:
        CheckpointError: ``resume=true`` but no run was started in ``out_dir`` (the message says where it looked),
            or no checkpoint passes verification.
        ResumeError: the checkpoint's config differs outside the keys a resume may change
            (:data:`tokenrl.run.checkpoint.RESUME_MAY_CHANGE`, :data:`~tokenrl.run.checkpoint.RESUME_MAY_ADJUST`),
            the checkpoint is already past ``cfg.steps``, or ``selection.every`` is on and a training checkpoint
            written by an older version lacks the best checkpoint so far.
    """
    if not cfg.resume:
        return None
    found = load_latest(out_dir) or load_latest(out_dir, SFT_STAGE)
    if found is None:
        if os.path.isdir(out_dir) and read_owner(out_dir) is not None:  # check_owner found it to be this run's
            log.warning("the run in %s stopped before its first checkpoint: starting it from the beginning", out_dir)
            return None
        raise CheckpointError(no_checkpoint_message(out_dir))
    state, path = found
    check_resume_config(state["config"], dataclasses.asdict(cfg), path)
    if state["step"] > cfg.steps:
        raise ResumeError(
            f"checkpoint {path} is at step {state['step']}, beyond steps={cfg.steps}; set steps>={state['step']}"
        )
    if cfg.selection.every and state.get("stage") != SFT_STAGE and "selector" not in state:
        raise ResumeError(
            f"resume=true with selection.every > 0: the best weights before the interruption are not in {path} "
            "(written by an older version); rerun without resume, or with selection.every=0"
        )
    return state


def finished_metrics(out_dir: str, state: dict, cfg: RunConfig) -> dict | None:
    """``metrics.json`` of a run that already finished ``cfg.steps`` (resuming it changes nothing), else None."""
    path = os.path.join(out_dir, "metrics.json")
    if state["step"] != cfg.steps or not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    return metrics if metrics.get("train", {}).get("steps") == cfg.steps else None


def resume_entry(cfg: RunConfig, state: dict) -> dict[str, Any]:
    """What a resume from ``state`` changes: the step it continues from, the training settings that differ from
    the checkpoint's (``steps`` and :data:`tokenrl.run.checkpoint.RESUME_MAY_ADJUST`) and the schedule's length
    (the one the run started with: see :func:`tokenrl.run.recovery.schedule_note`)."""
    entry = {
        "from_step": int(state["step"]),
        "changed": adjusted_settings(state["config"], dataclasses.asdict(cfg)),
        "schedule_steps": int(state.get("schedule_steps", state["config"]["steps"])),
    }
    if state.get("stage") == SFT_STAGE:  # the algorithm is not built yet: its schedule is this config's
        entry.update(from_sft_step=int(state["sft_step"]), schedule_steps=cfg.steps)
    return entry


def resume(ctx: RunContext, state: dict) -> tuple[Algorithm, int]:
    """Restore the algorithm, RNGs, divergence guard, skipped updates, results and the best checkpoint so far
    (into ``ctx.selector``, which the caller built) of a training checkpoint: ``(algorithm, step)``.

    A changed ``algo.lr`` takes effect at once (:func:`tokenrl.run.recovery.adopt_learning_rate`), a changed
    ``steps`` leaves the schedule's length as it was (logged); both are recorded under ``results["resumes"]``.
    """
    schedule_steps = resume_entry(ctx.cfg, state)["schedule_steps"]
    algo = make_algorithm(ctx.cfg.algo_name, ctx.policy, ctx.cfg.algo_config(), total_steps=schedule_steps)
    distributed.load_algo_state(algo, state["algo"], ctx.loss_fn)
    if algo.config.lr != state["config"]["algo"]["lr"]:
        adopt_learning_rate(algo)
    note = schedule_note(schedule_steps, ctx.cfg.steps)
    if note is not None:
        log.warning(note)
    ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    ctx.guard.load_state_dict(state["guard"])
    ctx.skipped_steps = int(state["skipped_steps"])
    restore_results(ctx, state)
    if ctx.selector is not None:
        ctx.selector.load_state_dict(state["selector"])
    return algo, int(state["step"])


def restore_results(ctx: RunContext, state: dict) -> None:
    """The results and stage timings a checkpoint (of the algorithm or of the SFT) keeps, and the resume's entry
    under ``results["resumes"]``."""
    ctx.results.update(state["results"])
    ctx.results["resumes"] = [*ctx.results.get("resumes", []), resume_entry(ctx.cfg, state)]
    for key, seconds in state["timings"].items():
        ctx.timings.setdefault(key, seconds)


def kept_results(ctx: RunContext) -> dict[str, dict]:
    """What a checkpoint keeps of the run besides the algorithm: the results and timings of :data:`KEPT_ON_RESUME`
    and :data:`TIMINGS_KEPT_ON_RESUME`."""
    return {
        "results": {k: ctx.results[k] for k in KEPT_ON_RESUME if k in ctx.results},
        "timings": {k: v for k, v in ctx.timings.items() if k in TIMINGS_KEPT_ON_RESUME},
    }


def start_algorithm(ctx: RunContext, algo: Algorithm) -> None:
    """Checkpoint the algorithm's start (step 0: the last good state until a later checkpoint, and what a resume
    continues from instead of the SFT checkpoints, which it replaces) and the weights' norm the guard compares with."""
    ctx.guard.start_weight_norm = weight_norm(ctx.model)
    save_train_state(ctx, algo, 0)
    if ctx.dist.is_main:
        remove_sft_checkpoints(ctx.out_dir)


def save_train_state(ctx: RunContext, algo: Algorithm, step: int) -> str | None:
    """Checkpoint the run after ``step`` updates (see :mod:`tokenrl.run.checkpoint`); returns the file written.

    Every rank holds the same batch generator, and under DDP the same student and optimiser (FSDP's shards
    are gathered into the same format first, by every rank), so the state resumes on any number of processes;
    rank 0 writes it (the other ranks return None).
    """
    algo_state = distributed.algo_state(algo, ctx.loss_fn, ctx.dist)
    if not ctx.dist.is_main:
        return None
    state = {
        "algo": algo_state,
        "generator": ctx.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "schedule_steps": algo.total_steps,
        "guard": ctx.guard.state_dict(),
        "skipped_steps": ctx.skipped_steps,
        **kept_results(ctx),
        "config": dataclasses.asdict(ctx.cfg),
    }
    if ctx.selector is not None:
        state["selector"] = ctx.selector.state_dict()
    return save_checkpoint(ctx.out_dir, state, step, ctx.cfg.keep_checkpoints, protect=ctx.guard.first_skip)
