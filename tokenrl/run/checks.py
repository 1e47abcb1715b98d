"""Start-up checks of a resolved :class:`~tokenrl.run.config.RunConfig`: every bad input is refused before any work.

The schemas already refuse unknown keys and wrongly typed values when the config is composed; :func:`check_config`
adds the ranges and cross-field constraints (cache p >= the algorithm's p, a pretrained student only on a
transformers task, ...) and the algorithm config's own problems (:meth:`algorithms.base.AlgoConfig.problems`),
and reports every problem at once, each naming its key and a fix. ("Validation" in this project is the
held-out evaluation during training, :mod:`tokenrl.run.selection`.) It is the first
call of :func:`tokenrl.run.trainer.run` and of ``experiments/generate.py``; :func:`check_student_tokenizer`
compares a pretrained student's tokenizer with the teacher's before any data shard is written.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from tokenrl.core.options import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    PROBABILITY,
    choice_problem,
    range_problem,
)
from tokenrl.lm.precision import check_precision
from tokenrl.run.config import RunConfig
from tokenrl.tasks.hf import TEMPLATES, HFTaskConfig

ON_DIVERGENCE = ("stop", "skip")
"""``on_divergence`` choices: stop the run after its last good checkpoint, or skip the update and count it."""

MODEL_KINDS = ("fresh", "pretrained", "pruned")


class ConfigError(ValueError):
    """A resolved run config that cannot give a correct run; the message lists every bad key and its fix."""


# key -> its range; keys are dotted paths into the resolved config. The algorithm's fields are checked by its
# own config (:meth:`algorithms.base.AlgoConfig.problems`).
_RANGES = {
    "steps": NON_NEGATIVE,
    "sft_steps": NON_NEGATIVE,
    "sft_lr": POSITIVE,
    "batch_size": POSITIVE,
    "threads": NON_NEGATIVE.explained("0 = torch default"),
    "log_every": POSITIVE,
    "checkpoint_every": NON_NEGATIVE.explained("0 = time-based only"),
    "checkpoint_seconds": NON_NEGATIVE.explained("0 = step-based only"),
    "keep_checkpoints": AT_LEAST_ONE,
    "divergence_factor": POSITIVE,
    "rollout_every": NON_NEGATIVE,
    "rollout_prompts": POSITIVE,
    "eval.temperature": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.val_every": NON_NEGATIVE,
    "model.hidden_size": POSITIVE,
    "model.num_layers": POSITIVE,
    "model.num_heads": POSITIVE,
    "model.intermediate_size": POSITIVE,
    "model.keep_every": AT_LEAST_ONE,
    "task.max_new_tokens": POSITIVE,
    "task.samples_per_prompt": POSITIVE,
    "task.sample_top_p": PROBABILITY,
    "task.cache_top_p": PROBABILITY,
    "task.shard_prompts": POSITIVE,
    "task.cache_batch_size": POSITIVE,
    # synthetic task
    "task.n_train_prompts": POSITIVE,
    "task.n_val_prompts": POSITIVE,
    "task.n_test_prompts": POSITIVE,
    "task.n_references": NON_NEGATIVE,
    # transformers task
    "task.sample_temperature": POSITIVE,
    "task.max_prompt_tokens": POSITIVE,
    "task.gen_batch_size": POSITIVE,
    "task.val_fraction": OPEN_UNIT,
    "task.test_fraction": OPEN_UNIT,
}

_OPTIONAL_POSITIVE = ("eval.n_prompts", "task.max_train_prompts", "task.max_val_prompts", "task.max_test_prompts")


def _lookup(cfg: RunConfig, key: str):
    """The value at dotted ``key``, or ``dataclasses.MISSING`` when that node has no such field."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return dataclasses.MISSING
        node = getattr(node, part)
    return node


