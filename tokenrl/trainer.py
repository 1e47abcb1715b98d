"""The training run behind ``experiments/run.py``: data -> student -> algorithm updates -> evaluation -> artifacts.

Kept free of Hydra so it can be called from Python and tests: :func:`run` takes a
:class:`~tokenrl.config.RunConfig` (:func:`tokenrl.config.make_run_config` builds one from a composed config
or a dict) and an output directory, and writes there

* ``tb/``: TensorBoard events (losses, Q statistics, top-p set sizes, evaluation metrics),
* ``metrics.json``: final/initial/teacher evaluation, training summary and the config (see ``experiments/report.py``),
* ``student.safetensors``: the student's weights (atomic write) and ``student/`` (``save_pretrained``),
* ``train_state.pt``: optimiser, schedule, RNG and step, written every ``checkpoint_every`` steps so that
  ``resume=true`` continues an interrupted run.

:func:`run` reads as its stages: :func:`build_task`, :func:`load_data`, :func:`build_student`, then either
:func:`resume` or :func:`reference_evaluations` and :func:`warm_start`, then :func:`train_loop`,
:func:`final_evaluation` and :func:`save_outputs`. The stages share a :class:`RunContext`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from algorithms import Algorithm, make_algorithm
from envs import BatchedTokenGenerationEnv
from envs.top_p_wrapper import top_p_restricted_policy
from tokenrl.buffer import ReplayBuffer, write_json_atomic
from tokenrl.config import EvalConfig, ModelConfig, RunConfig
from tokenrl.datagen import compute_top_p_cache, load_or_generate_data
from tokenrl.evaluation import evaluate_decodings, evaluate_teacher_samples
from tokenrl.hf_task import HFTaskConfig, build_hf_task
from tokenrl.models import HFTeacher, IncrementalTeacher, make_student, save_student
from tokenrl.policy import CausalLMPolicy
from tokenrl.sampling import KVCacheStepper
from tokenrl.selection import BestCheckpoint, check_selection, train_sft, validation_score
from tokenrl.tasks import Task, build_synthetic_task

TRAIN_STATE = "train_state.pt"
_KEPT_ON_RESUME = ("teacher_eval", "init_eval", "sft_eval")  # results a resumed run must not recompute


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
    timings: dict[str, float]  # seconds per stage, reported under results["train"]
    selector: BestCheckpoint | None = None  # best-validation weights of the algorithm phase (selection.every)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds spent in the block as ``timings[key]``."""
    start = time.time()
    yield
    timings[key] = time.time() - start


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg.task`` (synthetic or transformers)."""
    if isinstance(cfg.task, HFTaskConfig):
        return build_hf_task(cfg.task)
    return build_synthetic_task(cfg.task)


def load_data(cfg: RunConfig, task: Task) -> tuple[ReplayBuffer, str, bool]:
    """The task's offline teacher data under ``cfg.data_dir``: ``(buffer, data_dir, was_cached)``."""
    data_dir = os.path.join(cfg.data_dir, task.data_key())
    buffer, cached = load_or_generate_data(
        task.teacher,
        task.data_sampler,
        task.train_prompts,
        data_dir,
        samples_per_prompt=cfg.task.samples_per_prompt,
        cache_top_p=cfg.task.cache_top_p,
        manifest=task.manifest,
        shard_prompts=cfg.task.shard_prompts,
        seed=cfg.task.data_seed,
        pad_id=task.pad_token_id,
        cache_batch_size=cfg.task.cache_batch_size,
        progress=cfg.progress,
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


def build_student(model_cfg: ModelConfig, task: Task, seed: int, device: str) -> torch.nn.Module:
    """The student network of ``task`` (fresh, pretrained or layer-pruned), via :func:`tokenrl.models.make_student`."""
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
    )
    return student


def resume(ctx: RunContext) -> tuple[Algorithm, int] | None:
    """Restore the algorithm, RNGs and results of ``train_state.pt``: ``(algorithm, step)``, None without one."""
    path = os.path.join(ctx.out_dir, TRAIN_STATE)
    if not (ctx.cfg.resume and os.path.exists(path)):
        return None
    state = torch.load(path, weights_only=False)
    algo = make_algorithm(ctx.cfg.algo_name, ctx.policy, ctx.cfg.algo_config(), total_steps=ctx.cfg.steps)
    algo.load_state_dict(state["algo"])
    ctx.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    ctx.results.update(state.get("results", {}))
    return algo, int(state["step"])


def reference_evaluations(ctx: RunContext) -> None:
    """The teacher's own samples and the untrained student, the reference rows of the report."""
    cfg, task = ctx.cfg, ctx.task
    if cfg.teacher_eval:
        with timed(ctx.timings, "teacher_eval_s"):
            prompts, references = _first(task.test_prompts, task.test_references, cfg.eval.n_prompts)
            ctx.results["teacher_eval"] = evaluate_teacher_samples(
                task.teacher, prompts, references, task.decode, task.eval_sampler,
                seeds=cfg.eval.seeds, batch_size=cfg.eval.batch_size,
            )
    if cfg.init_eval:
        with timed(ctx.timings, "init_eval_s"):
            ctx.results["init_eval"] = evaluate_student(
                ctx.model, task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
            )
        _log_scalars(ctx.writer, ctx.results["init_eval"], 0)


