"""The run's inputs: its task, the task's offline teacher data and pre-training corpus, and the student network.

Each is built once per run (the data and the corpus from their cache under ``data_dir`` when it holds them);
under torchrun the ranks generate disjoint shards and then all load the whole data set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenrl.data.buffer import ReplayBuffer
from tokenrl.lm.models import HFTeacher, make_student
from tokenrl.run import distributed
from tokenrl.run.config import ModelConfig, RunConfig
from tokenrl.tasks.base import Task, build_synthetic_task
from tokenrl.tasks.corpus import load_corpus
from tokenrl.tasks.datagen import load_or_generate_data
from tokenrl.tasks.hf import HFTaskConfig, build_hf_task
from tokenrl.tasks.manifest import data_manifest, dataset_dir


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
