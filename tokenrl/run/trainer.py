"""The training run behind ``experiments/run.py``: data -> student -> algorithm updates -> evaluation -> artifacts.

Kept free of Hydra so it can be called from Python and tests: :func:`run` takes a
:class:`~tokenrl.run.config.RunConfig` (:func:`tokenrl.run.config.make_run_config` builds one from a composed config
or a dict) and an output directory, and writes there

* ``tb/``: TensorBoard events (losses, Q statistics, top-p set sizes, evaluation metrics),
* ``metrics.json``: final/initial/teacher evaluation, training summary with seconds per stage (``time/*_s``),
  rollout totals (``rollouts``), timed validations (``validation``) and the config (see ``experiments/report.py``),
* ``student.safetensors``: the student's weights (atomic write) and ``student/`` (``save_pretrained``),
* ``checkpoints/step-XXXXXXXX.safetensors``: model, optimiser, schedule, RNGs and step (the last
  ``keep_checkpoints``), written every ``checkpoint_every`` steps, every ``checkpoint_seconds``, on SIGTERM/SIGINT
  and at the end, so that ``resume=true`` continues an interrupted run (:mod:`tokenrl.run.checkpoint`).

:func:`run` reads as its stages: :func:`tokenrl.run.checks.check_config` and :func:`find_resume_state` (the
refusals come first), :func:`build_task`, :func:`load_data`, :func:`build_student`, then either :func:`resume`
or :func:`reference_evaluations` and :func:`warm_start`, then :func:`load_task_corpus` (only for an algorithm with
``needs_lm_batch``), :func:`train_loop`, :func:`final_evaluation` and :func:`save_outputs`. The stages share a
:class:`RunContext`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch.utils.tensorboard import SummaryWriter

from algorithms import Algorithm, get_spec, make_algorithm
from tokenrl.core.progress import track
from tokenrl.run import distributed
from tokenrl.data.buffer import Batch, ReplayBuffer, write_json_atomic
from tokenrl.run.checkpoint import (
    CheckpointError,
    ResumeError,
    _flatten,
    check_resume_config,
    checkpoint_dir,
    checkpoint_path,
    deferred_signals,
    load_latest,
    save_checkpoint,
)
from tokenrl.run.config import EvalConfig, ModelConfig, RunConfig
from tokenrl.tasks.datagen import load_or_generate_data, remove_orphaned_tmp
from tokenrl.tasks.manifest import data_manifest, dataset_dir
from tokenrl.core.divergence import DivergenceError, DivergenceGuard
from tokenrl.evaluation.metrics import evaluate_decodings, evaluate_teacher_samples
from tokenrl.tasks.hf import HFTaskConfig, build_hf_task
from tokenrl.lm.models import HFTeacher, make_student, save_student
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl_of_model
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.rollouts import StageClock, collect_rollouts
from tokenrl.lm.scoring import with_teacher_logprobs
from tokenrl.run.selection import BestCheckpoint, check_selection, train_sft, validation_score
from tokenrl.tasks.base import Task, build_synthetic_task
from tokenrl.run.checks import check_config, check_student_tokenizer
from tokenrl.tasks.corpus import load_corpus

_KEPT_ON_RESUME = ("teacher_eval", "init_eval", "sft_eval")  # results a resumed run must not recompute
_TIMINGS_KEPT_ON_RESUME = ("teacher_eval_s", "init_eval_s", "sft_s")  # the seconds of those stages


@dataclass
class RunContext:
    """What the stages of one run share."""

    cfg: RunConfig
    out_dir: str
    task: Task
    buffer: ReplayBuffer
    model: torch.nn.Module
    policy: CausalLMPolicy
    generator: torch.Generator  # batch sampling; checkpointed
    writer: SummaryWriter
    results: dict[str, Any]  # becomes metrics.json
    data_dir: str  # the offline data's folder (named by its manifest's hash)
    timings: dict[str, float]  # seconds per stage, reported under results["train"]
    guard: DivergenceGuard  # running loss / grad-norm ranges; checkpointed
    skipped_steps: int = 0  # updates refused as diverging under on_divergence=skip; checkpointed
    dist: distributed.DistContext = distributed.DistContext()  # this process's rank (a world of one by default)
    loss_module: distributed.LossForward | None = None  # its compute_loss is the current algorithm's
    loss_fn: torch.nn.Module | None = None  # loss_module, wrapped in DDP/FSDP under torchrun
    selector: BestCheckpoint | None = None  # best-validation weights of the algorithm phase (selection.every)
    corpus: ReplayBuffer | None = None  # the task's pre-training corpus, loaded when the algorithm needs_lm_batch


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds spent in the block as ``timings[key]``."""
    start = time.time()
    yield
    timings[key] = time.time() - start


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere only the
    collection), so that what a finished stage freed does not stay in the process's resident memory: glibc keeps
    freed mid-sized blocks (optimiser moments, activations) in its heap, and the next stage's peak adds to them.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg.task`` (synthetic or transformers; a transformers teacher on ``cfg.device``)."""
    if isinstance(cfg.task, HFTaskConfig):
        return build_hf_task(cfg.task, cfg.device)
    return build_synthetic_task(cfg.task)


