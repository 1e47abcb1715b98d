"""Divergence detection: a non-finite or out-of-range loss or gradient norm stops (or skips) an update.

An :class:`~algorithms.base.Algorithm` with a ``guard`` asks it before the backward pass (the loss) and
before the optimiser step (the gradient norm), so a refused update changes nothing. "Out of range" is
relative to the values of the last accepted updates: beyond their ``[min, max]`` by more than ``factor``
times the larger of the range's width and the values' mean magnitude. With ``algo.lr=1e3`` the first step
wrecks the student and the loss jumps ~70x at the next one; ordinary training moves well inside that.
"""

from __future__ import annotations

import math
from collections import deque

WATCHED = ("loss/total", "optim/grad_norm")
"""The update statistics the guard watches."""


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

    def record(self, stats: dict[str, float]) -> None:
        """Add an accepted update's statistics to the running ranges."""
        for term in WATCHED:
            if term in stats:
                self.history[term].append(float(stats[term]))

    def state_dict(self) -> dict:
        """The running ranges (checkpointed, so a resumed run decides exactly as an uninterrupted one)."""
        return {term: list(values) for term, values in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        for term, values in state.items():
            self.history[term].clear()
            self.history[term].extend(values)
