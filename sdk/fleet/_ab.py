"""A/B rollouts: the plan of a split, what each version did, and the verdict. Pure.

A device of an A/B rollout serves the candidate to ``share`` of its requests and reports,
in every telemetry message, what each version did in the window (docs/mqtt.md,
"telemetry", ``versions``); the collector keeps those numbers (``telemetry_versions``).
Once the candidate has answered ``min_requests`` requests on a device since its wave was
published, :func:`judge` compares it with the version the device serves, over the same
windows. The candidate is **promoted** when all of these hold, and **rejected** otherwise:

- error rate: candidate <= serving + ``max_error_increase`` (absolute, default 0.01);
- latency: candidate's p95 <= serving's p95 x ``max_latency_ratio`` (default 1.2; the p95
  of each is the request-weighted mean of its windows' p95; skipped when either version
  reported none);
- accuracy, only when both versions got at least ``min_labels`` labels back (feedback):
  candidate >= serving - ``max_accuracy_drop`` (absolute, default 0.02).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

__all__ = ["SplitPlan", "VersionStats", "judge", "version_stats"]


@dataclass(frozen=True)
class SplitPlan:
    """How an A/B rollout splits and decides (see the module's rule)."""

    share: float
    min_requests: int = 500
    max_error_increase: float = 0.01
    max_latency_ratio: float = 1.2
    max_accuracy_drop: float = 0.02
    min_labels: int = 50

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ConfigError(f"--split {self.share} must be strictly between 0 and 1")
        if self.min_requests < 1 or self.min_labels < 1:
            raise ConfigError("--split-min-requests and --split-min-labels must be >= 1")
        if self.max_error_increase < 0 or self.max_accuracy_drop < 0:
            raise ConfigError("--split-max-error-increase and --split-max-accuracy-drop >= 0")
        if not self.max_latency_ratio > 0:
            raise ConfigError("--split-max-latency-ratio must be positive")

    def to_json(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "min_requests": self.min_requests,
            "max_error_increase": self.max_error_increase,
            "max_latency_ratio": self.max_latency_ratio,
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_labels": self.min_labels,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SplitPlan:
        """Raises: KeyError, TypeError or ValueError (ConfigError) for a wrong field."""
        return cls(
            share=float(doc["share"]),
            min_requests=int(doc["min_requests"]),
            max_error_increase=float(doc["max_error_increase"]),
            max_latency_ratio=float(doc["max_latency_ratio"]),
            max_accuracy_drop=float(doc["max_accuracy_drop"]),
            min_labels=int(doc["min_labels"]),
        )


@dataclass(frozen=True)
class VersionStats:
    """What one version answered over some telemetry windows."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None  # request-weighted mean of the windows' p95
    labels: int = 0  # feedback received for its answers
    correct: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None

    def describe(self) -> str:
        """``1200 requests, 0.50% errors, p95 3.10 ms, accuracy 96.0% of 300 labels``."""
        p95 = "no p95" if self.p95_ms is None else f"p95 {self.p95_ms:.2f} ms"
        text = f"{self.requests} requests, {self.error_rate:.2%} errors, {p95}"
        if self.accuracy is not None:
            text += f", accuracy {self.accuracy:.1%} of {self.labels} labels"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p95_ms": self.p95_ms,
            "labels": self.labels,
            "correct": self.correct,
            "accuracy": self.accuracy,
        }


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def version_stats(rows: Iterable[Mapping[str, Any]]) -> VersionStats:
    """Sum ``telemetry_versions`` rows of one version (requests, error_count, p95_ms,
    labels, correct)."""
    requests = errors = labels = correct = 0
    weighted, timed = 0.0, 0
    for r in rows:
        n = _int(r["requests"])
        requests += n
        errors += _int(r["error_count"])
        labels += _int(r["labels"])
        correct += _int(r["correct"])
        if r["p95_ms"] is not None and n:
            weighted += float(r["p95_ms"]) * n
            timed += n
    return VersionStats(
        requests=requests,
        errors=min(errors, requests),
        p95_ms=weighted / timed if timed else None,
        labels=labels,
        correct=min(correct, labels),
    )


def judge(candidate: VersionStats, serving: VersionStats, plan: SplitPlan) -> tuple[bool, str]:
    """Whether to promote the candidate, and the numbers and rule that decided."""
    broken = []
    limit = serving.error_rate + plan.max_error_increase
    if candidate.error_rate > limit:
        broken.append(f"error rate {candidate.error_rate:.2%} > {limit:.2%}")
    if candidate.p95_ms is not None and serving.p95_ms is not None:
        bound = serving.p95_ms * plan.max_latency_ratio
        if candidate.p95_ms > bound:
            broken.append(f"p95 {candidate.p95_ms:.2f} ms > {bound:.2f} ms")
    c_acc, s_acc = candidate.accuracy, serving.accuracy
    enough = min(candidate.labels, serving.labels) >= plan.min_labels
    if enough and c_acc is not None and s_acc is not None:
        floor = s_acc - plan.max_accuracy_drop
        if c_acc < floor:
            broken.append(f"accuracy {c_acc:.1%} < {floor:.1%}")
    numbers = f"candidate {candidate.describe()}; serving {serving.describe()}"
    if broken:
        return False, f"{'; '.join(broken)} ({numbers})"
    return True, numbers
