"""A real Prometheus scrapes a real collector fed by devices' real reporters through a
real mosquitto, and an agent's own /metrics; PromQL answers what they reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.serve.http import HttpServer, HttpServerConfig
from agent.telemetry._exposition import exposition
from agent.telemetry._metrics import Metrics
from tests.support.broker import Broker, free_port
from tests.support.collector import CollectorProcess
from tests.support.fake_device import ReportingDevice
from tests.support.models import load_onnx_mlp
from tests.support.prometheus import Prometheus

RULES = Path(__file__).resolve().parents[3] / "examples" / "prometheus" / "edgeship.rules.yml"
TOKEN = "prometheus-test-token-0123"


def device_metrics(latency_s: float, requests: int, errors: int) -> Metrics:
    metrics = Metrics()
    metrics.set_model("digits", "1.2.0", 7, latency_budget_p95_ms=5.0)
    for i in range(requests):
        metrics.record(latency_s, "invalid-input" if i < errors else None)
    return metrics


def values(prometheus: Prometheus, promql: str) -> dict[str, float]:
    """Per device (or the job), the value of ``promql``."""
    out: dict[str, float] = {}
    for r in prometheus.query(promql):
        labels: dict[str, Any] = r["metric"]
        out[labels.get("device", labels.get("job", ""))] = float(r["value"][1])
    return out


def test_prometheus_answers_promql_about_the_devices_and_an_agent(
    broker: Broker,
    collect_processes: Callable[..., CollectorProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    collect_processes(
        broker, str(tmp_path / "fleet.sqlite"), tmp_path / "collect.log",
        options=("--metrics-port", str(port)),
    )  # fmt: skip
    host, mqtt_port = broker.host, broker.port
    fast = ReportingDevice(host, mqtt_port, "f", "fast", tmp_path,
                           metrics=device_metrics(0.002, 100, 0)).start()  # fmt: skip
    slow = ReportingDevice(host, mqtt_port, "f", "slow", tmp_path,
                           metrics=device_metrics(0.008, 50, 5)).start()  # fmt: skip
    agent_metrics = device_metrics(0.003, 20, 1)
    config = HttpServerConfig(enabled=True, port=0, token=TOKEN, metrics=True)
    with (
        load_onnx_mlp(tmp_path / "model") as model,
        HttpServer(model, config, metrics_text=lambda: exposition(agent_metrics)) as agent,
    ):
        jobs = [
            {"job_name": "edgeship-fleet", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
            {"job_name": "edgeship-agent", "authorization": {"credentials": TOKEN},
             "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]},
        ]  # fmt: skip
        try:
            fast.report()
            slow.report()
            with Prometheus(tmp_path / "prometheus", jobs, rule_files=(RULES,)) as prometheus:
                prometheus.wait(
                    lambda: len(values(prometheus, "edgeship_device_requests_total")) == 2,
                    "scraping both devices",
                )
                prometheus.wait(
                    lambda: values(prometheus, "edgeship_agent_requests_total"),
                    "scraping the agent",
                )
                assert values(prometheus, "edgeship_device_online") == {"fast": 1, "slow": 1}
                assert values(prometheus, "edgeship_device_requests_total") == {
                    "fast": 100,
                    "slow": 50,
                }
                p95 = values(prometheus, 'edgeship_device_latency_seconds{quantile="0.95"}')
                assert abs(p95["fast"] - 0.002) < 0.002 * 0.02
                over = "edgeship_device_latency_seconds{quantile='0.95'} > on (fleet, device)" \
                       " edgeship_device_latency_budget_seconds"  # fmt: skip
                assert set(values(prometheus, over)) == {"slow"}
                assert values(prometheus, "edgeship_agent_errors_total") == {"edgeship-agent": 1}
                agent_p95 = values(
                    prometheus,
                    "histogram_quantile(0.95, edgeship_agent_request_duration_seconds_bucket)",
                )["edgeship-agent"]
                assert 0.0025 <= agent_p95 <= 0.005
                # The rules load and evaluate against these metrics: "slow" is over budget.
                prometheus.wait(
                    lambda: values(prometheus, 'ALERTS{alertname="EdgeshipLatencyOverBudget"}'),
                    "evaluating the latency alert",
                )
        finally:
            fast.stop()
            slow.stop()
