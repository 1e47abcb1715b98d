"""Start-up checks of a resolved :class:`~tokenrl.run.config.RunConfig`: every bad input is refused before any work.

The schemas already refuse unknown keys and wrongly typed values when the config is composed; :func:`check_config`
adds the ranges each config states for its own fields (:meth:`tokenrl.run.config.RunConfig.problems`, the task's,
the model's and the algorithm's, :meth:`algorithms.base.AlgoConfig.problems`), a NaN or infinity in any number,
and the cross-field constraints (cache p >= the algorithm's p, a pretrained student only on a transformers task,
prompt plus response within the teacher's context, ...), and reports every problem at once, each naming its key
and a fix. ("Validation" in this project is the
held-out evaluation during training, :mod:`tokenrl.run.selection`.) It is the first
call of :func:`tokenrl.run.trainer.run` and of ``experiments/generate.py``; :func:`check_student_tokenizer`
compares a pretrained student's tokenizer with the teacher's before any data shard is written.
"""

from __future__ import annotations

import os

import torch

from tokenrl.core.options import PROBABILITY, nonfinite_problems
from tokenrl.lm.precision import check_precision
from tokenrl.run.config import MODEL_KINDS, RunConfig
from tokenrl.run.selection import check_selection
from tokenrl.tasks.hf import HFTaskConfig


class ConfigError(ValueError):
    """A resolved run config that cannot give a correct run; the message lists every bad key and its fix."""


def config_problems(cfg: RunConfig) -> list[str]:
    """Every problem of ``cfg``, one line each with its fix: a NaN or infinity anywhere, every field out of its
    range (each config states its own, :meth:`~tokenrl.run.config.RunConfig.problems`), the selection settings,
    and the cross-field rules (:func:`_cross_field_problems`)."""
    problems = cfg.problems()
    reported = {line.split("=")[0] for line in problems}
    problems += [line for line in nonfinite_problems(cfg, "") if line.split("=")[0] not in reported]
    try:
        check_selection(cfg)
    except ValueError as error:
        problems.append(str(error))
    return problems + _cross_field_problems(cfg)


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
    if model.kind in MODEL_KINDS and model.kind != "fresh" and not isinstance(cfg.task, HFTaskConfig):
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
        if task.prompts_file not in (None, "???") and not os.path.isfile(task.prompts_file):
            problems.append(f"task.prompts_file={task.prompts_file!r}: no such file (cwd {os.getcwd()})")
        problems += _context_problems(cfg)
    return problems


def _context_length(name_or_path: str, gguf_file: str | None) -> int | None:
    """The number of positions of a transformers model, read from its config alone, locally or from the hub's
    cache (None when it cannot be read so: the model's loading then reports why)."""
    from transformers import AutoConfig

    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    try:
        config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)


def _context_problems(cfg: RunConfig) -> list[str]:
    """The longest sequence of the task (a prompt of ``task.max_prompt_tokens`` plus ``task.max_new_tokens``)
    must fit the teacher's positions, and a pretrained student's: past them a learned position table (GPT-2)
    fails with an IndexError inside sampling."""
    task = cfg.task
    if task.teacher in (None, "???") or min(task.max_prompt_tokens, task.max_new_tokens) <= 0:
        return []
    longest = task.max_prompt_tokens + task.max_new_tokens
    models = [("teacher", f"task.teacher={task.teacher!r}", task.teacher, task.teacher_gguf_file)]
    student = cfg.model
    if student.kind == "pretrained" and student.name_or_path:
        models.append(("student", f"model.name_or_path={student.name_or_path!r}", student.name_or_path, student.gguf_file))
    problems = []
    for role, key, path, gguf in models:
        positions = _context_length(path, gguf)
        if positions is not None and longest > positions:
            problems.append(
                f"task.max_prompt_tokens + task.max_new_tokens = {task.max_prompt_tokens} + {task.max_new_tokens} = "
                f"{longest} > {positions}, the context length of the {role} ({key}); lower task.max_prompt_tokens "
                f"(longer prompts are dropped) or task.max_new_tokens so that they sum to at most {positions}"
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
