"""A training run's evaluations of its student on a task: the test evaluation, validation and the selection score.

* :func:`evaluate_student`: every sampled and teacher-forced metric (:func:`tokenrl.evaluation.metrics.evaluate_decodings`)
  plus the on-policy reverse KL (:func:`tokenrl.evaluation.onpolicy.on_policy_reverse_kl_of_model`), on the
  test prompts (the reference, SFT and final rows of a run) or on given prompts;
  :func:`evaluate_teacher` is the teacher's own row;
* :func:`validation_record`: the ``val/*`` metrics on the validation prompts, as one record of a run's
  ``results["validation"]`` (``eval.val_every``, ``eval.val_every_s``);
* :func:`validation_score`: one number, lower is better, that chooses the SFT start and the best checkpoint
  (``selection.metric``, :mod:`tokenrl.run.selection`): a teacher-forced metric on the task's held-out teacher
  samples (``task.heldout``, one per validation prompt; no sampling noise between checkpoints), or a sampled one
  (the seeds ``eval.val_seeds``, the first ``eval.decode_top_p``).

The final evaluation never reads the validation split: its teacher-forced metrics use the held-out samples of
the test prompts (``task.test_heldout``), its sampled ones the test prompts. How many validation prompts make
the score precise enough: ``experiments/validation_noise.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenrl.core.options import NON_NEGATIVE, POSITIVE, PROBABILITY, field_problems, range_problem
from tokenrl.evaluation.metrics import evaluate, evaluate_decodings, evaluate_teacher_samples
from tokenrl.evaluation.onpolicy import on_policy_reverse_kl_of_model
from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_forced_set_metrics
from tokenrl.tasks.base import Task

TEACHER_FORCED = (
    "kl_student_teacher", "kl_teacher_student", "mass_outside_set", "kl_teacher_student_on_set", "kl_set_teacher_student"
)
SAMPLED = ("teacher_nll", "rougeL")
VALIDATION_METRICS = TEACHER_FORCED + SAMPLED
"""Valid ``selection.metric`` values (``rougeL`` is negated so that lower is better for every metric)."""


@dataclass
class EvalConfig:
    """Evaluation by sampling on held-out prompts (the MiniLLM/BD protocol, scaled down)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # one sampling pass per seed
    temperature: float = 1.0  # sampling temperature
    # Student sampling top-p values, reported side by side (MiniLLM: 1.0, BD release: 0.8): the first under
    # eval/..., each other one under eval_p<p>/... The teacher row and the references always sample at top-p 1.0.
    decode_top_p: list[float] = field(default_factory=lambda: [1.0, 0.8])
    batch_size: int = 128  # sequences per sampling batch
    n_prompts: int | None = None  # evaluate on the first n test prompts (None = all)
    val_every: int = 0  # validation (val/*: teacher-forced KLs + the sampled metrics below) every n steps; 0 = off
    val_every_s: float = 0.0  # validation every n seconds of the training clock (validation excluded); 0 = off
    # Sampled validation (val_every, val_every_s, a sampled selection.metric): one pass per seed over the first
    # val_n_prompts validation prompts, with seeds apart from the test evaluation's. Teacher-forced validation
    # always reads every validation prompt's held-out sample. Sampled metrics are heavy-tailed: between two
    # students, 500 prompts x 1 seed spread the teacher-NLL difference by ~0.09 and Rouge-L's by ~0.5 (100: 0.14,
    # 1.8) at ~5x the cost (experiments/validation_noise.py), so selection uses a teacher-forced metric.
    val_seeds: list[int] = field(default_factory=lambda: [1000])
    val_n_prompts: int | None = 500  # None = all validation prompts
    onpolicy_kl_seed: int = 7919  # sampling seed of eval/onpolicy_kl (its own stream: other metrics unchanged)

    def problems(self, prefix: str = "eval") -> list[str]:
        """Every field out of its range, one line each (see :mod:`tokenrl.core.options`)."""
        ranges = {"temperature": POSITIVE, "batch_size": POSITIVE, "n_prompts": POSITIVE.explained("null = all"),
                  "val_every": NON_NEGATIVE.explained("0 = off"), "val_every_s": NON_NEGATIVE.explained("0 = off"),
                  "onpolicy_kl_seed": NON_NEGATIVE, "val_n_prompts": POSITIVE.explained("null = all")}
        found = field_problems(self, prefix, ranges)
        for key, example in (("seeds", "[0]"), ("val_seeds", "[1000]")):
            seeds = getattr(self, key)
            if not seeds:
                found.append(f"{prefix}.{key}=[]: needs at least one seed; set {prefix}.{key}={example}")
            found += [line for i, s in enumerate(seeds) if (line := range_problem(f"{prefix}.{key}[{i}]", s, NON_NEGATIVE))]
        if not self.decode_top_p or not all(PROBABILITY.ok(p) for p in self.decode_top_p):
            found.append(
                f"{prefix}.decode_top_p={list(self.decode_top_p)!r}: needs one or more values in (0, 1]; "
                f"set {prefix}.decode_top_p=[1.0,0.8]"
            )
        return found


