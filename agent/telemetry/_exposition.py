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


def exposition(metrics: Metrics) -> bytes:
    """The text a Prometheus scrape of the agent gets (:data:`CONTENT_TYPE`)."""
    totals = metrics.totals()
    layout = metrics.layout
    lines: list[str] = []
    _head(lines, "requests_total", "counter", "Predictions answered since the agent started.")
    lines.append(f"{_PREFIX}requests_total {totals.requests}")
    _head(lines, "errors_total", "counter", "Failed predictions by error kind.")
    lines += [
        f'{_PREFIX}errors_total{{kind="{_label(kind)}"}} {n}'
        for kind, n in sorted(totals.errors.items())
    ]
    name = "request_duration_seconds"
    _head(lines, name, "histogram", "Prediction latency (1% relative accuracy).")
    below = [0] * len(BUCKETS_S)
    for i, count in enumerate(totals.bucket_counts):
        if count:
            value = layout.value_of(i)
            for j, bound in enumerate(BUCKETS_S):
                if value <= bound:
                    below[j] += count
                    break
    cumulative = 0
    for bound, count in zip_strict(BUCKETS_S, below):
        cumulative += count
        lines.append(f'{_PREFIX}{name}_bucket{{le="{bound}"}} {cumulative}')
    lines += [
        f'{_PREFIX}{name}_bucket{{le="+Inf"}} {totals.requests}',
        f"{_PREFIX}{name}_sum {totals.latency_sum_s!r}",
        f"{_PREFIX}{name}_count {totals.requests}",
    ]
    model = totals.model
    if model is not None:
        _head(lines, "model_info", "gauge", "The serving model (1).")
        labels = f'name="{_label(model.name)}",version="{_label(model.version)}"'
        lines.append(f'{_PREFIX}model_info{{{labels},sequence="{model.sequence}"}} 1')
        if model.latency_budget_p95_ms is not None:
            _head(lines, "latency_budget_seconds", "gauge", "The bundle's p95 latency budget.")
            lines.append(f"{_PREFIX}latency_budget_seconds {model.latency_budget_p95_ms / 1e3!r}")
    return ("\n".join(lines) + "\n").encode()
