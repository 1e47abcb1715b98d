"""Progress of a loop: a tqdm bar on a terminal, a plain line every so often in a log, nothing when disabled.

A tqdm bar redraws itself with carriage returns, which a log file (a batch job's stdout, ``nohup``, CI) keeps
as one ever-growing line. :func:`track` draws the bar only when its stream is a terminal; otherwise it writes
one newline-terminated line every ``every_s`` seconds and one at the end, each with the count, the rate, the
elapsed time and the ETA (``sft warm start: 120/500 (24%) 3.41 it/s, elapsed 00:35, eta 01:51``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

EVERY_S = 30.0
"""Seconds between two plain lines (a 10-minute stage logs about 20 lines)."""


def track(
    iterable: Iterable,
    desc: str,
    *,
    enabled: bool = True,
    total: int | None = None,
    initial: int = 0,
    unit: str = "it",
    every_s: float = EVERY_S,
    file: TextIO | None = None,
) -> tqdm | PlainProgress:
    """Iterate over ``iterable`` while showing its progress.

    Args:
        iterable: what the loop runs over.
        desc: what the loop does (the line's prefix).
        enabled: False shows nothing (the ``progress=false`` of a run).
        total: the count at the end (None: ``len(iterable)`` if it has one, as in tqdm).
        initial: the count before the first item (a resumed run's steps already done).
        unit: what an item is (``"it"``, ``"batch"``).
        every_s: seconds between plain lines when ``file`` is not a terminal.
        file: where to write; default ``sys.stderr`` (as tqdm).

    Returns:
        An iterable over the same items with ``set_postfix(**values)`` (shown at the end of the bar or line):
        a tqdm bar when ``file`` is a terminal, a :class:`PlainProgress` when it is not.
    """
    stream = sys.stderr if file is None else file
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, file=stream)
    return PlainProgress(iterable, desc, total, initial, unit, every_s, stream, enabled)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress:
    """The log form of a progress bar: newline-terminated lines, never a carriage return.

    Writes a line when ``every_s`` seconds have passed since the previous one (checked at each item) and a
    last one when the iteration ends (also after a ``break``, when the loop's iterator is closed), unless
    disabled. Arguments as in :func:`track`.
    """

    def __init__(
        self, iterable: Iterable, desc: str, total: int | None, initial: int, unit: str, every_s: float,
        file: TextIO, enabled: bool = True,
    ):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.every_s, self.file, self.enabled = every_s, file, enabled
        self.n = self.initial = initial
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the following lines (``loss=0.1234``)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        if not self.enabled:
            yield from self.iterable
            return
        self._start = last = time.monotonic()
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                now = time.monotonic()
                if now - last >= self.every_s:
                    self._write(now)
                    last = now
        finally:
            self._write(time.monotonic())

    def line(self, now: float) -> str:
        """The line for the state at time ``now`` (monotonic seconds)."""
        elapsed = now - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.n}"
        if self.total is not None:
            line += f"/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
        line += f" {rate:.3g} {self.unit}/s, elapsed {tqdm.format_interval(elapsed)}"
        if self.total is not None:
            line += f", eta {tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else '?'}"
        return f"{line}, {self.postfix}" if self.postfix else line

    def _write(self, now: float) -> None:
        self.file.write(self.line(now) + "\n")
        self.file.flush()


def library_bars(enabled: bool, file: TextIO | None = None) -> None:
    """Let transformers' own tqdm bars (weight loading, ``save_pretrained``'s "Writing model shards") follow
    :func:`track`'s rule: drawn only when ``enabled`` and the stream (default stderr) is a terminal, so a log
    gets no carriage-return lines from them either."""
    from transformers.utils import logging as hf_logging

    if enabled and (file or sys.stderr).isatty():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
