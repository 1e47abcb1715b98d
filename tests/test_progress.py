"""tokenrl.core.progress.track: a bar on a terminal, plain lines in a log, nothing when disabled."""

from __future__ import annotations

import io

from tokenrl.core.progress import PlainProgress, track, library_bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_count_rate_eta_and_postfix():
    log = io.StringIO()
    bar = track(range(3, 10), "sft warm start", initial=3, total=10, every_s=0.0, file=log)
    assert isinstance(bar, PlainProgress)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=f"{0.5:.4f}")
    assert seen == list(range(3, 10))
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 7 + 1  # one per item at every_s=0, and the last one
    assert lines[0].startswith("sft warm start: 4/10 (40%) ") and "it/s, elapsed 00:00, eta " in lines[0]
    assert lines[-1].startswith("sft warm start: 10/10 (100%) ") and lines[-1].endswith(", loss=0.5000")


def test_a_log_gets_only_the_last_line_of_a_short_loop_and_one_after_a_break():
    log = io.StringIO()
    assert list(track([1, 2, 3], "data", unit="batch", file=log)) == [1, 2, 3]
    assert log.getvalue().count("\n") == 1 and log.getvalue().startswith("data: 3/3 (100%) ")
    log = io.StringIO()
    for i in track(iter(range(100)), "rollouts", file=log):
        if i == 4:
            break
    assert log.getvalue().splitlines() == [log.getvalue().strip()]
    assert log.getvalue().startswith("rollouts: 4 ")  # no total: no percentage and no ETA
    assert "eta" not in log.getvalue()


def test_a_terminal_gets_a_tqdm_bar():
    term = Terminal()
    assert list(track(range(5), "train", file=term)) == list(range(5))
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()


def test_disabled_writes_nothing_in_either_mode():
    for stream in (io.StringIO(), Terminal()):
        bar = track(range(4), "train", enabled=False, file=stream, every_s=0.0)
        bar.set_postfix(loss=1.0)
        assert list(bar) == [0, 1, 2, 3]
        assert stream.getvalue() == ""


def test_transformers_bars_follow_the_same_rule():
    from transformers.utils import logging as hf_logging

    try:
        library_bars(True, file=Terminal())
        assert hf_logging.is_progress_bar_enabled()
        library_bars(True, file=io.StringIO())  # a log: no carriage-return bars from transformers either
        assert not hf_logging.is_progress_bar_enabled()
        library_bars(False, file=Terminal())  # progress=false
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
