"""The training run behind ``experiments/run.py``: data -> student -> algorithm updates -> evaluation -> artifacts.

Kept free of Hydra so it can be called from Python and tests: :func:`run` takes a
:class:`~tokenrl.run.config.RunConfig` (:func:`tokenrl.run.config.make_run_config` builds one from a composed config
or a dict) and an output directory, and writes there

* ``tb/``: TensorBoard events (losses, Q statistics, top-p set sizes, evaluation metrics),
* ``metrics.json``: final/initial/teacher evaluation, training summary with seconds per stage (``time/*_s``),
  rollout totals (``rollouts``), timed validations (``validation``) and the config (see ``experiments/report.py``),
* ``student.safetensors``: the student's weights (atomic write) and ``student/`` (``save_pretrained``),
* ``checkpoints/step-XXXXXXXX.safetensors``: the train state (:mod:`tokenrl.run.train_state`; the last
  ``keep_checkpoints``), written at the algorithm's start (step 0), every ``checkpoint_every`` steps, every
  ``checkpoint_seconds``, on SIGTERM/SIGINT and at the end, so that ``resume=true`` continues an interrupted run
  (:mod:`tokenrl.run.checkpoint`); ``checkpoints/sft-XXXXXXXX.safetensors`` the SFT warm start's until then
  (:mod:`tokenrl.run.sft_checkpoints`),
* ``owner.json`` and ``.lock``: the run that owns the directory and its lock (:mod:`tokenrl.run.rundir`).

:func:`run` reads as its stages, each in its own module:

1. the refusals: :func:`tokenrl.run.checks.check_config`, the run directory's owner
   (:func:`tokenrl.run.rundir.check_owner`), :func:`tokenrl.run.train_state.find_resume_state` and
   :func:`refuse_unsupported`, before any work;
2. the inputs (:mod:`tokenrl.run.inputs`): the task, its offline data, the student;
3. either :func:`tokenrl.run.train_state.resume` of a training checkpoint, or :func:`reference_evaluations` (or
   the results of an SFT checkpoint) and :func:`warm_start`;
4. the corpus (only for an algorithm with ``needs_lm_batch``), the start's checkpoint
   (:func:`tokenrl.run.train_state.start_algorithm`), then :func:`tokenrl.run.train_loop.train_loop` (its steps:
   :mod:`tokenrl.run.step`);
5. :func:`final_evaluation` of the student (the best validated weights with ``selection.every``) and
   :func:`tokenrl.run.outputs.save_outputs`.

The stages share a :class:`~tokenrl.run.context.RunContext`; the student's evaluations are
:mod:`tokenrl.evaluation.student`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

import torch
from torch.utils.tensorboard import SummaryWriter

from algorithms import get_spec, make_algorithm
from tokenrl.core.divergence import DivergenceGuard
from tokenrl.evaluation.student import evaluate_student, evaluate_teacher
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run import distributed
from tokenrl.core.progress import library_bars
from tokenrl.core.ranks import env_rank
from tokenrl.run.checkpoint import checkpoint_dir, deferred_signals
from tokenrl.run.checks import check_config, check_student_tokenizer
from tokenrl.run.config import RunConfig
from tokenrl.run.context import RunContext, apply_threads, log_scalars, release_memory, timed
from tokenrl.run.inputs import build_student, build_task, data_stats, load_data, load_task_corpus
from tokenrl.run.outputs import save_outputs
from tokenrl.run.selection import BestCheckpoint, train_sft, validator
from tokenrl.run.rundir import check_owner, claim_run_dir, locked_run_dir, record_resume
from tokenrl.run.sft_checkpoints import STAGE as SFT_STAGE
from tokenrl.run.sft_checkpoints import SFTCheckpoints
from tokenrl.run.step import train_step
from tokenrl.run.train_loop import train_loop
from tokenrl.run.train_state import (
    find_resume_state,
    finished_metrics,
    kept_results,
    restore_results,
    resume,
    resume_entry,
    save_train_state,
    start_algorithm,
)
from tokenrl.tasks.datagen import remove_orphaned_tmp


def run(cfg: RunConfig, out_dir: str) -> dict:
    """Train and evaluate one student; returns the metrics written to ``metrics.json``.

    Under ``torchrun`` every rank calls this: they train data-parallel, rank 0 evaluates and writes the
    outputs, and every rank returns rank 0's metrics. Every check that can refuse the run comes before any
    data, model or evaluation work, and before anything is written: the config
    (:func:`tokenrl.run.checks.check_config`), the run directory (:mod:`tokenrl.run.rundir`: locked by rank 0 for
    the whole run, refused when it holds another run, or this run's outputs without ``resume=true``), the
    checkpoint and its config when ``resume=true``, what data-parallel training does not support
    (:func:`refuse_unsupported`), and the student's tokenizer. Resuming a finished run returns its metrics and
    writes nothing.
    """
    check_config(cfg)
    config = dataclasses.asdict(cfg)
    main = env_rank() == 0  # before the process group exists: the other ranks only read the directory
    with (locked_run_dir(out_dir, create=not cfg.resume) if main else contextlib.nullcontext(None)) as lock:
        if main:
            check_owner(out_dir, config, cfg.resume)
        resume_state = find_resume_state(cfg, out_dir)
        if resume_state is not None:
            finished = finished_metrics(out_dir, resume_state, cfg)
            if finished is not None:
                print(f"the run in {out_dir} already finished its {cfg.steps} steps; nothing to do (raise steps to extend it)")
                return finished
        if main and resume_state is None:
            claim_run_dir(out_dir, config, lock)
        elif main:
            record_resume(out_dir, config, lock, resume_entry(cfg, resume_state))
        with distributed.process_group(cfg.device, cfg.dist.timeout_min) as (dist_ctx, device):
            if device != cfg.device:
                cfg = dataclasses.replace(cfg, device=device)
            return _run(cfg, out_dir, dist_ctx, resume_state)


def refuse_unsupported(cfg: RunConfig, dist_ctx: distributed.DistContext) -> None:
    """Refuse, before any work, what data-parallel training and gradient accumulation do not support yet.

    Raises:
        ValueError: FSDP with a target network; an algorithm whose batch sampler is not splittable
            (:attr:`tokenrl.data.samplers.BatchSampler.splittable`) under torchrun or ``micro_batch_size``;
            validation (``selection``) under torchrun.
    """
    spec = get_spec(cfg.algo_name)
    if dist_ctx.enabled and cfg.dist.strategy == "fsdp" and spec.cls.uses_target_network:
        raise ValueError(f"algo={cfg.algo_name} keeps a target network, which dist.strategy=fsdp does not shard; use ddp")
    accumulates = distributed.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, dist_ctx.world_size)[1] > 1
    sampler = spec.cls.make_sampler(cfg.algo_config())
    if (dist_ctx.enabled or accumulates) and not sampler.splittable:
        raise ValueError(
            f"algo={cfg.algo_name} draws its training batches with {type(sampler).__name__} (from its newest "
            "rollouts), whose batches data-parallel training and gradient accumulation do not split; run it in one "
            "process without micro_batch_size"
        )
    sel = cfg.selection
    if dist_ctx.enabled and (sel.every or sel.sft_eval_every or sel.sft_cache):
        raise ValueError(
            "selection.every, selection.sft_eval_every and selection.sft_cache are single-process features for now "
            "(validation would run on every rank); use selection=fixed under torchrun"
        )


def _run(cfg: RunConfig, out_dir: str, dist_ctx: distributed.DistContext, resume_state: dict | None) -> dict:
    if dist_ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        for directory in (out_dir, checkpoint_dir(out_dir)):
            remove_orphaned_tmp(directory)
    apply_threads(cfg.threads)
    library_bars(cfg.progress)
    refuse_unsupported(cfg, dist_ctx)
    timings: dict[str, float] = {}
    with timed(timings, "task_build_s"):
        task = build_task(cfg)
    check_student_tokenizer(cfg, task.tokenizer)
    with timed(timings, "data_s"):
        buffer, data_dir, cached = load_data(cfg, task, dist_ctx)
    model = build_student(cfg.model, task, cfg.seed, cfg.device)
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size, precision=cfg.precision, compile=cfg.compile)
    ctx = RunContext(
        cfg=cfg,
        out_dir=out_dir,
        task=task,
        buffer=buffer,
        model=model,
        policy=policy,
        generator=torch.Generator().manual_seed(cfg.seed),
        writer=SummaryWriter(os.path.join(out_dir, "tb")) if dist_ctx.is_main else distributed.NullWriter(),
        results={"algo": cfg.algo_preset, "seed": cfg.seed, "config": dataclasses.asdict(cfg), "data": data_stats(buffer, cached)},
        data_dir=data_dir,
        timings=timings,
        guard=DivergenceGuard(cfg.divergence_factor),
        loss_fn=distributed.wrap_for_training(distributed.LossForward(policy), dist_ctx, cfg.dist.strategy),
        dist=dist_ctx,
    )
    if cfg.selection.every:
        ctx.selector = BestCheckpoint(ctx.model, validator(cfg, task))  # restored by a resume
    sft_state = resume_state if resume_state is not None and resume_state.get("stage") == SFT_STAGE else None
    train_state = resume_state if sft_state is None else None
    if train_state is not None:
        algo, start_step = resume(ctx, train_state)
    else:
        if sft_state is None:
            with distributed.full_parameters(ctx.loss_fn):
                reference_evaluations(ctx)
        else:
            restore_results(ctx, sft_state)
        warm_start(ctx, sft_state)
        # Built after the warm start so that anything copied from the policy (target networks) starts there.
        algo, start_step = make_algorithm(cfg.algo_name, ctx.policy, cfg.algo_config(), total_steps=cfg.steps), 0
    if algo.needs_lm_batch:
        with timed(timings, "corpus_s"):
            ctx.corpus, ctx.results["corpus"] = load_task_corpus(cfg, task, dist_ctx)
    if train_state is None:
        if ctx.selector is not None:
            ctx.selector.consider(0)  # the SFT start competes too
        start_algorithm(ctx, algo)
    with timed(timings, "train_s"):
        last_stats = train_loop(ctx, algo, start_step)
    save_train_state(ctx, algo, cfg.steps)
    # Past the last checkpoint the algorithm's gradients and optimiser moments (3 copies of the student) are
    # not needed: free them before the final evaluation, as the warm start frees SFT's.
    algo.zero_grad()
    del algo
    release_memory()
    if ctx.selector is not None:
        ctx.selector.restore()
        ctx.results["selection"] = {"metric": cfg.selection.metric, **ctx.selector.summary()}
    with distributed.full_parameters(ctx.loss_fn):
        final_evaluation(ctx)
        ctx.writer.close()
        save_outputs(ctx, last_stats)
    return distributed.broadcast_object(ctx.results)


def reference_evaluations(ctx: RunContext) -> None:
    """The teacher's own samples and the untrained student, the reference rows of the report."""
    cfg = ctx.cfg
    if not ctx.dist.is_main:
        # Evaluation runs on rank 0 alone: its samples are drawn per seed over the whole prompt list, so
        # sharding the prompts over ranks would change them.
        return
    if cfg.teacher_eval:
        with timed(ctx.timings, "teacher_eval_s"):
            ctx.results["teacher_eval"] = evaluate_teacher(ctx.task, cfg.eval)
    if cfg.init_eval:
        with timed(ctx.timings, "init_eval_s"):
            ctx.results["init_eval"] = evaluate_student(
                ctx.model, ctx.task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
            )
        log_scalars(ctx.writer, ctx.results["init_eval"], 0)


def warm_start(ctx: RunContext, sft_state: dict | None = None) -> None:
    """SFT (BC) on the offline data before the algorithm (the paper's recipe), then evaluate.

    ``sft_steps`` updates, or with ``selection.sft_eval_every`` until validation stops improving (at most
    ``sft_steps``), possibly from the cache: :func:`tokenrl.run.selection.train_sft`. Checkpointed as training
    is (:mod:`tokenrl.run.sft_checkpoints`); ``sft_state`` is an SFT checkpoint to continue from.
    """
    cfg = ctx.cfg
    if cfg.sft_steps <= 0:
        return
    with timed(ctx.timings, "sft_s"), deferred_signals((signal.SIGTERM, signal.SIGINT)) as received:
        checkpoints = SFTCheckpoints(
            cfg, ctx.out_dir, ctx.dist, ctx.loss_fn, ctx.generator, lambda: kept_results(ctx), received, sft_state
        )
        ctx.results["sft"], sft_stats = train_sft(
            cfg, ctx.task, ctx.model, ctx.policy, ctx.generator, sft_step=lambda sft: train_step(ctx, sft),
            data_dir=ctx.data_dir, checkpoints=checkpoints,
        )
        log_scalars(ctx.writer, {f"sft/{k}": v for k, v in sft_stats.items()}, 0)
        # Hand the warm start's AdamW moments (2 copies of the student), freed with the SFT algorithm, back to
        # the OS before the evaluation and the algorithm's own optimiser.
        release_memory()
    with distributed.full_parameters(ctx.loss_fn):
        if ctx.dist.is_main:
            ctx.results["sft_eval"] = evaluate_student(
                ctx.model, ctx.task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
            )


def final_evaluation(ctx: RunContext) -> None:
    """Evaluate the trained student (the best validated weights with ``selection.every``) with every seed, on rank 0."""
    if not ctx.dist.is_main:
        return
    with timed(ctx.timings, "final_eval_s"):
        ctx.results["final_eval"] = evaluate_student(
            ctx.model, ctx.task, ctx.cfg.eval, ctx.cfg.eval.seeds, set_top_p=ctx.cfg.task.cache_top_p
        )
    log_scalars(ctx.writer, ctx.results["final_eval"], ctx.cfg.steps)
