"""Per-interval serving metrics: requests, errors by kind, latency quantiles, throughput.

Latency goes into a fixed-size histogram with logarithmic buckets (the DDSketch
mapping): memory is constant whatever the request rate, and every quantile is within a
known *relative* error of the true sample quantile. :meth:`Metrics.record` is on the
serving hot path, so it does one ``math.log`` and a few integer updates under an
uncontended lock; all the summarising happens in :meth:`Metrics.snapshot`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.plumbing.compat import zip_strict
from agent.plumbing.stats import quantile_rank

__all__ = [
    "LatencySummary",
    "LogHistogram",
    "Metrics",
    "MetricsSnapshot",
    "MetricsTotals",
    "ModelInfo",
]

_log = math.log
_ceil = math.ceil

# Distinct error kinds kept per interval; more are folded into "other" so a caller that
# puts free text into the kind cannot grow memory without bound.
MAX_ERROR_KINDS = 32


class LogHistogram:
    """Counts of positive values in log-spaced buckets between ``min_value`` and ``max_value``.

    Bucket ``i >= 1`` holds ``(min * g**(i-1), min * g**i]`` with
    ``g = (1 + a) / (1 - a)``; reporting ``2 * min * g**i / (1 + g)`` for it is within
    relative error ``a`` of any value in it. Bucket 0 holds everything ``<= min_value``,
    the last bucket everything above ``max_value`` (both reported as their bound).
    """

    __slots__ = ("_inv_log_gamma", "_log_min", "counts", "gamma", "max_value", "min_value")

    def __init__(
        self, min_value: float = 1e-6, max_value: float = 1e3, relative_accuracy: float = 0.01
    ) -> None:
        if not 0 < min_value < max_value or not 0 < relative_accuracy < 1:
            raise ValueError("need 0 < min_value < max_value and 0 < relative_accuracy < 1")
        self.min_value = min_value
        self.max_value = max_value
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self._log_min = math.log(min_value)
        buckets = math.ceil((math.log(max_value) - self._log_min) * self._inv_log_gamma) + 2
        self.counts = [0] * buckets

    def index(self, value: float) -> int:
        """The bucket of ``value`` (cheap: one log, no allocation)."""
        if not value > self.min_value:  # written so that NaN lands here too
            return 0
        i = math.ceil((math.log(value) - self._log_min) * self._inv_log_gamma)
        return min(i, len(self.counts) - 1)

    def add(self, value: float) -> None:
        self.counts[self.index(value)] += 1

    def value_of(self, i: int) -> float:
        """The representative value of bucket ``i``."""
        if i == 0:
            return self.min_value
        if i == len(self.counts) - 1:
            return self.max_value
        return 2 * self.min_value * self.gamma**i / (1 + self.gamma)

    def quantiles(self, qs: tuple[float, ...]) -> list[float] | None:
        """Estimates of the ``qs`` quantiles; None when empty.

        For ``q``, the estimate is within the relative accuracy of the nearest-rank
        quantile, the one definition edgeship uses (:mod:`agent.plumbing.stats`).
        """
        n = sum(self.counts)
        if n == 0:
            return None
        ranks = [quantile_rank(q, n) - 1 for q in qs]
        out: list[float | None] = [None] * len(qs)
        seen = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            for j, r in enumerate(ranks):
                if out[j] is None and r < seen:
                    out[j] = self.value_of(i)
            if all(v is not None for v in out):
                break
        return [v if v is not None else self.max_value for v in out]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sequence: int
    latency_budget_p95_ms: float | None = None  # the manifest's health budget, if any
    # The runtime and the execution provider (or delegate) it serves on, when known.
    runtime: str | None = None
    provider: str | None = None


@dataclass(frozen=True)
class LatencySummary:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


@dataclass(frozen=True)
class MetricsSnapshot:
    window_s: float
    requests: int
    errors: dict[str, int]
    latency: LatencySummary | None  # None when no request finished in the window
    throughput_rps: float
    model: ModelInfo | None
    histogram_relative_accuracy: float = field(default=0.01)

    def to_json(self) -> dict[str, Any]:
        lat = self.latency
        return {
            "window_s": round(self.window_s, 3),
            "requests": self.requests,
            "errors": dict(sorted(self.errors.items())),
            "error_count": sum(self.errors.values()),
            "throughput_rps": round(self.throughput_rps, 3),
            "latency_ms": None
            if lat is None
            else {
                "p50": round(lat.p50_ms, 4),
                "p95": round(lat.p95_ms, 4),
                "p99": round(lat.p99_ms, 4),
                "mean": round(lat.mean_ms, 4),
                "max": round(lat.max_ms, 4),
                "relative_accuracy": self.histogram_relative_accuracy,
            },
            "model": None
            if self.model is None
            else {
                "name": self.model.name,
                "version": self.model.version,
                "sequence": self.model.sequence,
            }
            # Only when the bundle has one: the fleet's p95 alert compares with it.
            | (
                {}
                if self.model.latency_budget_p95_ms is None
                else {"latency_budget_p95_ms": self.model.latency_budget_p95_ms}
            )
            | ({} if self.model.provider is None else self._serving()),
        }

    def _serving(self) -> dict[str, Any]:
        assert self.model is not None  # the caller checked
        return {"runtime": self.model.runtime, "provider": self.model.provider}


@dataclass(frozen=True)
class MetricsTotals:
    """Everything recorded since the agent started (Prometheus counters): requests, the
    sum of their latencies in seconds, errors by kind, and the latency histogram's counts
    (its buckets: :attr:`Metrics.layout`)."""

    requests: int
    latency_sum_s: float
    errors: dict[str, int]
    bucket_counts: tuple[int, ...]
    model: ModelInfo | None


class _Window:
    __slots__ = ("errors", "hist", "lat_max", "lat_sum", "requests", "started")

    def __init__(self, started: float, relative_accuracy: float) -> None:
        self.started = started
        self.requests = 0
        self.lat_sum = 0.0
        self.lat_max = 0.0
        self.errors: dict[str, int] = {}
        self.hist = LogHistogram(relative_accuracy=relative_accuracy)


def _add_errors(into: dict[str, int], errors: dict[str, int]) -> None:
    """Add ``errors`` by kind, keeping at most MAX_ERROR_KINDS kinds (the rest: "other")."""
    for kind, n in errors.items():
        if kind not in into and len(into) >= MAX_ERROR_KINDS:
            kind = "other"  # noqa: PLW2901 - folded like record() folds
        into[kind] = into.get(kind, 0) + n


class Metrics:
    """Thread-safe per-interval aggregation of serving results."""

    def __init__(
        self, *, relative_accuracy: float = 0.01, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._accuracy = relative_accuracy
        self._lock = threading.Lock()
        self._window = _Window(clock(), relative_accuracy)
        self._totals = _Window(clock(), relative_accuracy)  # of the closed windows
        self._model: ModelInfo | None = None
        # Every window's histogram has this layout; record() computes buckets itself.
        layout = self._window.hist
        self._min_s = layout.min_value
        self._log_min = math.log(layout.min_value)
        self._inv_log_gamma = 1.0 / math.log(layout.gamma)
        self._last_bucket = len(layout.counts) - 1

    def set_model(
        self,
        name: str,
        version: str,
        sequence: int,
        latency_budget_p95_ms: float | None = None,
        serving: Mapping[str, str] | None = None,
    ) -> None:
        """Name the model serving from now on (reported with every snapshot), and the
        runtime and provider it serves on (``serving``: ``runtime``, ``provider``)."""
        serving = serving or {}
        self._model = ModelInfo(
            name,
            version,
            sequence,
            latency_budget_p95_ms,
            serving.get("runtime"),
            serving.get("provider"),
        )

    @property
    def layout(self) -> LogHistogram:
        """An empty histogram with the buckets of every window and of the totals."""
        return LogHistogram(relative_accuracy=self._accuracy)

    def totals(self) -> MetricsTotals:
        """The counts since the start, the open window included (it stays open)."""
        with self._lock:
            w, t = self._window, self._totals
            errors = dict(t.errors)
            _add_errors(errors, w.errors)
            counts = tuple(a + b for a, b in zip_strict(t.hist.counts, w.hist.counts))
            requests, lat_sum = t.requests + w.requests, t.lat_sum + w.lat_sum
        return MetricsTotals(requests, lat_sum, errors, counts, self._model)

    def record(self, latency_s: float, error: str | None = None) -> None:
        """Count one finished request: its latency and, if it failed, the error kind."""
        # LogHistogram.index inlined: this is the serving hot path (~1 us on a slow VM,
        # of which the uncontended lock is about a third).
        if latency_s > self._min_s:
            i = _ceil((_log(latency_s) - self._log_min) * self._inv_log_gamma)
            if i > self._last_bucket:  # noqa: PLR1730 - a branch is cheaper than min() here
                i = self._last_bucket
        else:  # also NaN
            i = 0
        with self._lock:
            w = self._window
            w.requests += 1
            w.hist.counts[i] += 1
            w.lat_sum += latency_s
            if latency_s > w.lat_max:  # noqa: PLR1730 - a branch is cheaper than max() here
                w.lat_max = latency_s
            if error is not None:
                errors = w.errors
                if error not in errors and len(errors) >= MAX_ERROR_KINDS:
                    error = "other"
                errors[error] = errors.get(error, 0) + 1

    def snapshot(self) -> MetricsSnapshot:
        """Summarise the window since the previous snapshot and start a new one."""
        now = self._clock()
        fresh = _Window(now, self._accuracy)
        with self._lock:
            w, self._window = self._window, fresh
            t = self._totals  # a snapshot per interval: the fold stays off the hot path
            t.requests += w.requests
            t.lat_sum += w.lat_sum
            _add_errors(t.errors, w.errors)
            t.hist.counts = [a + b for a, b in zip_strict(t.hist.counts, w.hist.counts)]
        elapsed = max(now - w.started, 1e-9)
        latency = None
        qs = w.hist.quantiles((0.5, 0.95, 0.99))
        if qs is not None:
            latency = LatencySummary(
                p50_ms=qs[0] * 1e3,
                p95_ms=qs[1] * 1e3,
                p99_ms=qs[2] * 1e3,
                mean_ms=w.lat_sum / w.requests * 1e3,
                max_ms=w.lat_max * 1e3,
            )
        return MetricsSnapshot(
            window_s=elapsed,
            requests=w.requests,
            errors=dict(w.errors),
            latency=latency,
            throughput_rps=w.requests / elapsed,
            model=self._model,
            histogram_relative_accuracy=self._accuracy,
        )
