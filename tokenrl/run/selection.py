"""One start and one selection rule for every method: SFT until validation stops improving, best checkpoint.

The fair-comparison protocol (``selection=best``; ``selection=fixed`` is the paper's fixed recipe):

* **SFT start** (:func:`train_sft`): BC on the offline data for at most ``sft_steps`` updates, validated every
  ``selection.sft_eval_every`` steps; it stops after ``selection.sft_patience`` validations without
  improvement and keeps the best weights. With ``selection.sft_cache`` the start (weights and the RNG states
  after it) is saved under the task's data directory, keyed by everything it depends on (task, data, model,
  SFT settings, seed, device), and reused by every method of that seed: a run that loads it continues
  exactly as the run that trained it.
* **Best checkpoint** (:class:`BestCheckpoint`): the algorithm is validated every ``selection.every`` steps,
  step 0 (the SFT start) and the last step included; the best weights are kept in memory and are what the
  final evaluation scores and the run saves. ``metrics.json`` records the chosen step under ``selection``.

Validation (:func:`validation_score`) is one number, lower is better, on the validation prompts: a
teacher-forced metric on the task's held-out teacher samples (cheap, no sampling noise), or a sampled one
(one seed, the first ``eval.decode_top_p``). The teacher-forced metrics of the final evaluation are computed
on the same held-out samples, so they carry the (small, equal for every method) bias of one selection among
a few checkpoints; the sampled metrics of the final evaluation use the test prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable

import torch

from algorithms import Algorithm, make_algorithm
from tokenrl.core.progress import track
from tokenrl.run.config import RunConfig
from tokenrl.evaluation.metrics import evaluate
from tokenrl.evaluation.teacher_forced import teacher_forced_kl, teacher_forced_set_metrics
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.tasks.base import Task

log = logging.getLogger(__name__)

TEACHER_FORCED = (
    "kl_student_teacher", "kl_teacher_student", "mass_outside_set", "kl_teacher_student_on_set", "kl_set_teacher_student"
)
SAMPLED = ("teacher_nll", "rougeL")
VALIDATION_METRICS = TEACHER_FORCED + SAMPLED
"""Valid ``selection.metric`` values (``rougeL`` is negated so that lower is better for every metric)."""


def check_selection(cfg: RunConfig) -> None:
    """Fail before any work on an unknown ``selection.metric`` or a negative interval.

    Raises:
        ValueError: naming the bad key and the valid values.
    """
    sel = cfg.selection
    if sel.metric not in VALIDATION_METRICS:
        raise ValueError(f"unknown selection.metric {sel.metric!r}; expected one of {list(VALIDATION_METRICS)}")
    for key in ("sft_eval_every", "every"):
        if getattr(sel, key) < 0:
            raise ValueError(f"selection.{key} must be >= 0 (0 = off), got {getattr(sel, key)}")
    if sel.sft_patience < 1:
        raise ValueError(f"selection.sft_patience must be >= 1, got {sel.sft_patience}")


def validation_score(model: torch.nn.Module, task: Task, cfg: RunConfig) -> float:
    """``cfg.selection.metric`` of ``model`` on the validation prompts; lower is better.

    Teacher-forced metrics read the task's held-out teacher samples (``task.heldout``); sampled ones draw one
    response per validation prompt (seed 0) at the first ``eval.decode_top_p``.
    """
    metric = cfg.selection.metric
    prompts, responses = task.heldout
    if metric in ("kl_student_teacher", "kl_teacher_student"):
        return teacher_forced_kl(model, task.teacher, prompts, responses, cfg.eval.batch_size, task.vocab_size)[metric]
    if metric in TEACHER_FORCED:
        return teacher_forced_set_metrics(
            model, task.teacher, prompts, responses, cfg.task.cache_top_p, cfg.eval.batch_size, task.vocab_size
        )[metric]
    sampled = evaluate(
        model, task.teacher, task.val_prompts, task.val_references if metric == "rougeL" else None, task.decode,
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, max_new_tokens=task.max_new_tokens,
        seeds=[0], temperature=cfg.eval.temperature, top_p=cfg.eval.decode_top_p[0],
        batch_size=cfg.eval.batch_size, vocab_size=task.vocab_size,
    )
    value = float(sampled[f"eval/{metric}"])
    return -value if metric == "rougeL" else value


class BestCheckpoint:
    """The best-scoring weights seen so far, kept in memory (a copy on the model's device).

    Args:
        model: the network whose weights are tracked.
        score_fn: ``score_fn(model) -> float``, lower is better.
    """

    def __init__(self, model: torch.nn.Module, score_fn: Callable[[torch.nn.Module], float]):
        self.model = model
        self.score_fn = score_fn
        self.best_score = float("inf")
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []

    def consider(self, step: int, label: str = "validation") -> bool:
        """Score the current weights at ``step``; keep a copy when they beat the best. Returns True if so.

        Every score is logged (``label``, step, score, best so far), so a long run shows its validation curve.
        """
        score = float(self.score_fn(self.model))
        self.history.append((step, score))
        improved = score < self.best_score  # NaN never wins
        if improved:
            self.best_score, self.best_step = score, step
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        log.info("%s step %d: %.4f (best %.4f at step %s)", label, step, score, self.best_score, self.best_step)
        return improved

    def restore(self) -> None:
        """Load the best weights into the model (no-op before the first :meth:`consider`)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def summary(self) -> dict:
        """``best_step``, ``best_score`` and the ``history`` of ``[step, score]`` pairs."""
        return {"best_step": self.best_step, "best_score": self.best_score, "history": [list(h) for h in self.history]}


def sft_cache_path(cfg: RunConfig, task: Task, data_dir: str) -> str:
    """Where the SFT start of this run's settings is cached: ``<data_dir>/sft_starts/<digest>.pt``.

    ``data_dir`` is the dataset's folder, named by the hash of its full manifest (``trainer.data_location``).
    """
    heldout = hashlib.sha1(json.dumps([task.heldout[0], task.heldout[1]]).encode()).hexdigest()
    key = {
        "task": dataclasses.asdict(cfg.task) if dataclasses.is_dataclass(cfg.task) else cfg.task,
        "data_key": os.path.basename(os.path.normpath(data_dir)),
        "heldout": heldout,
        "model": dataclasses.asdict(cfg.model),
        "sft_steps": cfg.sft_steps,
        "sft_lr": cfg.sft_lr,
        "batch_size": cfg.batch_size,
        "selection": {k: getattr(cfg.selection, k) for k in ("metric", "sft_eval_every", "sft_patience")},
        "seed": cfg.seed,
        "device": cfg.device,
    }
    if cfg.selection.metric in SAMPLED:  # sampled validation depends on the decoding too
        key["decoding"] = [cfg.eval.decode_top_p[0], cfg.eval.temperature]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(data_dir, "sft_starts", f"{digest}.pt")


def train_sft(
    cfg: RunConfig,
    task: Task,
    model: torch.nn.Module,
    policy: CausalLMPolicy,
    generator: torch.Generator,
    sft_step: Callable[[Algorithm], dict[str, float]],
    data_dir: str,
) -> tuple[dict, dict[str, float]]:
    """The SFT (BC) warm start of the protocol, from the cache when ``selection.sft_cache`` has it.

    Without ``selection.sft_eval_every`` it runs all ``sft_steps`` (the paper's fixed recipe); with it, it
    validates every that many steps (step 0 included), stops after ``selection.sft_patience`` validations
    without improvement and loads the best weights.

    Args:
        cfg: the run config (``sft_steps``, ``sft_lr``, ``batch_size``, ``selection``, ``seed``, ``device``).
        task: the task (validation data).
        model: the student, trained in place.
        policy: the student's Q head over ``model``.
        generator: the run's batch-sampling generator (advanced exactly as by the training it replays).
        sft_step: one optimiser step of the SFT algorithm on the next batch of the offline data (the trainer's
            ``train_step``: one process, gradient accumulation or data-parallel alike); returns its stats.
        data_dir: the offline data's folder (the SFT cache lives under it).

    Returns:
        ``(summary, last_stats)``: ``summary`` has ``steps_run``, ``cached``, and with validation ``best_step``,
        ``best_score`` and ``history``; ``last_stats`` are the last BC update's statistics.
    """
    sel = cfg.selection
    path = sft_cache_path(cfg, task, data_dir) if sel.sft_cache else None
    if path is not None and os.path.exists(path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return {**state["summary"], "cached": True}, state["last_stats"]
    sft = make_algorithm("bc", policy, {"lr": cfg.sft_lr}, total_steps=cfg.sft_steps)
    best = BestCheckpoint(model, lambda m: validation_score(m, task, cfg)) if sel.sft_eval_every else None
    if best is not None:
        best.consider(0, "sft validation")
    stats: dict[str, float] = {}
    since_best, steps_run = 0, 0
    for step in track(range(cfg.sft_steps), "sft warm start", enabled=cfg.progress):
        stats = sft_step(sft)
        steps_run = step + 1
        if best is not None and (steps_run % sel.sft_eval_every == 0 or steps_run == cfg.sft_steps):
            since_best = 0 if best.consider(steps_run, "sft validation") else since_best + 1
            if since_best >= sel.sft_patience:
                break
    sft.zero_grad()  # its gradients are not needed after the warm start
    summary: dict = {"steps_run": steps_run}
    if best is not None:
        best.restore()
        summary.update(best.summary())
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {
            "model": model.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "summary": summary, "last_stats": stats,
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: runs of a sweep that share the start may race
    return {**summary, "cached": False}, stats