def data_settings(cfg: RunConfig) -> dict[str, Any]:
    """The data settings of ``cfg.task`` that :func:`tokenrl.tasks.manifest.data_manifest` records."""
    return {
        "samples_per_prompt": cfg.task.samples_per_prompt,
        "cache_top_p": cfg.task.cache_top_p,
        "shard_prompts": cfg.task.shard_prompts,
        "seed": cfg.task.data_seed,
    }


def data_location(cfg: RunConfig, task: Task) -> str:
    """The dataset folder of ``cfg`` under ``cfg.data_dir``, named by a hash of its full manifest."""
    return dataset_dir(cfg.data_dir, task.name, data_manifest(task.manifest, task.train_prompts, **data_settings(cfg)))


def load_data(
    cfg: RunConfig, task: Task, dist_ctx: distributed.DistContext = distributed.DistContext()
) -> tuple[ReplayBuffer, str, bool]:
    """The task's offline teacher data under ``cfg.data_dir``: ``(buffer, data_dir, was_cached)``.

    Under torchrun the ranks generate disjoint shards (shard ``i`` on rank ``i % world_size``) and then all
    load the whole data set, which is the single-process one file for file.
    """
    data_dir = data_location(cfg, task)
    buffer, cached = load_or_generate_data(
        task.teacher,
        task.data_sampler,
        task.train_prompts,
        data_dir,
        manifest=task.manifest,
        pad_id=task.pad_token_id,
        cache_batch_size=cfg.task.cache_batch_size,
        progress=cfg.progress,
        **data_settings(cfg),
        shard_rank=dist_ctx.rank,
        shard_world=dist_ctx.world_size,
    )
    return buffer, data_dir, cached


def data_stats(buffer: ReplayBuffer, cached: bool) -> dict[str, Any]:
    """Size and top-p set statistics of the offline data (``results["data"]``)."""
    set_sizes = buffer.set_sizes()
    return {
        "data/trajectories": len(buffer),
        "data/tokens": buffer.n_tokens,
        "data/bytes_per_token": buffer.bytes_per_token(),
        "data/set_size_mean": float(set_sizes.mean()) if len(set_sizes) else 0.0,
        "data/set_size_p50": float(np.percentile(set_sizes, 50)) if len(set_sizes) else 0.0,
        "data/set_size_p99": float(np.percentile(set_sizes, 99)) if len(set_sizes) else 0.0,
        "data/set_size_max": int(set_sizes.max()) if len(set_sizes) else 0,
        "data/terminated_frac": float(np.mean(buffer.terminated)),
        "data/cached": bool(cached),
    }