def config_problems(cfg: RunConfig) -> list[str]:
    """Every range or cross-field violation of ``cfg``, the algorithm's own included, one line each with its fix."""
    problems = []
    for key, rule in _RANGES.items():
        value = _lookup(cfg, key)
        if value is not dataclasses.MISSING and value is not None:
            problems.append(range_problem(key, value, rule))
    for key in _OPTIONAL_POSITIVE:
        value = _lookup(cfg, key)
        if value is not None and value is not dataclasses.MISSING and value <= 0:
            problems.append(f"{key}={value!r}: must be > 0 or null (all); set {key}=null or a positive count")
    problems.append(choice_problem("on_divergence", cfg.on_divergence, ON_DIVERGENCE))
    problems += cfg.algo.problems()
    if not cfg.eval.seeds:
        problems.append("eval.seeds=[]: needs at least one seed; set eval.seeds=[0]")
    if not cfg.eval.decode_top_p or not all(PROBABILITY.ok(p) for p in cfg.eval.decode_top_p):
        problems.append(
            f"eval.decode_top_p={list(cfg.eval.decode_top_p)!r}: needs one or more values in (0, 1]; "
            "set eval.decode_top_p=[1.0,0.8]"
        )
    problems += _cross_field_problems(cfg)
    return [line for line in problems if line is not None]


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    problems = []
    algo_p = getattr(cfg.algo, "top_p", None)
    cache_p = cfg.task.cache_top_p
    # Each algorithm config says whether its loss reads the cached sets (at top_p = 1 the full-vocabulary losses
    # do not, so any task.cache_top_p serves them).
    reads_cache = cfg.algo.reads_cached_sets()
    if reads_cache and algo_p is not None and PROBABILITY.ok(algo_p) and PROBABILITY.ok(cache_p) and cache_p < algo_p:
        problems.append(
            f"task.cache_top_p={cache_p} < algo.top_p={algo_p}: the stored teacher sets are smaller than the "
            f"sets the algorithm trains on; set task.cache_top_p>={algo_p} (new data) or algo.top_p<={cache_p}"
        )
    model = cfg.model
    if model.kind not in MODEL_KINDS:
        problems.append(f"model.kind={model.kind!r}: must be one of {MODEL_KINDS}")
    elif model.kind != "fresh" and not isinstance(cfg.task, HFTaskConfig):
        problems.append(
            f"model.kind={model.kind!r}: needs a transformers task (task=smollm2, ...); the synthetic task only "
            "takes model.kind=fresh"
        )
    elif model.kind == "pretrained" and not model.name_or_path:
        problems.append("model.name_or_path=None: model.kind=pretrained needs a hub id, directory or .gguf path")
    if model.kind == "fresh" and model.num_heads > 0 and model.hidden_size % model.num_heads:
        problems.append(
            f"model.hidden_size={model.hidden_size} is not a multiple of model.num_heads={model.num_heads}; "
            "change one of them"
        )
    if not isinstance(getattr(torch, model.dtype, None), torch.dtype):
        problems.append(f"model.dtype={model.dtype!r}: not a torch dtype; use float32, bfloat16 or float16")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device!r}: CUDA is not available on this machine; set device=cpu")
    elif isinstance(getattr(torch, model.dtype, None), torch.dtype):
        problems += check_precision(cfg.precision, cfg.device, model.dtype)
    if isinstance(cfg.task, HFTaskConfig):
        task = cfg.task
        for key in ("teacher", "prompts_file"):
            if getattr(task, key) in (None, "???"):
                problems.append(f"task.{key} is not set: the hf task needs it (see tokenrl.tasks.hf.HFTaskConfig)")
        if task.prompts_file not in (None, "???") and not os.path.isfile(task.prompts_file):
            problems.append(f"task.prompts_file={task.prompts_file!r}: no such file (cwd {os.getcwd()})")
        if task.template not in TEMPLATES:
            problems.append(f"task.template={task.template!r}: must be one of {TEMPLATES}")
        fractions = (task.val_fraction, task.test_fraction)
        if all(PROBABILITY.ok(f) for f in fractions) and sum(fractions) >= 1:
            problems.append(
                f"task.val_fraction + task.test_fraction = {task.val_fraction + task.test_fraction} leaves no "
                "training prompt; lower one of them"
            )
    return problems


def check_config(cfg: RunConfig) -> None:
    """Refuse a config that cannot give a correct run, before any data, model or evaluation work.

    Args:
        cfg: the resolved run config.

    Raises:
        ConfigError: listing every bad key with its value, the allowed range and the fix.
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))


def check_student_tokenizer(cfg: RunConfig, teacher_tokenizer) -> None:
    """A pretrained student must share the teacher's vocabulary; checked from its tokenizer files alone.

    Args:
        cfg: the resolved run config.
        teacher_tokenizer: the task's tokenizer (None for the synthetic task, which has no pretrained students).

    Raises:
        ValueError: naming both tokenizers and the first differing token (see
            :func:`tokenrl.lm.loading.check_same_vocabulary`).
    """
    if cfg.model.kind != "pretrained" or teacher_tokenizer is None:
        return
    from transformers import AutoTokenizer

    from tokenrl.lm.loading import check_same_vocabulary

    path, gguf_file = cfg.model.name_or_path, cfg.model.gguf_file
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.split(os.path.abspath(path))  # as tokenrl.lm.loading.load_causal_lm reads it
    student_tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    check_same_vocabulary(teacher_tokenizer, student_tokenizer)
