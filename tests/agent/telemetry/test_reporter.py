"""Reporter logic without a broker: message shapes and the updater adapter."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.telemetry import Metrics, Outbox, Reporter


@pytest.fixture
def reporter(tmp_path: Path) -> Iterator[Reporter]:
    # Never started: no thread, no connection; messages stay in the outbox.
    transport = MqttClient(BrokerConfig(BrokerUrl("127.0.0.1", 1, tls=False)))
    outbox = Outbox(tmp_path / "o.db")
    yield Reporter(Topics("f", "d1"), outbox, transport, metrics=Metrics())
    # Closed as the daemon closes it: Python 3.13 warns of a database left to the collector.
    outbox.close()


def _stored(reporter: Reporter) -> list[dict]:
    return [json.loads(r.payload) for r in reporter.outbox.pending(limit=100)]


def test_an_event_carries_version_device_seq_ts_and_its_fields(reporter: Reporter) -> None:
    seq = reporter.emit_event("rolled-back", reason="p95 over budget", digest="ab" * 32)
    (doc,) = _stored(reporter)
    assert doc["seq"] == seq
    assert (doc["v"], doc["fleet"], doc["device"], doc["event"]) == (1, "f", "d1", "rolled-back")
    assert doc["reason"] == "p95 over budget"
    assert isinstance(doc["ts"], float)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [("Rolled Back", {}), ("", {}), ("activated", {"seq": 3}), ("activated", {"x": float("nan")})],
)
def test_invalid_events_are_refused(reporter: Reporter, kind: str, fields: dict) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        reporter.emit_event(kind, **fields)
    assert _stored(reporter) == []


def test_the_updater_sink_never_raises_and_reports_the_bad_event(reporter: Reporter) -> None:
    reporter.event_sink("activated", {"ts": "mine"})
    (doc,) = _stored(reporter)
    assert doc["event"] == "invalid-event"
    assert doc["kind"] == "activated"


def test_the_updater_sink_forwards_good_events(reporter: Reporter) -> None:
    reporter.event_sink("verified", {"digest": "00", "sequence": 4})
    (doc,) = _stored(reporter)
    assert (doc["event"], doc["sequence"]) == ("verified", 4)


def test_a_telemetry_message_snapshots_metrics_and_the_outbox(reporter: Reporter) -> None:
    reporter.metrics.record(0.003, None)
    reporter.metrics.record(0.005, "timeout")
    reporter.emit_event("activated")
    reporter.report_now()
    doc = _stored(reporter)[-1]
    assert doc["metrics"]["requests"] == 2
    assert doc["metrics"]["errors"] == {"timeout": 1}
    assert doc["outbox"]["rows"] == 1  # the event waiting before it
    assert doc["dropped"]["capacity"] == 0
    assert doc["drift"] is None


def test_state_is_kept_as_the_latest_retained_payload(reporter: Reporter) -> None:
    reporter.set_state({"current": "a"})
    reporter.set_state({"current": "b"})
    (payload,) = reporter.outbox.retained().values()
    assert json.loads(payload)["current"] == "b"
    with pytest.raises(ValueError):  # noqa: PT011
        reporter.set_state({"v": 2})
