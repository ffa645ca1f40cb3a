"""/metrics on the agent's HTTP endpoint: opt-in, behind the same token as predictions."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.config import parse_config
from agent.serve._model import Model
from agent.serve.http import HttpServer
from agent.telemetry._exposition import exposition
from agent.telemetry._metrics import Metrics
from tests.agent.serve.test_http import AUTH, _config, _request, model  # noqa: F401 - fixture


def test_metrics_are_not_served_unless_enabled(model: Model) -> None:  # noqa: F811
    with HttpServer(model, _config(), metrics_text=lambda: b"x 1\n") as server:
        status, _, _ = _request(server, "GET", "/metrics", headers=AUTH)
    assert status == 404


def test_metrics_need_the_token_like_predictions(model: Model) -> None:  # noqa: F811
    with HttpServer(model, _config(metrics=True), metrics_text=lambda: b"x 1\n") as server:
        status, headers, _ = _request(server, "GET", "/metrics")
    assert status == 401
    assert "WWW-Authenticate" in headers


def test_enabled_metrics_answer_the_exposition_text(model: Model) -> None:  # noqa: F811
    metrics = Metrics()
    metrics.record(0.001)
    with HttpServer(
        model, _config(metrics=True), metrics_text=lambda: exposition(metrics)
    ) as server:
        status, headers, body = _request(server, "GET", "/metrics", headers=AUTH)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "edgeship_agent_requests" in families


def test_the_metrics_setting_is_read_from_the_http_table(tmp_path: Path) -> None:
    (tmp_path / "trust.toml").write_text("")
    text = (
        'device_id = "d1"\nstate_dir = "state"\ntrust_policy = "trust.toml"\n'
        "[http]\nenabled = true\nmetrics = true\n"
    )
    assert parse_config(text, base_dir=tmp_path).http.metrics
