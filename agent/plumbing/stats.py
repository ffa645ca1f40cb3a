"""The one definition of a percentile, used wherever edgeship states a latency.

The build gate (``--max-p95-ms``), the device's health gate (the manifest's
``latency_budget_p95_ms``), probation (``max_p95_ms``), telemetry and the benchmarks all
mean the same thing by "p95": the **nearest rank** — the smallest observed value such
that at least 95 % of the observations are at or below it. It is always a value that was
actually observed (no interpolation between two runs), so a budget compared against it
compares against a real call. The telemetry histogram reports the same rank, within its
stated relative accuracy (:class:`agent.telemetry.LogHistogram`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "percentile_ms", "quantile_rank"]


def quantile_rank(q: float, n: int) -> int:
    """The 1-based rank of the ``q`` quantile among ``n`` sorted observations.

    Raises:
        ValueError: ``q`` is outside [0, 1] or ``n`` < 1.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is between 0 and 1, not {q}")
    if n < 1:
        raise ValueError("no observations")
    return max(1, math.ceil(q * n - 1e-9))  # 1e-9: 0.95 * 100 is 95.00000000000001


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (``q`` in [0, 1]).

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside [0, 1].
    """
    ordered: Sequence[float] = sorted(values)
    return ordered[quantile_rank(q, len(ordered)) - 1]


def percentile_ms(latencies_s: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of latencies in seconds, in milliseconds; 0.0 if none."""
    ordered = sorted(latencies_s)
    if not ordered:
        return 0.0
    return ordered[quantile_rank(q, len(ordered)) - 1] * 1000.0