def load_task_corpus(
    cfg: RunConfig, task: Task, dist_ctx: distributed.DistContext = distributed.DistContext()
) -> tuple[ReplayBuffer, dict[str, Any]]:
    """The task's pre-training corpus under ``cfg.data_dir`` (:func:`tokenrl.tasks.corpus.load_corpus`, built once
    and verified like the teacher data) and its statistics (``results["corpus"]``).

    Raises:
        ValueError: the task has no corpus.
    """
    if task.corpus is None:
        raise ValueError(
            f"algo={cfg.algo_name} asks for pre-training batches, but task {task.name!r} has no corpus; set the "
            "algorithm's LM term off or onto the distillation batch (algo.lm_batch=expert, algo.pt_coef=0)"
        )
    buffer, folder, cached = load_corpus(
        task.teacher, task.corpus(), cfg.data_dir, task.name, cache_top_p=cfg.task.cache_top_p,
        pad_id=task.pad_token_id, shard_prompts=cfg.task.shard_prompts, cache_batch_size=cfg.task.cache_batch_size,
        progress=cfg.progress, shard_rank=dist_ctx.rank, shard_world=dist_ctx.world_size,
    )
    stats = {"corpus/rows": len(buffer), "corpus/tokens": buffer.n_tokens, "corpus/cached": bool(cached), "corpus/dir": folder}
    return buffer, stats


def build_student(model_cfg: ModelConfig, task: Task, seed: int, device: str) -> torch.nn.Module:
    """The student network of ``task`` (fresh, pretrained or layer-pruned), via :func:`tokenrl.lm.models.make_student`."""
    torch.manual_seed(seed)
    if task.tokenizer is None and model_cfg.kind != "fresh":
        raise ValueError(f"model.kind={model_cfg.kind!r} needs a transformers task; the synthetic task only takes 'fresh'")
    sizes = {
        "model_type": model_cfg.arch,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.intermediate_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_heads,
    }
    student, _ = make_student(
        model_cfg.kind,
        teacher_model=task.teacher.model if isinstance(task.teacher, HFTeacher) else None,
        teacher_tokenizer=task.tokenizer,
        name_or_path=model_cfg.name_or_path,
        config_overrides={**task.student_config, **sizes},
        keep_every=model_cfg.keep_every,
        gguf_file=model_cfg.gguf_file,
        dtype=model_cfg.dtype,
        device=device,
        seed=seed,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
    )
    return student


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
    """Restore the algorithm, RNGs, divergence ranges and results of a checkpoint: ``(algorithm, step)``."""
    algo = make_algorithm(ctx.cfg.algo_name, ctx.policy, ctx.cfg.algo_config(), total_steps=ctx.cfg.steps)
    distributed.load_algo_state(algo, state["algo"], ctx.loss_fn)
    ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    ctx.guard.load_state_dict(state["guard"])
    ctx.results.update(state["results"])
    for key, seconds in state["timings"].items():
        ctx.timings.setdefault(key, seconds)
    return algo, int(state["step"])


def reference_evaluations(ctx: RunContext) -> None:
    """The teacher's own samples and the untrained student, the reference rows of the report."""
    cfg, task = ctx.cfg, ctx.task
    if not ctx.dist.is_main:
        # Evaluation runs on rank 0 alone: its samples are drawn per seed over the whole prompt list, so
        # sharding the prompts over ranks would change them.
        return
    if cfg.teacher_eval:
        with timed(ctx.timings, "teacher_eval_s"):
            prompts, references = _first(task.test_prompts, task.test_references, cfg.eval.n_prompts)
            ctx.results["teacher_eval"] = evaluate_teacher_samples(
                task.teacher, prompts, references, task.decode, task.eval_sampler,
                seeds=cfg.eval.seeds, batch_size=cfg.eval.batch_size,
            )
            # The teacher against itself on its own samples: exactly 0, as its teacher-forced KLs.
            ctx.results["teacher_eval"].update({"eval/onpolicy_kl": 0.0, "eval/onpolicy_kl_exact_state": 0.0})
    if cfg.init_eval:
        with timed(ctx.timings, "init_eval_s"):
            ctx.results["init_eval"] = evaluate_student(
                ctx.model, task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
            )
        _log_scalars(ctx.writer, ctx.results["init_eval"], 0)