def first(prompts: list, references: list, n: int | None) -> tuple[list, list]:
    """The first ``n`` prompts and their references (all when ``n`` is None or 0)."""
    return (prompts[:n], references[:n]) if n else (prompts, references)


def evaluate_teacher(task: Task, eval_cfg: EvalConfig) -> dict:
    """The teacher's own samples on the first ``eval.n_prompts`` test prompts, every seed of ``eval.seeds``: the
    reference row of a report (:func:`tokenrl.evaluation.metrics.evaluate_teacher_samples`)."""
    prompts, references = first(task.test_prompts, task.test_references, eval_cfg.n_prompts)
    metrics = evaluate_teacher_samples(
        task.teacher, prompts, references, task.decode, task.eval_sampler,
        seeds=eval_cfg.seeds, batch_size=eval_cfg.batch_size,
    )
    # The teacher against itself on its own samples: exactly 0, as its teacher-forced KLs.
    metrics.update({"eval/onpolicy_kl": 0.0, "eval/onpolicy_kl_exact_state": 0.0})
    return metrics


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
    prompts, references = first(
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


def validation_record(
    model: torch.nn.Module, task: Task, eval_cfg: EvalConfig, step: int, stage_seconds: dict[str, float]
) -> dict:
    """One validation of a run: the scalar ``val/*`` metrics of ``model`` on the validation prompts.

    Sampled metrics: the seeds ``eval.val_seeds`` on the first ``eval.val_n_prompts`` validation prompts;
    teacher-forced ones: every validation prompt's held-out sample (the selection score's data).

    Args:
        model: the student.
        task: validation prompts, references and held-out samples.
        eval_cfg: the run's evaluation settings.
        step: the updates done so far.
        stage_seconds: the training clock's seconds per stage so far (validation excluded).

    Returns:
        ``step``, ``train_clock_s`` (the sum of ``stage_seconds``), ``stage_seconds`` and the scalar metrics, each
        ``eval...`` key renamed ``val...`` (``val/teacher_nll``, ``val_p0.8/rougeL``).
    """
    prompts, references = first(task.val_prompts, task.val_references, eval_cfg.val_n_prompts)
    metrics = evaluate_student(model, task, eval_cfg, eval_cfg.val_seeds, prompts, references)
    scalars = {k.replace("eval", "val", 1): v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"step": step, "train_clock_s": sum(stage_seconds.values()), **stage_seconds, **scalars}


def validation_score(
    model: torch.nn.Module, task: Task, metric: str, eval_cfg: EvalConfig, set_top_p: float
) -> float:
    """``metric`` (one of :data:`VALIDATION_METRICS`) of ``model`` on the validation prompts; lower is better.

    Teacher-forced metrics read the task's held-out teacher samples (``task.heldout``; the set metrics at
    ``set_top_p``, the top-p of the data's cache); sampled ones draw one response per seed of ``eval.val_seeds``
    on each of the first ``eval.val_n_prompts`` validation prompts, at the first ``eval.decode_top_p``.
    """
    prompts, responses = task.heldout
    if metric in ("kl_student_teacher", "kl_teacher_student"):
        return teacher_forced_kl(model, task.teacher, prompts, responses, eval_cfg.batch_size, task.vocab_size)[metric]
    if metric in TEACHER_FORCED:
        return teacher_forced_set_metrics(
            model, task.teacher, prompts, responses, set_top_p, eval_cfg.batch_size, task.vocab_size
        )[metric]
    n = eval_cfg.val_n_prompts
    sampled = evaluate(
        model, task.teacher, task.val_prompts[:n], task.val_references[:n] if metric == "rougeL" else None, task.decode,
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, max_new_tokens=task.max_new_tokens,
        seeds=eval_cfg.val_seeds, temperature=eval_cfg.temperature, top_p=eval_cfg.decode_top_p[0],
        batch_size=eval_cfg.batch_size, vocab_size=task.vocab_size,
    )
    value = float(sampled[f"eval/{metric}"])
    return -value if metric == "rougeL" else value
