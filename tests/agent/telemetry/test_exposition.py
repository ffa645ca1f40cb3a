"""The agent's /metrics text: valid exposition format, counters that survive snapshots."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry._exposition import BUCKETS_S, exposition
from agent.telemetry._metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition(metrics).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_keep_counting_across_the_reporters_snapshots() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.record(0.002)
    metrics.snapshot()  # what the reporter does every interval
    metrics.record(0.004, "invalid-input")
    got = samples(metrics)
    assert got[("edgeship_agent_requests_total", ())] == 4
    assert got[("edgeship_agent_errors_total", (("kind", "invalid-input"),))] == 1
    assert got[("edgeship_agent_request_duration_seconds_count", ())] == 4
    assert abs(got[("edgeship_agent_request_duration_seconds_sum", ())] - 0.010) < 1e-9


def test_the_histogram_is_cumulative_and_puts_each_latency_under_its_bound() -> None:
    metrics = Metrics()
    for latency_s in (0.0003, 0.003, 0.003, 0.2, 30.0):
        metrics.record(latency_s)
    got = samples(metrics)

    def bucket(le: str) -> float:
        return got[("edgeship_agent_request_duration_seconds_bucket", (("le", le),))]

    assert [bucket(str(b)) for b in (0.0005, 0.0025, 0.005, 0.1, 0.25, 10.0)] == [1, 1, 3, 3, 4, 4]
    assert bucket("+Inf") == 5
    assert len([k for k in got if k[0].endswith("_bucket")]) == len(BUCKETS_S) + 1


def test_the_model_is_named_with_escaped_labels_and_its_budget_in_seconds() -> None:
    metrics = Metrics()
    metrics.set_model('di"gits\\', "1.2.0", 7, latency_budget_p95_ms=5.0)
    got = samples(metrics)
    labels = (("name", 'di"gits\\'), ("sequence", "7"), ("version", "1.2.0"))
    assert got[("edgeship_agent_model_info", labels)] == 1
    assert got[("edgeship_agent_latency_budget_seconds", ())] == 0.005


def test_an_agent_without_a_model_or_budget_exports_neither() -> None:
    names = {name for name, _ in samples(Metrics())}
    assert "edgeship_agent_model_info" not in names
    assert "edgeship_agent_latency_budget_seconds" not in names
    assert "edgeship_agent_requests_total" in names