def warm_start(ctx: RunContext) -> None:
    """SFT (BC) on the offline data before the algorithm (the paper's recipe), then evaluate.

    ``sft_steps`` updates, or with ``selection.sft_eval_every`` until validation stops improving (at most
    ``sft_steps``), possibly from the cache: :func:`tokenrl.run.selection.train_sft`.
    """
    cfg = ctx.cfg
    if cfg.sft_steps <= 0:
        return
    with timed(ctx.timings, "sft_s"):
        ctx.results["sft"], sft_stats = train_sft(
            cfg, ctx.task, ctx.model, ctx.policy, ctx.generator, sft_step=lambda sft: train_step(ctx, sft),
            data_dir=ctx.data_dir,
        )
        _log_scalars(ctx.writer, {f"sft/{k}": v for k, v in sft_stats.items()}, 0)
        # Free the warm start's AdamW moments (2 copies of the student) before the evaluation and the
        # algorithm's own optimiser: the loss module would otherwise keep the SFT algorithm alive.
        ctx.loss_module.compute_loss = None
        release_memory()
    with distributed.full_parameters(ctx.loss_fn):
        if ctx.dist.is_main:
            ctx.results["sft_eval"] = evaluate_student(
                ctx.model, ctx.task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
            )


def train_loop(ctx: RunContext, algo: Algorithm, start_step: int) -> dict[str, float]:
    """``algo.update`` from ``start_step`` to ``steps``, with rollouts, logging, validation and checkpoints.

    Rollout collection, batch drawing and the update are timed stages on one :class:`StageClock` (the
    training clock, ``time/*_s`` in TensorBoard and in ``results["train"]``); validations and checkpoints
    are outside it (a resumed run's clock starts again at 0). Checkpoints are written every
    ``checkpoint_every`` steps and every ``checkpoint_seconds``. SIGTERM and SIGINT end the run after the
    current update with a checkpoint. A diverging update (see :mod:`tokenrl.core.divergence`) is refused;
    ``on_divergence=stop`` then saves the state before it and raises, ``skip`` drops the batch and counts it
    in ``train/skipped_steps``.

    Returns:
        The last update's statistics.

    Raises:
        DivergenceError: ``on_divergence=stop`` and an update diverged (the step and term are named).
        KeyboardInterrupt: SIGINT or SIGTERM arrived (after the checkpoint is written).
    """
    cfg, task = ctx.cfg, ctx.task
    rollout_every = cfg.rollout_every or (10 if algo.needs_rollouts else 0)
    algo.guard = ctx.guard
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
                _log_scalars(ctx.writer, rollout_stats, step)
                _count_rollouts(ctx.results, rollout_stats)
            generator_state = ctx.generator.get_state()
            try:
                stats = train_step(ctx, algo, clock)
                ctx.guard.record(stats)
            except DivergenceError as error:
                if cfg.on_divergence != "skip":
                    ctx.generator.set_state(generator_state)  # the checkpoint is the state before this update
                    path = save_train_state(ctx, algo, step)
                    raise DivergenceError(
                        f"training diverged: {error}; the last good state (step {step}) is saved in {path}. "
                        "Lower algo.lr, set algo.grad_clip > 0, or set on_divergence=skip to drop such updates",
                        error.step, error.term, error.value,
                    ) from None
                algo.optimizer.zero_grad(set_to_none=True)
                ctx.skipped_steps += 1
            stats["train/skipped_steps"] = float(ctx.skipped_steps)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                _log_scalars(ctx.writer, {**stats, **clock.totals}, done)
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
            if due or received:
                save_train_state(ctx, algo, done)
                last_save = time.monotonic()
            if received:
                raise KeyboardInterrupt(
                    f"signal {signal.Signals(received[0]).name} at step {done}: checkpoint written to "
                    f"{checkpoint_path(ctx.out_dir, done)}; rerun with resume=true to continue"
                )
    ctx.timings.update(clock.totals)
    return stats


