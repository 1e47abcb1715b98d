"""Start-up checks of a resolved :class:`~tokenrl.run.config.RunConfig`: every bad input is refused before any work.

The schemas already refuse unknown keys and wrongly typed values when the config is composed; :func:`validate`
adds the ranges and cross-field constraints (cache p >= the algorithm's p, a pretrained student only on a
transformers task, ...) and reports every problem at once, each naming its key and a fix. It is the first
call of :func:`tokenrl.run.trainer.run` and of ``experiments/generate.py``; :func:`check_student_tokenizer`
compares a pretrained student's tokenizer with the teacher's before any data shard is written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from algorithms.iql_bd import CHI2_CHOICES, EXPERT_TERM_CHOICES, Q_SHIFT_CHOICES, VALUE_CHOICES
from algorithms.soft_q import REWARD_CHOICES
from tokenrl.lm.precision import check_precision
from tokenrl.run.config import RunConfig
from tokenrl.tasks.hf import TEMPLATES, HFTaskConfig

ON_DIVERGENCE = ("stop", "skip")
"""``on_divergence`` choices: stop the run after its last good checkpoint, or skip the update and count it."""

MODEL_KINDS = ("fresh", "pretrained", "pruned")


class ConfigError(ValueError):
    """A resolved run config that cannot give a correct run; the message lists every bad key and its fix."""


def _positive(x) -> bool:
    return x > 0


def _non_negative(x) -> bool:
    return x >= 0


def _probability(x) -> bool:
    return 0.0 < x <= 1.0


def _unit_interval(x) -> bool:
    return 0.0 <= x <= 1.0


# key -> (test, what the value must be); keys are dotted paths into the resolved config.
_RANGES: dict[str, tuple[Callable, str]] = {
    "steps": (_non_negative, ">= 0"),
    "sft_steps": (_non_negative, ">= 0"),
    "sft_lr": (_positive, "> 0"),
    "batch_size": (_positive, "> 0"),
    "threads": (_non_negative, ">= 0 (0 = torch default)"),
    "log_every": (_positive, "> 0"),
    "checkpoint_every": (_non_negative, ">= 0 (0 = time-based only)"),
    "checkpoint_seconds": (_non_negative, ">= 0 (0 = step-based only)"),
    "keep_checkpoints": (_positive, ">= 1"),
    "divergence_factor": (_positive, "> 0"),
    "rollout_every": (_non_negative, ">= 0"),
    "rollout_prompts": (_positive, "> 0"),
    "eval.temperature": (_positive, "> 0"),
    "eval.batch_size": (_positive, "> 0"),
    "eval.val_every": (_non_negative, ">= 0"),
    "model.hidden_size": (_positive, "> 0"),
    "model.num_layers": (_positive, "> 0"),
    "model.num_heads": (_positive, "> 0"),
    "model.intermediate_size": (_positive, "> 0"),
    "model.keep_every": (_positive, ">= 1"),
    "task.max_new_tokens": (_positive, "> 0"),
    "task.samples_per_prompt": (_positive, "> 0"),
    "task.sample_top_p": (_probability, "in (0, 1]"),
    "task.cache_top_p": (_probability, "in (0, 1]"),
    "task.shard_prompts": (_positive, "> 0"),
    "task.cache_batch_size": (_positive, "> 0"),
    # synthetic task
    "task.n_train_prompts": (_positive, "> 0"),
    "task.n_val_prompts": (_positive, "> 0"),
    "task.n_test_prompts": (_positive, "> 0"),
    "task.n_references": (_non_negative, ">= 0"),
    # transformers task
    "task.sample_temperature": (_positive, "> 0"),
    "task.max_prompt_tokens": (_positive, "> 0"),
    "task.gen_batch_size": (_positive, "> 0"),
    "task.val_fraction": (lambda x: 0.0 < x < 1.0, "in (0, 1)"),
    "task.test_fraction": (lambda x: 0.0 < x < 1.0, "in (0, 1)"),
    # algorithm fields, where the algorithm has them
    "algo.lr": (_positive, "> 0"),
    "algo.alpha": (_positive, "> 0 (the chi^2 regulariser divides by alpha)"),
    "algo.gamma": (_unit_interval, "in [0, 1]"),
    "algo.top_p": (_probability, "in (0, 1]"),
    "algo.temperature": (_positive, "> 0"),
    "algo.beta": (_unit_interval, "in [0, 1]"),
    "algo.beta1": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    "algo.beta2": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    "algo.weight_decay": (_non_negative, ">= 0"),
    "algo.warmup_steps": (_non_negative, ">= 0"),
    "algo.min_lr_ratio": (_unit_interval, "in [0, 1]"),
    "algo.lmbda": (_unit_interval, "in [0, 1]"),
    "algo.mix": (_unit_interval, "in [0, 1]"),
    "algo.clip_eps": (_positive, "> 0"),
    "algo.target_update_rate": (_probability, "in (0, 1]"),
}

# (algorithm, field) -> allowed values of the algorithms' string options (else checked only at their first use)
BD_PRESETS = ("iql_bd", "iql_bd_math", "iql_bd_released")  # registry names of the Bellman Distill variants
_BD_CHOICES = {"q_shift": Q_SHIFT_CHOICES, "chi2_on": CHI2_CHOICES, "expert_term": EXPERT_TERM_CHOICES, "value": VALUE_CHOICES}
_ALGO_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    **{(name, key): choices for name in BD_PRESETS for key, choices in _BD_CHOICES.items()},
    ("kd", "student_norm"): ("vocab", "top_p"),
    ("soft_q", "reward"): REWARD_CHOICES,
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
    """Every range or cross-field violation of ``cfg``, one ``"key=value: what it must be; fix"`` line each."""
    problems = []
    for key, (ok, must) in _RANGES.items():
        value = _lookup(cfg, key)
        if value is dataclasses.MISSING or value is None:
            continue
        if not ok(value):
            problems.append(f"{key}={value!r}: must be {must}; set {key}=<a value {must.split(' (')[0]}>")
    for key in _OPTIONAL_POSITIVE:
        value = _lookup(cfg, key)
        if value is not None and value is not dataclasses.MISSING and value <= 0:
            problems.append(f"{key}={value!r}: must be > 0 or null (all); set {key}=null or a positive count")
    for (algo, key), choices in _ALGO_CHOICES.items():
        value = getattr(cfg.algo, key, None)
        if cfg.algo_name == algo and value not in choices:
            problems.append(f"algo.{key}={value!r}: must be one of {choices}")
    if not cfg.eval.seeds:
        problems.append("eval.seeds=[]: needs at least one seed; set eval.seeds=[0]")
    if not cfg.eval.decode_top_p or not all(_probability(p) for p in cfg.eval.decode_top_p):
        problems.append(
            f"eval.decode_top_p={list(cfg.eval.decode_top_p)!r}: needs one or more values in (0, 1]; "
            "set eval.decode_top_p=[1.0,0.8]"
        )
    if cfg.on_divergence not in ON_DIVERGENCE:
        problems.append(f"on_divergence={cfg.on_divergence!r}: must be one of {ON_DIVERGENCE}")
    problems += _cross_field_problems(cfg)
    return problems


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    problems = []
    algo_p = getattr(cfg.algo, "top_p", None)
    cache_p = cfg.task.cache_top_p
    # Each algorithm config says whether its loss reads the cached sets (at top_p = 1 the full-vocabulary losses
    # do not, so any task.cache_top_p serves them).
    reads_cache = getattr(cfg.algo, "reads_cached_sets", lambda: True)()
    if algo_p is not None and algo_p >= 1.0 and getattr(cfg.algo, "kd_coef", 0.0) > 0:
        problems.append(
            f"algo.kd_coef={cfg.algo.kd_coef} with algo.top_p={algo_p}: the KD term reads the teacher's cached set, "
            "which the full-vocabulary MDP has not; set algo.kd_coef=0 or algo.top_p<1"
        )
    elif reads_cache and algo_p is not None and _probability(algo_p) and _probability(cache_p) and cache_p < algo_p:
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
        if all(_probability(f) for f in fractions) and sum(fractions) >= 1:
            problems.append(
                f"task.val_fraction + task.test_fraction = {task.val_fraction + task.test_fraction} leaves no "
                "training prompt; lower one of them"
            )
    return problems


def validate(cfg: RunConfig) -> None:
    """Refuse a config that cannot give a correct run, before any data, model or evaluation work.

    Args:
        cfg: the resolved run config.

    Raises:
        ConfigError: listing every bad key with its value, the allowed range and the fix.
    """
    problems = config_problems(cfg)
    try:
        cfg.algo_config()  # the algorithm's own checks (its enums, ...)
    except (ValueError, TypeError) as error:
        problems.append(f"algo ({cfg.algo_name}): {error}")
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))


def check_student_tokenizer(cfg: RunConfig, teacher_tokenizer) -> None:
    """A pretrained student must share the teacher's vocabulary; checked from its tokenizer files alone.

    Args:
        cfg: the resolved run config.
        teacher_tokenizer: the task's tokenizer (None for the synthetic task, which has no pretrained students).

    Raises:
        ValueError: naming both tokenizers and the first differing token (see
            :func:`tokenrl.lm.models.check_same_vocabulary`).
    """
    if cfg.model.kind != "pretrained" or teacher_tokenizer is None:
        return
    from transformers import AutoTokenizer

    from tokenrl.lm.models import check_same_vocabulary

    path, gguf_file = cfg.model.name_or_path, cfg.model.gguf_file
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.split(os.path.abspath(path))  # as tokenrl.lm.models.load_causal_lm reads it
    student_tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    check_same_vocabulary(teacher_tokenizer, student_tokenizer)
