"""Intervals over training seeds: Student's t-interval of a mean and of a paired per-seed difference.

Every cell of the benchmark tables is a mean over training seeds with its 95% t-interval, and each method is
also compared with a reference method seed by seed (the same seed starts both from the same SFT start, so
the paired difference removes the start's seed-to-seed spread):

    >>> t_interval([0.50, 0.52, 0.49]).format()
    '0.503 ± 0.038'
    >>> paired_difference({0: 0.50, 1: 0.52}, {0: 0.55, 1: 0.56}).n
    2

Student's t quantile is computed here, exactly for the integer degrees of freedom a seed count gives (the
closed forms of the t distribution's CDF, Abramowitz & Stegun 26.7.3-4, inverted by bisection), so scipy
stays a test-only dependency; ``tests/test_benchmark.py`` checks the quantiles and intervals against
``scipy.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Hashable


def t_two_sided_probability(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (a positive integer) degrees of freedom, ``t >= 0``."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        # (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + ... + (2*4*..*(df-3))/(1*3*..*(df-2)) cos^(df-2))]
        series, term = 0.0, math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):
            series += term
            term *= cos2 * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + math.sin(theta) * series)
    # sin(theta) [1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... + (1*3*..*(df-3))/(2*4*..*(df-2)) cos^(df-2)]
    series, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):
        series += term
        term *= cos2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * series


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence``: the half-width factor of a two-sided interval.

    Equal to ``scipy.stats.t.ppf((1 + confidence) / 2, df)`` (e.g. 12.706 for 95% and df = 1, 4.303 for df = 2).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < confidence:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection to float precision (the probability is increasing in t)
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if t_two_sided_probability(mid, df) < confidence:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its confidence interval ``[low, high]`` (NaN bounds when ``n < 2``).

    Attributes:
        mean: the sample mean (NaN when ``n == 0``).
        low: lower bound of the interval.
        high: upper bound of the interval.
        n: number of values.
        values: the values themselves, in the order given.
    """

    mean: float
    low: float
    high: float
    n: int
    values: tuple[float, ...] = ()

    @property
    def half_width(self) -> float:
        """``high - mean`` (NaN without an interval)."""
        return self.high - self.mean

    def format(self, digits: int = 3) -> str:
        """``mean ± half-width``; ``mean (n = 1)`` for one value (no interval), ``–`` for none."""
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n = 1)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` with Student's t-interval: ``mean ± t_{df=n-1} * s / sqrt(n)`` (``s``: ``ddof=1``)."""
    xs = tuple(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, xs)


def paired_difference(
    values: Mapping[Hashable, float], reference: Mapping[Hashable, float], confidence: float = 0.95
) -> Interval:
    """The t-interval of the per-key differences ``values[k] - reference[k]`` over the keys both have.

    Keys are training seeds: a method and the reference trained with the same seed share their SFT start.
    """
    common = [key for key in values if key in reference]
    return t_interval((values[key] - reference[key] for key in common), confidence)