def validation_eval(ctx: RunContext, step: int, clock: StageClock) -> None:
    """Evaluate on the validation prompts, log ``val/*`` and append to ``results["validation"]``.

    Sampled metrics: the seeds ``eval.val_seeds`` on the first ``eval.val_n_prompts`` validation prompts;
    teacher-forced ones: every validation prompt's held-out sample (the selection score's data).

    Each record holds ``step``, ``train_clock_s`` (the training clock so far, validation excluded), the
    clock's per-stage totals and the scalar ``val/*`` metrics.
    """
    with distributed.full_parameters(ctx.loss_fn):
        if not ctx.dist.is_main:
            return
        prompts, references = _first(ctx.task.val_prompts, ctx.task.val_references, ctx.cfg.eval.val_n_prompts)
        val = evaluate_student(ctx.model, ctx.task, ctx.cfg.eval, ctx.cfg.eval.val_seeds, prompts, references)
    # eval/... -> val/..., eval_p0.8/... -> val_p0.8/...
    scalars = {k.replace("eval", "val", 1): v for k, v in val.items() if isinstance(v, (int, float))}
    _log_scalars(ctx.writer, scalars, step)
    record = {"step": step, "train_clock_s": clock.total_s, **clock.totals, **scalars}
    ctx.results.setdefault("validation", []).append(record)


def final_evaluation(ctx: RunContext) -> None:
    """Evaluate the trained student (the best validated weights with ``selection.every``) with every seed, on rank 0."""
    if not ctx.dist.is_main:
        return
    with timed(ctx.timings, "final_eval_s"):
        ctx.results["final_eval"] = evaluate_student(
            ctx.model, ctx.task, ctx.cfg.eval, ctx.cfg.eval.seeds, set_top_p=ctx.cfg.task.cache_top_p
        )
    _log_scalars(ctx.writer, ctx.results["final_eval"], ctx.cfg.steps)


