"""Rollouts end to end: the CLI, a real mosquitto, a served bundle, simulated devices."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.cli import main
from sdk.fleet.publish import bundle_ref
from sdk.fleet.rollout import wave_order
from tests.sdk.fleet._rollouts import (
    Served,
    desired_counts,
    devices,
    rollout_argv,
    serve_bundle,
    status,
    wait_record,
)
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.integration

DEVICES = [f"dev{i:02}" for i in range(10)]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


def second_wave(n_failing: int) -> list[str]:
    order = wave_order("r1", tuple(sorted(DEVICES)))
    return list(order[2 : 2 + n_failing])  # the first wave (20%) is order[:2]


def start(broker: Broker, served: Served, failing: list[str]) -> list:  # type: ignore[type-arg]
    digest = bundle_ref(served.bundle, served.url).digest
    ok = [d for d in DEVICES if d not in failing]
    return devices(broker, ok) + devices(broker, failing, fail_digests=[digest])


def test_a_rollout_advances_wave_by_wave_to_every_device(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, served, failing=second_wave(2))
    try:
        with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
            code = main(rollout_argv(broker, served, db, DEVICES, "--max-failure-rate", "0.3"))
            sent = desired_counts(sub)
    finally:
        for d in fleet:
            d.stop()
    assert code == 0
    out = capsys.readouterr().out
    assert "preflight:" in out
    assert out.index("publish") < out.index("complete")
    doc = status(db, capsys)
    assert doc["status"] == "completed"
    outcomes = [p["outcome"] for p in doc["progress"].values()]
    assert (outcomes.count("succeeded"), outcomes.count("failed")) == (8, 2)
    first = [d for d, p in doc["progress"].items() if p["wave"] == 0]
    assert sorted(first) == sorted(wave_order("r1", tuple(sorted(DEVICES)))[:2])
    assert sent == dict.fromkeys(DEVICES, 1)


def test_a_rollout_halts_when_failures_pass_the_threshold_and_reverts(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, served, failing=second_wave(4))
    try:
        argv = rollout_argv(
            broker, served, db, DEVICES, "--max-failure-rate", "0.3", "--revert-on-halt"
        )
        code = main(argv)
        with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
            sub.wait_for(lambda m: False, timeout_s=0.5)  # retained messages only
            retained = [m for m in sub.snapshot() if m.payload]
    finally:
        for d in fleet:
            d.stop()
    assert code == 2
    doc = status(db, capsys)
    assert (doc["status"], doc["revert"]) == ("halted", "done")
    assert "4 of 10" in doc["reason"]
    failed = {d: p["reason"] for d, p in doc["progress"].items() if p["outcome"] == "failed"}
    assert failed == dict.fromkeys(second_wave(4), "rolled back: health check failed")
    assert retained == []  # no device had a desired state before: reverting clears it


def test_a_halted_rollout_cannot_resume_but_its_status_survives_the_cli(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, served, failing=list(DEVICES))
    try:
        assert main(rollout_argv(broker, served, db, DEVICES)) == 2
    finally:
        for d in fleet:
            d.stop()
    doc = status(db, capsys)
    assert doc["status"] == "halted"
    assert doc["runner"]["holder"] is None
    assert main(["rollout", "resume", "r1", "--db", db, "--skip-preflight"]) == 1
    assert "halted" in capsys.readouterr().err


def test_an_abort_from_another_cli_stops_a_running_rollout(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = devices(broker, DEVICES, silent=True)  # nobody answers: it would wait out the timeout
    try:
        result: list[int] = []
        argv = rollout_argv(broker, served, db, DEVICES)
        runner = threading.Thread(target=lambda: result.append(main(argv)))
        runner.start()
        wait_record(db, lambda r: r.acked_wave == 0)
        assert main(["rollout", "abort", "r1", "--db", db]) == 0
        runner.join(10)
    finally:
        for d in fleet:
            d.stop()
    assert result == [3]
    assert status(db, capsys)["status"] == "aborted"


def test_the_list_shows_every_rollout_of_the_store(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, served, failing=[])
    try:
        assert main(rollout_argv(broker, served, db, DEVICES)) == 0
    finally:
        for d in fleet:
            d.stop()
    capsys.readouterr()
    assert main(["rollout", "list", "--db", db, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["status"], r["counts"]["succeeded"]) for r in rows] == [
        ("r1", "completed", 10)
    ]
