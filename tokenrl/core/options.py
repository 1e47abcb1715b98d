"""Ranges and choices of config fields, checked where each config is defined (d3rlpy's configs).

A config lists its fields' rules and gets back every violation at once, one line each, in the one format the
run's start-up check prints (:func:`tokenrl.run.checks.check_config`):

    >>> field_problems(cfg, "algo", ranges={"alpha": POSITIVE}, choices={"q_shift": ("set", "vocab")})
    ["algo.alpha=0.0: must be > 0; set algo.alpha=<a value > 0>", "algo.q_shift='max': must be one of ('set', 'vocab')"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """What a numeric field must be.

    Attributes:
        ok: the test a valid value passes.
        must: the rule in words (``"> 0"``, ``"in (0, 1]"``), used in the message and its fix.
        note: why, or what a special value means (``"0 = off"``); shown in parentheses after the rule.
    """

    ok: Callable[[Any], bool]
    must: str
    note: str = ""

    def explained(self, note: str) -> Range:
        """The same rule with ``note`` in its message."""
        return Range(self.ok, self.must, note)


POSITIVE = Range(lambda x: x > 0, "> 0")
NON_NEGATIVE = Range(lambda x: x >= 0, ">= 0")
AT_LEAST_ONE = Range(lambda x: x >= 1, ">= 1")
PROBABILITY = Range(lambda x: 0.0 < x <= 1.0, "in (0, 1]")
UNIT_INTERVAL = Range(lambda x: 0.0 <= x <= 1.0, "in [0, 1]")
HALF_OPEN_UNIT = Range(lambda x: 0.0 <= x < 1.0, "in [0, 1)")
OPEN_UNIT = Range(lambda x: 0.0 < x < 1.0, "in (0, 1)")


def range_problem(key: str, value: Any, rule: Range) -> str | None:
    """``"key=value: must be <rule>; set key=<a value <rule>>"`` when ``value`` breaks ``rule``, else None."""
    if rule.ok(value):
        return None
    note = f" ({rule.note})" if rule.note else ""
    return f"{key}={value!r}: must be {rule.must}{note}; set {key}=<a value {rule.must}>"


def choice_problem(key: str, value: Any, choices: Sequence[str]) -> str | None:
    """``"key=value: must be one of (...)"`` when ``value`` is not among ``choices``, else None."""
    return None if value in choices else f"{key}={value!r}: must be one of {tuple(choices)}"


def field_problems(
    node: Any,
    prefix: str,
    ranges: Mapping[str, Range] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Every field of ``node`` that breaks its range or is not among its choices, one line each.

    Args:
        node: a config dataclass.
        prefix: the node's dotted path in the run config (``"algo"``), written before each key.
        ranges: field name -> :class:`Range`.
        choices: field name -> allowed values.
    """
    found = []
    for name, rule in (ranges or {}).items():
        found.append(range_problem(f"{prefix}.{name}", getattr(node, name), rule))
    for name, allowed in (choices or {}).items():
        found.append(choice_problem(f"{prefix}.{name}", getattr(node, name), allowed))
    return [line for line in found if line is not None]