def save_outputs(ctx: RunContext, last_stats: dict[str, float], data_dir: str) -> None:
    """Write the student (safetensors and ``save_pretrained``) and ``metrics.json`` (rank 0 only)."""
    if not ctx.dist.is_main:
        return
    model, out_dir = distributed.plain_copy(ctx.model, ctx.loss_fn), ctx.out_dir
    tmp = os.path.join(out_dir, f"student.safetensors.tmp-{os.getpid()}")
    save_model(model, tmp)  # drops the duplicate of tied embeddings (SmolLM2, Qwen2.5-0.5B) instead of failing
    os.replace(tmp, os.path.join(out_dir, "student.safetensors"))
    if ctx.task.tokenizer is not None:
        save_student(model, ctx.task.tokenizer, os.path.join(out_dir, "student"))
    else:
        model.save_pretrained(os.path.join(out_dir, "student"))
    ctx.results["train"] = {
        "steps": ctx.cfg.steps, "last_stats": last_stats, "data_dir": data_dir, "skipped_steps": ctx.skipped_steps,
        **ctx.timings,
    }
    ctx.results["task_info"] = ctx.task.info
    # The run's hyper-parameters with its final metrics, for TensorBoard's HParams tab (it compares runs by them),
    # before metrics.json marks the run finished; in tb_hparams/, as tb/ keeps the one event file of training.
    hparams = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in _flatten(dataclasses.asdict(ctx.cfg)).items()
    }
    final = {
        f"hparam/{key}": float(value) for key, value in ctx.results["final_eval"].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    with SummaryWriter(os.path.join(out_dir, "tb_hparams")) as writer:
        writer.add_hparams(hparams, final, run_name=".")
    write_json_atomic(os.path.join(out_dir, "metrics.json"), ctx.results)


def run(cfg: RunConfig, out_dir: str) -> dict:
    """Train and evaluate one student; returns the metrics written to ``metrics.json``.

    Under ``torchrun`` every rank calls this: they train data-parallel, rank 0 evaluates and writes the
    outputs, and every rank returns rank 0's metrics. Every check that can refuse the run comes before any
    data, model or evaluation work: the config
    (:func:`tokenrl.run.checks.check_config`), the checkpoint and its config when ``resume=true``, and the
    student's tokenizer. Resuming a finished run returns its metrics and writes nothing.
    """
    check_config(cfg)
    resume_state = find_resume_state(cfg, out_dir)
    if resume_state is not None:
        finished = finished_metrics(out_dir, resume_state, cfg)
        if finished is not None:
            print(f"the run in {out_dir} already finished its {cfg.steps} steps; nothing to do (raise steps to extend it)")
            return finished
    with distributed.process_group(cfg.device, cfg.dist.timeout_min) as (dist_ctx, device):
        if device != cfg.device:
            cfg = dataclasses.replace(cfg, device=device)
        return _run(cfg, out_dir, dist_ctx, resume_state)


def _run(cfg: RunConfig, out_dir: str, dist_ctx: distributed.DistContext, resume_state: dict | None) -> dict:
    if dist_ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        for directory in (out_dir, checkpoint_dir(out_dir)):
            remove_orphaned_tmp(directory)
    apply_threads(cfg.threads)
    spec = get_spec(cfg.algo_name)
    if dist_ctx.enabled and cfg.dist.strategy == "fsdp" and spec.cls.uses_target_network:
        raise ValueError(f"algo={cfg.algo_name} keeps a target network, which dist.strategy=fsdp does not shard; use ddp")
    accumulates = distributed.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, dist_ctx.world_size)[1] > 1
    if (dist_ctx.enabled or accumulates) and spec.cls.sample_batch is not Algorithm.sample_batch:
        raise ValueError(
            f"algo={cfg.algo_name} draws its own training batches (from its newest rollouts), which data-parallel "
            "training and gradient accumulation do not shard yet; run it in one process without micro_batch_size"
        )
    check_selection(cfg)
    sel = cfg.selection
    if dist_ctx.enabled and (sel.every or sel.sft_eval_every or sel.sft_cache):
        raise ValueError(
            "selection.every, selection.sft_eval_every and selection.sft_cache are single-process features for now "
            "(validation would run on every rank); use selection=fixed under torchrun"
        )
    if resume_state is not None and cfg.selection.every:
        raise ValueError(
            "resume=true with selection.every > 0: the best weights before the interruption are not in the "
            "checkpoint; rerun without resume, or with selection.every=0"
        )
    timings: dict[str, float] = {}
    with timed(timings, "task_build_s"):
        task = build_task(cfg)
    check_student_tokenizer(cfg, task.tokenizer)
    with timed(timings, "data_s"):
        buffer, data_dir, cached = load_data(cfg, task, dist_ctx)
    model = build_student(cfg.model, task, cfg.seed, cfg.device)
    policy = CausalLMPolicy(model, vocab_size=task.vocab_size, precision=cfg.precision, compile=cfg.compile)
    loss_module = distributed.LossForward(policy)
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
        dist=dist_ctx,
        loss_module=loss_module,
        loss_fn=distributed.wrap_for_training(loss_module, dist_ctx, cfg.dist.strategy),
    )
    if resume_state is not None:
        algo, start_step = resume(ctx, resume_state)
        ctx.skipped_steps = int(resume_state["skipped_steps"])
    else:
        with distributed.full_parameters(ctx.loss_fn):
            reference_evaluations(ctx)
        warm_start(ctx)
        # Built after the warm start so that anything copied from the policy (target networks) starts there.
        algo, start_step = make_algorithm(cfg.algo_name, ctx.policy, cfg.algo_config(), total_steps=cfg.steps), 0
    if algo.needs_lm_batch:
        with timed(timings, "corpus_s"):
            ctx.corpus, ctx.results["corpus"] = load_task_corpus(cfg, task, dist_ctx)
    if cfg.selection.every:
        ctx.selector = BestCheckpoint(ctx.model, lambda m: validation_score(m, task, cfg))
        ctx.selector.consider(0)  # the SFT start competes too
    with timed(timings, "train_s"):
        last_stats = train_loop(ctx, algo, start_step)
    save_train_state(ctx, algo, cfg.steps)
    # Past the last checkpoint the algorithm's gradients and optimiser moments (3 copies of the student) are
    # not needed: free them before the final evaluation, as the warm start frees SFT's.
    algo.zero_grad()
    ctx.loss_module.compute_loss = None
    del algo
    release_memory()
    if ctx.selector is not None:
        ctx.selector.restore()
        ctx.results["selection"] = {"metric": cfg.selection.metric, **ctx.selector.summary()}
    with distributed.full_parameters(ctx.loss_fn):
        final_evaluation(ctx)
        ctx.writer.close()
        save_outputs(ctx, last_stats, data_dir)
    return distributed.broadcast_object(ctx.results)