def warm_start(ctx: RunContext) -> None:
    """SFT (BC) on the offline data before the algorithm (the paper's recipe), then evaluate.

    ``sft_steps`` updates, or with ``selection.sft_eval_every`` until validation stops improving (at most
    ``sft_steps``), possibly from the cache: :func:`tokenrl.selection.train_sft`.
    """
    cfg = ctx.cfg
    if cfg.sft_steps <= 0:
        return
    with timed(ctx.timings, "sft_s"):
        ctx.results["sft"], sft_stats = train_sft(cfg, ctx.task, ctx.model, ctx.policy, ctx.buffer, ctx.generator)
        _log_scalars(ctx.writer, {f"sft/{k}": v for k, v in sft_stats.items()}, 0)
    ctx.results["sft_eval"] = evaluate_student(
        ctx.model, ctx.task, cfg.eval, cfg.eval.seeds, set_top_p=cfg.task.cache_top_p
    )


def train_loop(ctx: RunContext, algo: Algorithm, start_step: int) -> dict[str, float]:
    """``algo.update`` from ``start_step`` to ``steps``, with rollouts, logging, validation and checkpoints.

    Returns the last update's statistics.
    """
    cfg, task = ctx.cfg, ctx.task
    rollout_every = cfg.rollout_every or (10 if algo.needs_rollouts else 0)
    stats: dict[str, float] = {}
    bar = tqdm(
        range(start_step, cfg.steps), desc=f"{cfg.algo_name} train", disable=not cfg.progress,
        initial=start_step, total=cfg.steps,
    )
    for step in bar:
        if rollout_every and step % rollout_every == 0:
            rollout_seed = cfg.seed * 1_000_003 + step
            _log_scalars(
                ctx.writer, collect_rollouts(ctx.model, task, ctx.buffer, cfg.rollout_prompts, algo.top_p, rollout_seed), step
            )
        stats = algo.update(ctx.buffer.sample(cfg.batch_size, ctx.generator, top_p=algo.top_p).to(cfg.device))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            _log_scalars(ctx.writer, stats, done)
            bar.set_postfix(loss=f"{stats['loss/total']:.4f}")
        if cfg.eval.val_every and done % cfg.eval.val_every == 0 and done < cfg.steps:
            val = evaluate_student(ctx.model, task, cfg.eval, [0], task.val_prompts, task.val_references)
            _log_scalars(ctx.writer, {k.replace("eval", "val", 1): v for k, v in val.items()}, done)
        if ctx.selector is not None and (done % cfg.selection.every == 0 or done == cfg.steps):
            ctx.selector.consider(done)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_train_state(ctx, algo, done)
    return stats


def final_evaluation(ctx: RunContext) -> None:
    """Evaluate the trained student (the best validated weights with ``selection.every``) with every seed."""
    with timed(ctx.timings, "final_eval_s"):
        ctx.results["final_eval"] = evaluate_student(
            ctx.model, ctx.task, ctx.cfg.eval, ctx.cfg.eval.seeds, set_top_p=ctx.cfg.task.cache_top_p
        )
    _log_scalars(ctx.writer, ctx.results["final_eval"], ctx.cfg.steps)


def save_outputs(ctx: RunContext, last_stats: dict[str, float], data_dir: str) -> None:
    """Write the student (safetensors and ``save_pretrained``) and ``metrics.json``."""
    model, out_dir = ctx.model, ctx.out_dir
    tmp = os.path.join(out_dir, f"student.safetensors.tmp-{os.getpid()}")
    save_model(model, tmp)  # drops the duplicate of tied embeddings (SmolLM2, Qwen2.5-0.5B) instead of failing
    os.replace(tmp, os.path.join(out_dir, "student.safetensors"))
    if ctx.task.tokenizer is not None:
        save_student(model, ctx.task.tokenizer, os.path.join(out_dir, "student"))
    else:
        model.save_pretrained(os.path.join(out_dir, "student"))
    ctx.results["train"] = {"steps": ctx.cfg.steps, "last_stats": last_stats, "data_dir": data_dir, **ctx.timings}
    ctx.results["task_info"] = ctx.task.info
    write_json_atomic(os.path.join(out_dir, "metrics.json"), ctx.results)


