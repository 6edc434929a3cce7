"""A claim is a difference against its control over seeds: the mean of the paired differences and its interval.

Two runs of the same seed share everything but the treatment (the data draw, the starting model, the batches), so
the seed's difference removes what they share; the interval is Student's t over the seeds' differences
(n - 1 degrees of freedom), the interval of a paired t-test.

Examples:
    >>> interval = paired_interval([0.12, 0.10, 0.15, 0.11, 0.14])
    >>> round(interval.mean, 3), round(interval.low, 3), round(interval.high, 3), interval.n
    (0.124, 0.098, 0.15, 5)
    >>> paired_interval([0.3]).low  # one seed has no interval
    nan
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """The mean of n values with its two-sided interval [low, high] at `confidence`, and the smallest value."""

    mean: float
    low: float
    high: float
    n: int
    minimum: float
    confidence: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of per-seed `differences` (treatment minus control) and its Student-t interval.

    Raises:
        ValueError: no differences, a non-finite one, or a confidence outside (0, 1).
    """
    from scipy import stats

    values = [float(value) for value in differences]
    if not values or not all(math.isfinite(value) for value in values):
        raise ValueError(f"differences={values}: need at least one finite value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, mean, confidence)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, min(values), confidence)