# --------------------------------------------------------------------------------------------------
# Pieces of the stages
# --------------------------------------------------------------------------------------------------
def _first(prompts: list, references: list, n: int | None) -> tuple[list, list]:
    """The first ``n`` prompts and their references (all when ``n`` is None or 0)."""
    return (prompts[:n], references[:n]) if n else (prompts, references)


def evaluate_student(
    model: torch.nn.Module,
    task: Task,
    eval_cfg: EvalConfig,
    seeds: Sequence[int],
    prompts: list[list[int]] | None = None,
    references: list[list[str]] | None = None,
    set_top_p: float | None = None,
) -> dict:
    """:func:`tokenrl.evaluation.metrics.evaluate_decodings` of ``model`` on the task's test prompts (or the given ones),
    plus the on-policy reverse KL on the same prompts at the first decoding top-p (``eval/onpolicy_kl``,
    ``eval/onpolicy_kl_exact_state``; see :func:`tokenrl.evaluation.onpolicy.on_policy_reverse_kl_of_model`),
    sampled with its own seed ``eval.onpolicy_kl_seed`` so the other metrics are those of the evaluation alone.

    Every ``eval_cfg.decode_top_p`` is sampled; ``set_top_p`` adds the teacher-forced set metrics. The
    teacher-forced metrics read the held-out teacher samples of the prompts' split: ``task.test_heldout`` for the
    test prompts (the default), ``task.heldout`` for given (validation) prompts.
    """
    heldout = task.test_heldout if prompts is None else task.heldout
    prompts, references = _first(
        task.test_prompts if prompts is None else prompts,
        task.test_references if references is None else references,
        eval_cfg.n_prompts,
    )
    metrics = evaluate_decodings(
        model,
        task.teacher,
        prompts,
        references,
        task.decode,
        decode_top_p=eval_cfg.decode_top_p,
        set_top_p=set_top_p,
        eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id,
        max_new_tokens=task.max_new_tokens,
        seeds=list(seeds),
        temperature=eval_cfg.temperature,
        heldout=heldout,
        batch_size=eval_cfg.batch_size,
        vocab_size=task.vocab_size,
    )
    metrics.update(
        on_policy_reverse_kl_of_model(
            model, task.teacher, prompts, task.max_new_tokens, task.pad_token_id, eval_cfg.onpolicy_kl_seed,
            top_p=eval_cfg.decode_top_p[0], batch_size=eval_cfg.batch_size, vocab_size=task.vocab_size,
        )
    )
    return metrics


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
        "results": {k: ctx.results[k] for k in _KEPT_ON_RESUME if k in ctx.results},
        "timings": {k: v for k, v in ctx.timings.items() if k in _TIMINGS_KEPT_ON_RESUME},
        "config": dataclasses.asdict(ctx.cfg),
    }
    return save_checkpoint(ctx.out_dir, state, step, ctx.cfg.keep_checkpoints)


