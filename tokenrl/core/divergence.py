"""Divergence detection: a non-finite or out-of-range loss, gradient norm or weight norm stops (or skips) an update.

An :class:`~algorithms.base.Algorithm` with a ``guard`` asks it before the backward pass (the loss) and
before the optimiser step (the gradient norm), so a refused update changes nothing. "Out of range" is
relative to the values of the last accepted updates: beyond their ``[min, max]`` by more than ``factor``
times the larger of the range's width and the values' mean magnitude. With ``algo.lr=1e3`` the first step
wrecks the student and the loss jumps ~70x at the next one; ordinary training moves well inside that.

The first update has no history to compare with, and an update whose loss and gradient look ordinary can still
wreck the weights (``algo.lr=1e9``: max|w| = 5e7 after one step). So the trainer also asks the guard after every
update (:meth:`DivergenceGuard.check_weights`) whether the weights' norm is finite and within ``factor`` times its
value at the start of training; that update is already applied, so its sign stops the run before any checkpoint
holds those weights.
"""

from __future__ import annotations

import math
from collections import deque

import torch

WATCHED = ("loss/total", "optim/grad_norm")
"""The update statistics the guard watches."""

WEIGHTS = "weights/norm"
"""The term of a divergence seen in the weights after an update (already applied: it cannot be skipped)."""


class DivergenceError(FloatingPointError):
    """An update's loss or gradient norm is non-finite or far outside its running range.

    Attributes:
        step: the algorithm's update count when it happened.
        term: the offending statistic (``loss/total`` or ``optim/grad_norm``).
        value: its value.
    """

    def __init__(self, message: str, step: int, term: str, value: float):
        super().__init__(message)
        self.step, self.term, self.value = step, term, value


class DivergenceGuard:
    """Running ranges of :data:`WATCHED` over the last ``window`` accepted updates.

    Args:
        factor: how far outside the running range (in units of its scale) a value counts as diverged.
        window: accepted updates remembered.
    """

    def __init__(self, factor: float = 10.0, window: int = 100):
        self.factor = factor
        self.history = {term: deque(maxlen=window) for term in WATCHED}
        self.start_weight_norm: float | None = None  # the weights' norm when training started (set by the trainer)
        self.first_skip: int | None = None  # the update index of the first update skipped (on_divergence=skip)

    def check(self, step: int, term: str, value: float) -> None:
        """Raise :class:`DivergenceError` when ``value`` of ``term`` is non-finite or out of range."""
        if not math.isfinite(value):
            raise DivergenceError(f"non-finite {term} = {value} at update {step + 1}", step, term, value)
        seen = self.history[term]
        if not seen:
            return
        low, high = min(seen), max(seen)
        scale = max(high - low, sum(abs(v) for v in seen) / len(seen), 1e-8)
        if value > high + self.factor * scale or value < low - self.factor * scale:
            raise DivergenceError(
                f"{term} = {value:.4g} at update {step + 1} is far outside its running range "
                f"[{low:.4g}, {high:.4g}] over the last {len(seen)} updates",
                step, term, value,
            )

    def check_weights(self, step: int, norm: float) -> None:
        """Raise :class:`DivergenceError` (term :data:`WEIGHTS`) when the weights' ``norm`` after update ``step``
        is non-finite or more than ``factor`` times :attr:`start_weight_norm`."""
        if not math.isfinite(norm):
            raise DivergenceError(f"non-finite {WEIGHTS} = {norm} after update {step + 1}", step, WEIGHTS, norm)
        start = self.start_weight_norm
        if start is not None and norm > self.factor * start:
            raise DivergenceError(
                f"{WEIGHTS} = {norm:.4g} after update {step + 1} is more than divergence_factor={self.factor:g} times "
                f"its value at the start of training ({start:.4g})",
                step, WEIGHTS, norm,
            )

    def record(self, stats: dict[str, float]) -> None:
        """Add an accepted update's statistics to the running ranges."""
        for term in WATCHED:
            if term in stats:
                self.history[term].append(float(stats[term]))

    def state_dict(self) -> dict:
        """The running ranges, the starting weight norm and the first skipped update (checkpointed, so a resumed
        run decides exactly as an uninterrupted one)."""
        return {
            "history": {term: list(values) for term, values in self.history.items()},
            "start_weight_norm": self.start_weight_norm,
            "first_skip": self.first_skip,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (or the running ranges alone, as checkpoints before the weight check hold)."""
        history = state.get("history", state)
        for term in WATCHED:
            self.history[term].clear()
            self.history[term].extend(history.get(term, []))
        self.start_weight_norm = state.get("start_weight_norm")
        self.first_skip = state.get("first_skip")


@torch.no_grad()
def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all of ``model``'s parameters together (under FSDP: of the full parameters, on every rank)."""
    norm = torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
