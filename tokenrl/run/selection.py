"""One start and one selection rule for every method: SFT until validation stops improving, best checkpoint.

The fair-comparison protocol (``selection=best``; ``selection=fixed`` is the paper's fixed recipe):

* **SFT start** (:func:`train_sft`): BC on the offline data for at most ``sft_steps`` updates (its cosine
  schedule spans ``sft_steps``), validated every ``selection.sft_eval_every`` steps; it stops when a moving
  average of the validation scores has not improved for ``selection.sft_patience`` validations
  (:class:`PlateauStop`: validation noise neither ends nor extends it) and keeps the best weights. With
  ``selection.sft_cache`` the start (weights and the RNG states after it) is saved under the task's data
  directory, keyed by everything it depends on (task, data, validation set, model, SFT settings and stopping
  rule, seed, device), and reused by every method of that seed: a run that loads it continues exactly as the
  run that trained it. The cache file is verified on every load (:func:`read_sft_start`: a SHA-256 over its
  content, as a checkpoint's); a damaged one is refused, naming it. A run's SFT checkpoints (``checkpoints``
  hooks of :func:`train_sft`, written by :mod:`tokenrl.run.sft_checkpoints`) let an interrupted SFT resume.
* **Best checkpoint** (:class:`BestCheckpoint`): the algorithm is validated every ``selection.every`` steps,
  step 0 (the SFT start) and the last step included; the best weights are kept in memory and are what the
  final evaluation scores and the run saves. ``metrics.json`` records the chosen step under ``selection``.

Validation is one number, lower is better, on the validation prompts
(:func:`tokenrl.evaluation.student.validation_score` of ``selection.metric``, :func:`validator`). The best
checkpoint's state (scores and weights) goes into the run's checkpoints, so a run with ``selection.every``
resumes as it would have continued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable

import torch

from algorithms import Algorithm, make_algorithm
from tokenrl.core.progress import track
from tokenrl.evaluation.student import SAMPLED, VALIDATION_METRICS, validation_score
from tokenrl.lm.policy import CausalLMPolicy
from tokenrl.run.checkpoint import read_state_file, write_state_file
from tokenrl.run.config import RunConfig
from tokenrl.tasks.base import Task
from tokenrl.tasks.manifest import DataIntegrityError

log = logging.getLogger(__name__)


def check_selection(cfg: RunConfig) -> None:
    """Fail before any work on an unknown ``selection.metric`` (the ranges: ``SelectionConfig.problems``).

    Raises:
        ValueError: naming the bad key and the valid values.
    """
    if cfg.selection.metric not in VALIDATION_METRICS:
        raise ValueError(
            f"unknown selection.metric {cfg.selection.metric!r}; expected one of {list(VALIDATION_METRICS)}"
        )


def validator(cfg: RunConfig, task: Task) -> Callable[[torch.nn.Module], float]:
    """``model -> score``: the run's validation score (``selection.metric`` at its evaluation settings and the data's
    cache top-p, :func:`tokenrl.evaluation.student.validation_score`)."""
    return lambda model: validation_score(model, task, cfg.selection.metric, cfg.eval, cfg.task.cache_top_p)


class PlateauStop:
    """When to stop a training run whose validation score (lower is better) has stopped improving.

    The rule reads an exponential moving average of the scores, ``s_i = smoothing * s_{i-1} + (1 - smoothing) *
    score_i`` (``s_0 = score_0``), so that one lucky or unlucky validation neither resets nor ends the patience:
    ``s_i`` improves when it is below the best smoothed score so far by more than ``min_improvement`` times its
    magnitude, and the run stops after ``patience`` validations in a row without improvement. A still-falling
    noisy curve keeps lowering its average; a plateau (or a rise, as when BC overfits) does not.
    ``smoothing=0, min_improvement=0`` is plain patience on the raw scores.

    Args:
        patience: validations without improvement before :meth:`update` says stop (>= 1).
        smoothing: weight of the past in the moving average, in [0, 1).
        min_improvement: relative fall of the average that counts as improvement, in [0, 1).
    """

    def __init__(self, patience: int, smoothing: float = 0.0, min_improvement: float = 0.0):
        if patience < 1 or not 0.0 <= smoothing < 1.0 or not 0.0 <= min_improvement < 1.0:
            raise ValueError(
                f"PlateauStop needs patience >= 1 and smoothing, min_improvement in [0, 1); got {patience}, "
                f"{smoothing}, {min_improvement}"
            )
        self.patience, self.smoothing, self.min_improvement = patience, smoothing, min_improvement
        self.smoothed: list[float] = []
        self.best = float("inf")
        self.since_best = 0

    def update(self, score: float) -> bool:
        """Take the next validation score; True when the run should stop.

        A NaN score leaves the average as it is and counts as a validation without improvement.
        """
        average = self.smoothed[-1] if self.smoothed else float("nan")
        if not math.isnan(score):
            average = score if math.isnan(average) else self.smoothing * average + (1 - self.smoothing) * score
        self.smoothed.append(average)
        # Relative to |best| (rougeL is negated, so scores may be negative); the first finite average improves.
        first = math.isinf(self.best) and average < self.best
        if first or average < self.best - self.min_improvement * abs(self.best):
            self.best, self.since_best = average, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def state_dict(self) -> dict:
        """The rule's progress (an SFT checkpoint holds it)."""
        return {"smoothed": list(self.smoothed), "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.smoothed, self.best, self.since_best = list(state["smoothed"]), state["best"], state["since_best"]


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

    def state_dict(self) -> dict:
        """Everything a resumed run needs: :meth:`summary` and the best weights (tensors and JSON values only, as a
        checkpoint holds them: :mod:`tokenrl.run.checkpoint`)."""
        return {**self.summary(), "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.best_score, self.best_step = float(state["best_score"]), state["best_step"]
        self.history = [(int(step), float(score)) for step, score in state["history"]]
        self.best_state = state["best_state"]


def sft_cache_path(cfg: RunConfig, task: Task, data_dir: str) -> str:
    """Where the SFT start of this run's settings is cached: ``<data_dir>/sft_starts/<digest>.safetensors``.

    ``data_dir`` is the dataset's folder, named by the hash of its full manifest (:func:`tokenrl.run.inputs.data_location`).
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
        "selection": {
            k: getattr(cfg.selection, k)
            for k in ("metric", "sft_eval_every", "sft_patience", "sft_smoothing", "sft_min_improvement")
        },
        "seed": cfg.seed,
        "device": cfg.device,
    }
    if cfg.selection.metric in SAMPLED:  # sampled validation depends on the decoding and its draws too
        key["decoding"] = [cfg.eval.decode_top_p[0], cfg.eval.temperature, cfg.eval.val_seeds, cfg.eval.val_n_prompts]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(data_dir, "sft_starts", f"{digest}.safetensors")


def read_sft_start(path: str) -> dict:
    """The cached SFT start at ``path`` (``model``, ``generator``, ``torch_rng``, ``summary``, ``last_stats``),
    verified against the SHA-256 stored in it.

    Raises:
        DataIntegrityError: the file is truncated, changed or not an SFT start (naming it and the fix).
    """
    try:
        return read_state_file(path)
    except Exception as error:  # any failure to read back what was written is damage
        raise DataIntegrityError(
            f"SFT start {path} fails verification ({error}); delete it and rerun: the run trains the SFT start "
            "again and caches it"
        ) from error


def train_sft(
    cfg: RunConfig,
    task: Task,
    model: torch.nn.Module,
    policy: CausalLMPolicy,
    generator: torch.Generator,
    sft_step: Callable[[Algorithm], dict[str, float]],
    data_dir: str,
    checkpoints=None,
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
            :func:`tokenrl.run.step.train_step`: one process, gradient accumulation or data-parallel alike); returns
            its stats.
        data_dir: the offline data's folder (the SFT cache lives under it).
        checkpoints: the run's SFT checkpoints (:class:`tokenrl.run.sft_checkpoints.SFTCheckpoints`): its
            ``restore(sft)`` continues an interrupted SFT (it returns the loop's state, or None to start), its
            ``after_step(sft, steps_run, loop_state)`` writes one when due (``loop_state()`` builds the loop's
            state) and stops the run on SIGTERM/SIGINT.

    Returns:
        ``(summary, last_stats)``: ``summary`` has ``steps_run``, ``cached``, and with validation ``best_step``,
        ``best_score`` and ``history``; ``last_stats`` are the last BC update's statistics.
    """
    sel = cfg.selection
    path = sft_cache_path(cfg, task, data_dir) if sel.sft_cache else None
    if path is not None and os.path.exists(path):
        state = read_sft_start(path)
        model.load_state_dict(state["model"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return {**state["summary"], "cached": True}, state["last_stats"]
    sft = make_algorithm("bc", policy, {"lr": cfg.sft_lr}, total_steps=cfg.sft_steps)
    best = BestCheckpoint(model, validator(cfg, task)) if sel.sft_eval_every else None
    stop = PlateauStop(sel.sft_patience, sel.sft_smoothing, sel.sft_min_improvement)
    stats: dict[str, float] = {}
    steps_run = 0
    loop = checkpoints.restore(sft) if checkpoints is not None else None
    if loop is not None:
        steps_run, stats = loop["steps_run"], loop["stats"]
        stop.load_state_dict(loop["stop"])
        if best is not None:
            best.load_state_dict(loop["best"])
    elif best is not None:
        best.consider(0, "sft validation")
        stop.update(best.history[-1][1])

    def loop_state() -> dict:
        return {"steps_run": steps_run, "stats": stats, "stop": stop.state_dict(),
                "best": best.state_dict() if best is not None else None}

    bar = track(range(steps_run, cfg.sft_steps), "sft warm start", enabled=cfg.progress, initial=steps_run,
                total=cfg.sft_steps)
    for step in bar:
        stats = sft_step(sft)
        steps_run = step + 1
        if best is not None and (steps_run % sel.sft_eval_every == 0 or steps_run == cfg.sft_steps):
            best.consider(steps_run, "sft validation")
            if stop.update(best.history[-1][1]):
                break
        if checkpoints is not None:
            checkpoints.after_step(sft, steps_run, loop_state)
    sft.zero_grad()  # its gradients are not needed after the warm start
    summary: dict = {"steps_run": steps_run}
    if best is not None:
        best.restore()
        summary.update(best.summary(), smoothed=stop.smoothed)
    if path is not None:
        state = {
            "model": model.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "summary": summary, "last_stats": stats,
        }
        write_state_file(path, state)  # atomic: runs of a sweep that share the start may race
    return {**summary, "cached": False}, stats