def _count_rollouts(results: dict[str, Any], rollout_stats: dict[str, float]) -> None:
    """Running totals of the run's rollouts in ``results["rollouts"]`` (collections, trajectories, last stats)."""
    totals = results.setdefault("rollouts", {"rollout/collections": 0, "rollout/trajectories": 0})
    totals["rollout/collections"] += 1
    totals["rollout/trajectories"] += int(rollout_stats["rollout/n"])
    totals.update({k: v for k, v in rollout_stats.items() if k != "rollout/n"})


def train_step(ctx: RunContext, algo: Algorithm, clock: StageClock | None = None) -> dict[str, float]:
    """One optimiser step of ``algo`` on the next global batch (``time/batch_s`` and ``time/update_s`` on ``clock``).

    In one process without gradient accumulation the algorithm draws its batch itself
    (:meth:`~algorithms.base.Algorithm.sample_batch`); otherwise every rank draws the same global index list
    from the shared generator and keeps its micro-batches of it (:mod:`tokenrl.run.distributed`). For an algorithm
    with ``needs_lm_batch`` each batch gets its pre-training batch (:func:`attach_lm_batches`); for one with
    ``needs_teacher_logprobs`` the teacher scores every batch over the whole vocabulary (``time/teacher_score_s``).
    """
    cfg = ctx.cfg
    clock = clock or StageClock()
    micro, _ = distributed.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, ctx.dist.world_size)
    with clock.stage("time/batch_s"):
        if not ctx.dist.enabled and micro == cfg.batch_size:
            batches = [algo.sample_batch(ctx.buffer, cfg.batch_size, ctx.generator).to(cfg.device)]
        else:
            indices = distributed.global_indices(ctx.buffer, cfg.batch_size, ctx.generator)
            batches = [
                ctx.buffer.collate(part, top_p=algo.top_p).to(cfg.device)
                for part in distributed.local_micro_batches(indices, ctx.dist, micro)
            ]
        if algo.needs_lm_batch:
            batches = attach_lm_batches(ctx, algo, batches, micro)
    if algo.needs_teacher_logprobs:
        with clock.stage("time/teacher_score_s"):
            batches = [with_teacher_logprobs(b, ctx.task.teacher, ctx.task.pad_token_id) for b in batches]
    ctx.loss_module.compute_loss = algo.compute_loss
    with clock.stage("time/update_s"):
        return distributed.accumulated_update(algo, batches, ctx.loss_fn, ctx.dist)


def attach_lm_batches(ctx: RunContext, algo: Algorithm, batches: list[Batch], micro: int) -> list[Batch]:
    """``batches`` (this rank's micro-batches of one step) with their parts of one pre-training batch attached
    (``batch.lm_batch``).

    The pre-training batch has ``batch_size`` corpus rows drawn uniformly with the run's batch generator right
    after the distillation batch, so a run and its resumption draw the same ones, and is split over ranks and
    micro-steps as the distillation batch is (:func:`tokenrl.run.distributed.local_micro_batches`). Its sets are
    restricted to the algorithm's ``top_p``. Each micro-batch's LM term is a mean over its own part.
    """
    if ctx.corpus is None:
        raise ValueError(f"algo={ctx.cfg.algo_name} needs pre-training batches but the run loaded no corpus")
    indices = distributed.global_indices(ctx.corpus, ctx.cfg.batch_size, ctx.generator)
    parts = distributed.local_micro_batches(indices, ctx.dist, micro)
    return [
        dataclasses.replace(batch, lm_batch=ctx.corpus.collate(part, top_p=algo.top_p).to(ctx.cfg.device))
        for batch, part in zip(batches, parts)
    ]


def _log_scalars(writer: SummaryWriter, metrics: dict, step: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            writer.add_scalar(k, v, step)
