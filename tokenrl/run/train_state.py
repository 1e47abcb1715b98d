"""A run's train state in its checkpoints: what :func:`save_train_state` writes and :func:`resume` restores.

The state holds everything the rest of the run depends on: the algorithm (student, optimiser, schedule, target
network), the batch generator and torch's RNG, the divergence guard's ranges and skipped updates, the best
checkpoint so far with its weights (``selection.every``), the results and timings of the stages before
training, and the config. A run resumed from it continues as the uninterrupted run would have, bit for bit
(``tests/test_resume.py``). The file format (safetensors and JSON, verified on load) is
:mod:`tokenrl.run.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from algorithms import Algorithm, make_algorithm
from tokenrl.run import distributed
from tokenrl.run.checkpoint import (
    CheckpointError,
    ResumeError,
    check_resume_config,
    checkpoint_dir,
    load_latest,
    save_checkpoint,
)
from tokenrl.run.config import RunConfig
from tokenrl.run.context import RunContext

KEPT_ON_RESUME = ("teacher_eval", "init_eval", "sft", "sft_eval", "validation", "rollouts")
"""The results a resumed run keeps from before the interruption (the stages before training, and the running
records of validations and rollouts)."""
TIMINGS_KEPT_ON_RESUME = ("teacher_eval_s", "init_eval_s", "sft_s")  # the seconds of the stages before training


def find_resume_state(cfg: RunConfig, out_dir: str) -> dict | None:
    """The checkpoint ``resume=true`` continues from, checked against ``cfg``; None when not resuming.

    Raises:
        CheckpointError: ``resume=true`` but no checkpoint in ``out_dir`` (the message says where it looked),
            or none that passes verification.
        ResumeError: the checkpoint's config differs outside :data:`tokenrl.run.checkpoint.RESUME_MAY_CHANGE`, or
            the checkpoint is already past ``cfg.steps``.
    """
    if not cfg.resume:
        return None
    found = load_latest(out_dir)
    if found is None:
        raise CheckpointError(
            f"resume=true but there is no checkpoint in {checkpoint_dir(out_dir)}: pass the directory of the "
            "interrupted run (hydra.run.dir=<its output dir>), or drop resume=true to start a new run"
        )
    state, path = found
    check_resume_config(state["config"], dataclasses.asdict(cfg), path)
    if state["step"] > cfg.steps:
        raise ResumeError(
            f"checkpoint {path} is at step {state['step']}, beyond steps={cfg.steps}; set steps>={state['step']}"
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


def resume(ctx: RunContext, state: dict) -> tuple[Algorithm, int]:
    """Restore the algorithm, RNGs, divergence ranges, skipped updates, results and the best checkpoint so far
    (into ``ctx.selector``, which the caller built) of a checkpoint: ``(algorithm, step)``."""
    algo = make_algorithm(ctx.cfg.algo_name, ctx.policy, ctx.cfg.algo_config(), total_steps=ctx.cfg.steps)
    distributed.load_algo_state(algo, state["algo"], ctx.loss_fn)
    ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    ctx.guard.load_state_dict(state["guard"])
    ctx.skipped_steps = int(state["skipped_steps"])
    ctx.results.update(state["results"])
    for key, seconds in state["timings"].items():
        ctx.timings.setdefault(key, seconds)
    if ctx.selector is not None:
        ctx.selector.load_state_dict(state["selector"])
    return algo, int(state["step"])


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
        "guard": ctx.guard.state_dict(),
        "skipped_steps": ctx.skipped_steps,
        "results": {k: ctx.results[k] for k in KEPT_ON_RESUME if k in ctx.results},
        "timings": {k: v for k, v in ctx.timings.items() if k in TIMINGS_KEPT_ON_RESUME},
        "config": dataclasses.asdict(ctx.cfg),
    }
    if ctx.selector is not None:
        state["selector"] = ctx.selector.state_dict()
    return save_checkpoint(ctx.out_dir, state, step, ctx.cfg.keep_checkpoints)
