"""The agent's own ``/metrics``: its serving totals in Prometheus' text exposition format.

Rendered here from :class:`~agent.telemetry._metrics.Metrics` rather than through
prometheus-client, which the agent does not depend on (docs/architecture.md): the format
is a few lines of text. Series (docs/agent.md, "Prometheus"): requests and errors by kind
(counters, at most 32 kinds), the latency histogram folded into :data:`BUCKETS_S`, the
serving model's info and, when its manifest has one, its p95 latency budget. At most
``4 + 32 + len(BUCKETS_S) + 3`` series, whatever the traffic.

A latency histogram bucket is counted under the first ``le`` bound at or above its
representative value, so the bucket counts are exact to the histogram's relative accuracy
(1%): a request of 1.005 ms may count under ``le="0.001"``.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.plumbing.compat import zip_strict
from agent.telemetry._metrics import Metrics

__all__ = ["BUCKETS_S", "CONTENT_TYPE", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From half a millisecond (a small model on a fast core) to ten seconds (a large one on a
# slow board).
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PREFIX = "edgeship_agent_"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _head(lines: list[str], name: str, kind: str, doc: str) -> None:
    lines += [f"# HELP {_PREFIX}{name} {doc}", f"# TYPE {_PREFIX}{name} {kind}"]


def exposition(metrics: Metrics | Mapping[str, Metrics]) -> bytes:
    """The text a Prometheus scrape of the agent gets (:data:`CONTENT_TYPE`): of one
    model's ``metrics``, or of several by name, each series labelled ``model="NAME"``."""
    named = {"": metrics} if isinstance(metrics, Metrics) else dict(metrics)
    series: dict[str, list[str]] = {}
    for model, m in named.items():
        _series(series, m, _pair("model", model) if model else "")
    lines: list[str] = []
    for name, (kind, doc) in _FAMILIES.items():
        if series.get(name):
            _head(lines, name, kind, doc)
            lines += series[name]
    return ("\n".join(lines) + "\n").encode()


_FAMILIES = {
    "requests_total": ("counter", "Predictions answered since the agent started."),
    "errors_total": ("counter", "Failed predictions by error kind."),
    "request_duration_seconds": ("histogram", "Prediction latency (1% relative accuracy)."),
    "model_info": ("gauge", "The serving model (1)."),
    "latency_budget_seconds": ("gauge", "The bundle's p95 latency budget."),
}


def _pair(key: str, value: object) -> str:
    return f'{key}="{_label(str(value))}"'


def _series(out: dict[str, list[str]], metrics: Metrics, model: str) -> None:
    """One model's samples, by family; ``model`` is its label (or empty)."""

    def labels(*more: str) -> str:
        inner = ",".join(x for x in (model, *more) if x)
        return f"{{{inner}}}" if inner else ""

    totals = metrics.totals()
    layout = metrics.layout
    out.setdefault("requests_total", []).append(
        f"{_PREFIX}requests_total{labels()} {totals.requests}"
    )
    out.setdefault("errors_total", []).extend(
        f"{_PREFIX}errors_total{labels(_pair('kind', kind))} {n}"
        for kind, n in sorted(totals.errors.items())
    )
    name = "request_duration_seconds"
    below = [0] * len(BUCKETS_S)
    for i, count in enumerate(totals.bucket_counts):
        if count:
            value = layout.value_of(i)
            for j, bound in enumerate(BUCKETS_S):
                if value <= bound:
                    below[j] += count
                    break
    hist = out.setdefault(name, [])
    cumulative = 0
    for bound, count in zip_strict(BUCKETS_S, below):
        cumulative += count
        hist.append(f"{_PREFIX}{name}_bucket{labels(_pair('le', bound))} {cumulative}")
    hist += [
        f"{_PREFIX}{name}_bucket{labels(_pair('le', '+Inf'))} {totals.requests}",
        f"{_PREFIX}{name}_sum{labels()} {totals.latency_sum_s!r}",
        f"{_PREFIX}{name}_count{labels()} {totals.requests}",
    ]
    info = totals.model
    if info is not None:
        about = (_pair("name", info.name), _pair("version", info.version))
        sequence = _pair("sequence", info.sequence)
        out.setdefault("model_info", []).append(f"{_PREFIX}model_info{labels(*about, sequence)} 1")
        if info.latency_budget_p95_ms is not None:
            budget = info.latency_budget_p95_ms / 1e3
            out.setdefault("latency_budget_seconds", []).append(
                f"{_PREFIX}latency_budget_seconds{labels()} {budget!r}"
            )