def run(cfg: RunConfig, out_dir: str) -> dict:
    """Train and evaluate one student; returns the metrics written to ``metrics.json``."""
    os.makedirs(out_dir, exist_ok=True)
    apply_threads(cfg.threads)
    cfg.algo_config()  # validate the algorithm's options before any expensive work
    check_selection(cfg)
    if cfg.resume and cfg.selection.every and os.path.exists(os.path.join(out_dir, TRAIN_STATE)):
        raise ValueError(
            "resume=true with selection.every > 0: the best weights before the interruption are not in "
            f"{TRAIN_STATE}; rerun without resume, or with selection.every=0"
        )
    timings: dict[str, float] = {}
    with timed(timings, "task_build_s"):
        task = build_task(cfg)
    with timed(timings, "data_s"):
        buffer, data_dir, cached = load_data(cfg, task)
    model = build_student(cfg.model, task, cfg.seed, cfg.device)
    ctx = RunContext(
        cfg=cfg,
        out_dir=out_dir,
        task=task,
        buffer=buffer,
        model=model,
        policy=CausalLMPolicy(model, vocab_size=task.vocab_size),
        generator=torch.Generator().manual_seed(cfg.seed),
        writer=SummaryWriter(os.path.join(out_dir, "tb")),
        results={"algo": cfg.algo_name, "seed": cfg.seed, "config": dataclasses.asdict(cfg), "data": data_stats(buffer, cached)},
        timings=timings,
    )
    resumed = resume(ctx)
    if resumed is None:
        reference_evaluations(ctx)
        warm_start(ctx)
        # Built after the warm start so that anything copied from the policy (target networks) starts there.
        resumed = make_algorithm(cfg.algo_name, ctx.policy, cfg.algo_config(), total_steps=cfg.steps), 0
    algo, start_step = resumed
    if cfg.selection.every:
        ctx.selector = BestCheckpoint(ctx.model, lambda m: validation_score(m, task, cfg))
        ctx.selector.consider(0)  # the SFT start competes too
    with timed(timings, "train_s"):
        last_stats = train_loop(ctx, algo, start_step)
    save_train_state(ctx, algo, cfg.steps)
    if ctx.selector is not None:
        ctx.selector.restore()
        ctx.results["selection"] = {"metric": cfg.selection.metric, **ctx.selector.summary()}
    final_evaluation(ctx)
    ctx.writer.close()
    save_outputs(ctx, last_stats, data_dir)
    return ctx.results


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
    """:func:`tokenrl.evaluation.evaluate_decodings` of ``model`` on the task's test prompts (or the given ones).

    Every ``eval_cfg.decode_top_p`` is sampled; ``set_top_p`` adds the teacher-forced set metrics.
    """
    prompts, references = _first(
        task.test_prompts if prompts is None else prompts,
        task.test_references if references is None else references,
        eval_cfg.n_prompts,
    )
    return evaluate_decodings(
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
        heldout=task.heldout,
        batch_size=eval_cfg.batch_size,
        vocab_size=task.vocab_size,
    )


def save_train_state(ctx: RunContext, algo: Algorithm, step: int) -> None:
    """Write ``train_state.pt`` (algorithm, RNGs, step, reference results) atomically."""
    state = {
        "algo": algo.state_dict(),
        "generator": ctx.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "results": {k: ctx.results[k] for k in _KEPT_ON_RESUME if k in ctx.results},
    }
    path = os.path.join(ctx.out_dir, TRAIN_STATE)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def collect_rollouts(model, task: Task, buffer, n_prompts: int, top_p: float | None, seed: int) -> dict[str, float]:
    """Sample student rollouts on training prompts through the batched env and add them to ``buffer``.

    With ``top_p < 1`` the student samples inside the teacher's top-p set (the top-p MDP's action set), so
    every learner action has a cached Q. Rollouts are added with ``is_expert=False`` and their top-p cache.
    """
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(task.train_prompts), size=min(n_prompts, len(task.train_prompts)), replace=False)
    prompts = [task.train_prompts[i] for i in idx]
    env = BatchedTokenGenerationEnv(
        task.vocab_size, task.eos_token_id, task.max_new_tokens, max(len(p) for p in prompts),
        pad_token_id=task.pad_token_id,
    )
    was_training = model.training
    model.eval()
    teacher = task.teacher
    if task.tokenizer is not None:
        # Transformers models: one KV-cached step per env step for both the student and the teacher.
        policy_fn = IncrementalTeacher(HFTeacher(model, task.tokenizer)).next_token_logits
        if isinstance(teacher, HFTeacher):
            teacher = IncrementalTeacher(teacher)
    else:
        policy_fn = torch.no_grad()(KVCacheStepper(model, task.pad_token_id, task.vocab_size).next_token_logits)
    if top_p is not None and top_p < 1.0:
        policy_fn = top_p_restricted_policy(policy_fn, teacher, top_p)
    traj = env.rollout(policy_fn, prompts=prompts, seed=seed)
    model.train(was_training)
    caches = compute_top_p_cache(task.teacher, traj.prompts, traj.responses, buffer.cache_top_p, pad_id=task.pad_token_id)
    buffer.add(traj.prompts, traj.responses, traj.terminated, traj.truncated, caches=caches, rewards=traj.rewards, is_expert=False)
    return {"rollout/mean_len": float(np.mean([len(r) for r in traj.responses])), "rollout/buffer_size": float(len(buffer))}


def _log_scalars(writer: SummaryWriter, metrics: dict, step: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            writer.add_scalar(k, v, step)
