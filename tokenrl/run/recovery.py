"""What a run does when training diverges, and what a resume that fixes it changes.

* The last good state (:func:`last_good_checkpoint`) is the newest checkpoint written before any sign of
  divergence, or the start of training (the trainer checkpoints step 0): a diverging update is never saved.
  Under ``on_divergence=skip`` the updates after the first skipped one are suspect too, so their checkpoints
  are set aside (renamed ``*.diverged``) when the run stops, and checkpoint rotation never deletes the last
  one before the first skip (:func:`tokenrl.run.checkpoint.save_checkpoint`'s ``protect``).
* ``on_divergence=skip`` stops once more than ``max_skipped_fraction`` of the updates are skipped
  (:func:`skip_budget_exceeded`), and on a sign in the weights, which a skip cannot undo.
* The stop message (:func:`divergence_stop`) suggests fixes a resume accepts
  (:data:`tokenrl.run.checkpoint.RESUME_MAY_ADJUST`); a resume with another ``algo.lr`` continues the schedule
  at the new peak (:func:`adopt_learning_rate`) and a resume with other ``steps`` keeps the schedule's length
  (:func:`schedule_note`); both are recorded under ``resumes`` in ``metrics.json`` and ``owner.json``.
"""

from __future__ import annotations

import os

from algorithms import Algorithm
from tokenrl.core.divergence import WEIGHTS, DivergenceError
from tokenrl.run.checkpoint import list_checkpoints
from tokenrl.run.config import RunConfig

SKIP_BUDGET_MIN_UPDATES = 20
"""``max_skipped_fraction`` counts at least this many updates, so one early skip does not stop a run."""


def skip_budget_exceeded(skipped: int, tried: int, fraction: float) -> bool:
    """Whether ``skipped`` of ``tried`` updates is more than ``fraction`` of ``max(tried, 20)``."""
    return skipped > fraction * max(tried, SKIP_BUDGET_MIN_UPDATES)


def last_good_checkpoint(out_dir: str, first_skip: int | None) -> tuple[int, str] | None:
    """The newest checkpoint written before any sign of divergence: ``(step, path)``, None without one.

    Args:
        out_dir: the run directory.
        first_skip: the update index (0-based) of the first skipped update, if any; checkpoints after it
            (step > ``first_skip``) are renamed ``*.diverged`` so that ``resume=true`` does not load them.
    """
    for step, path in list_checkpoints(out_dir):
        if first_skip is None or step <= first_skip:
            return step, path
        os.replace(path, f"{path}.diverged")
    return None


def suggested_fixes(cfg: RunConfig, term: str) -> list[str]:
    """Overrides a resume accepts that address a divergence seen in ``term``."""
    fixes = [f"algo.lr={cfg.algo.lr / 10:g}"]
    if cfg.algo.grad_clip <= 0:
        fixes.append("algo.grad_clip=1.0")
    if term != WEIGHTS:  # a spike in the loss or gradient norm: drop such updates, or widen the range
        if cfg.on_divergence != "skip":
            fixes.append("on_divergence=skip")
        fixes.append(f"divergence_factor={cfg.divergence_factor * 10:g}")
    return fixes


def divergence_stop(cfg: RunConfig, out_dir: str, cause: str, term: str, first_skip: int | None) -> str:
    """The message of a run stopped by divergence: the cause, the last good state and the fixes to resume with.

    Sets aside the checkpoints written after the first skipped update (see :func:`last_good_checkpoint`).
    """
    good = last_good_checkpoint(out_dir, first_skip)
    fixes = " or ".join(suggested_fixes(cfg, term))
    if good is None:
        where = "no checkpoint of this run predates it; start again with a fix (" + fixes + ")"
    else:
        step, path = good
        start = " (the start of training)" if step == 0 else ""
        aside = "" if first_skip is None else " (the later ones, written after the first skipped update, were renamed *.diverged)"
        where = (
            f"the last good state is {path}, step {step}{start}, written before any sign of divergence{aside}; "
            f"continue from it with resume=true hydra.run.dir={out_dir} and one of: {fixes}"
        )
    return f"training diverged: {cause}; {where}"


def skip_budget_message(cfg: RunConfig, skipped: int, tried: int) -> str:
    """The cause of a stop by :func:`skip_budget_exceeded`."""
    return (
        f"on_divergence=skip dropped {skipped} of the {tried} updates so far, more than max_skipped_fraction="
        f"{cfg.max_skipped_fraction:g} of them (counted over at least {SKIP_BUDGET_MIN_UPDATES})"
    )


def weight_sign_message(error: DivergenceError, cfg: RunConfig) -> str:
    """The cause of a stop by a sign in the weights (under ``skip`` too: the update is already applied)."""
    note = "; on_divergence=skip cannot undo an update already applied" if cfg.on_divergence == "skip" else ""
    return f"{error}{note}"


def adopt_learning_rate(algo: Algorithm) -> None:
    """After loading a checkpoint, make the schedule continue at the config's peak ``lr`` (the checkpoint's
    optimiser and schedule hold the old one): the same multiplier of the schedule, on the new peak."""
    scheduler, lr = algo.scheduler, algo.config.lr
    groups = algo.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def schedule_note(schedule_steps: int, steps: int) -> str | None:
    """What a resume with ``steps`` different from the schedule's length does (None when they agree)."""
    if schedule_steps == steps:
        return None
    after = (
        f"steps {schedule_steps + 1}-{steps} run at its floor (algo.min_lr_ratio x algo.lr)"
        if steps > schedule_steps
        else f"the run ends at step {steps}, before the schedule's end"
    )
    return (
        f"resume with steps={steps}: the learning-rate schedule keeps the length it was built with "
        f"({schedule_steps} steps) instead of re-stretching its cosine mid-run, so {after}; recorded under "
        "'resumes' in metrics.json"
    )
