"""Ranges and choices of config fields, checked where each config is defined (d3rlpy's configs).

A config lists its fields' rules and gets back every violation at once, one line each, in the one format the
run's start-up check prints (:func:`tokenrl.run.checks.check_config`):

    >>> field_problems(cfg, "algo", ranges={"alpha": POSITIVE}, choices={"q_shift": ("set", "vocab")})
    ["algo.alpha=0.0: must be > 0; set algo.alpha=<a value > 0>", "algo.q_shift='max': must be one of ('set', 'vocab')"]

Every rule holds only finite numbers (``inf`` passes ``> 0`` as a comparison, not as a learning rate), and
:func:`nonfinite_problems` finds a NaN or infinity in any number of a config tree, ranged or not.
"""

from __future__ import annotations

import dataclasses
import math
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


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def range_problem(key: str, value: Any, rule: Range) -> str | None:
    """``"key=value: must be <rule>; set key=<a value <rule>>"`` when ``value`` breaks ``rule`` or is not a
    finite number, else None."""
    finite = _finite(value)
    if finite and rule.ok(value):
        return None
    note = f" ({rule.note})" if rule.note else ""
    must = rule.must if finite else f"a finite number {rule.must}"
    return f"{key}={value!r}: must be {must}{note}; set {key}=<a value {rule.must}>"


def nonfinite_problems(node: Any, prefix: str) -> list[str]:
    """A line for every NaN or infinite number in the config tree ``node`` (dataclasses, dicts and lists), keyed by
    its dotted path under ``prefix``."""
    if dataclasses.is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, Mapping):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        return [line for i, v in enumerate(node) for line in nonfinite_problems(v, f"{prefix}[{i}]")]
    else:
        return [] if _finite(node) else [f"{prefix}={node!r}: must be a finite number; set {prefix}=<a finite value>"]
    return [line for name, value in items for line in nonfinite_problems(value, f"{prefix}.{name}" if prefix else name)]


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
        prefix: the node's dotted path in the run config (``"algo"``), written before each key ("" at the top).
        ranges: field name -> :class:`Range` (an optional field set to None passes).
        choices: field name -> allowed values.
    """
    found = []
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    for name, rule in (ranges or {}).items():
        value = getattr(node, name)
        if value is not None:  # an optional field's "none" (the schema refuses None elsewhere)
            found.append(range_problem(key(name), value, rule))
    for name, allowed in (choices or {}).items():
        found.append(choice_problem(key(name), getattr(node, name), allowed))
    return [line for line in found if line is not None]
