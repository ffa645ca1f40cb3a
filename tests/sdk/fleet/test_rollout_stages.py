"""Rollouts of a named model with a shadow stage or an A/B split: the CLI in-process, a
real mosquitto, a real SQLite store (and a real collector writing the per-version
telemetry into it), and hand-made devices that speak the issue-14 messages
(tests/sdk/fleet/_model_device.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.messages.desired import Split
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import publish_many
from sdk.cli import main
from sdk.fleet._ab import SplitPlan
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.collect import Collector
from sdk.fleet.publish import BundleRef, bundle_ref, desired_payload, publish_desired
from sdk.fleet.rollout import DeviceProgress, Rollout, RolloutPlan, SplitState, wave_order
from sdk.fleet.store import SqliteStore
from tests.sdk.fleet._model_device import REJECTION, SERVING, ModelDevice, Window
from tests.sdk.fleet._rollouts import Served, rollout_argv, serve_bundle, status, wait_record
from tests.support.broker import Broker

pytestmark = pytest.mark.integration

DEVICES = ["m0", "m1", "m2"]
OCR = "ocr"
FIRST = wave_order("r1", tuple(DEVICES))[0]  # waves 20%,100%: one device, then the rest


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


def start(broker: Broker, model: str = OCR, **kwargs: Any) -> dict[str, ModelDevice]:
    return {d: ModelDevice(broker, "f", d, model, **kwargs).start() for d in DEVICES}


def stop(devices: dict[str, ModelDevice]) -> None:
    for d in devices.values():
        d.stop()


def argv(broker: Broker, served: Served, db: str, *extra: str, rid: str = "r1") -> list[str]:
    return rollout_argv(broker, served, db, DEVICES, "--model", OCR, *extra, rid=rid)


def run_in_thread(args: list[str]) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(main(args)))
    thread.start()
    return thread, code


def test_a_shadow_wave_waits_for_the_devices_verdicts_then_advances(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker)  # no verdict until told
    try:
        thread, code = run_in_thread(
            argv(broker, served, db, "--shadow", "--shadow-min-samples", "50")
        )
        wait_record(db, lambda r: r.acked_wave == 0)
        time.sleep(1.5)  # shadowing: no verdict, so no commit and no second wave
        waiting = wait_record(db, lambda r: True)
        assert (waiting.status, waiting.wave, list(waiting.progress)) == ("running", 0, [FIRST])
        assert [d for d, dev in fleet.items() if dev.desired_seen] == [FIRST]
        (desired,) = fleet[FIRST].desired_seen
        assert (desired["model"], desired["shadow"]["min_samples"]) == (OCR, 50)
        for dev in fleet.values():
            dev.verdict("promote")
        thread.join(30)
    finally:
        stop(fleet)
    assert code == [0]
    doc = status(db, capsys)
    assert (doc["status"], doc["model"]) == ("completed", OCR)
    assert {p["outcome"] for p in doc["progress"].values()} == {"succeeded"}
    kinds = [e["event"] for e in fleet[FIRST].events]
    assert kinds == ["shadow-started", "shadow-passed", "activated", "committed"]


def test_a_shadow_rejection_halts_the_rollout_with_the_devices_numbers(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, shadow_verdict="reject")
    try:
        # A failure rate that one failed device would stay under: a rejection halts anyway.
        code = main(argv(broker, served, db, "--shadow", "--max-failure-rate", "0.9"))
    finally:
        stop(fleet)
    assert code == 2
    doc = status(db, capsys)
    assert doc["status"] == "halted"
    assert doc["progress"][FIRST]["outcome"] == "rejected"
    reason = doc["progress"][FIRST]["reason"]
    assert reason == (
        f"shadow rejected: {REJECTION['reason']} (80 samples, agreement 62.0%, latency x1.05)"
    )
    assert doc["reason"] == f"the candidate was rejected on {FIRST}: {reason}"
    assert [d for d, dev in fleet.items() if dev.desired_seen] == [FIRST]


def serving_ref(served: Served) -> BundleRef:
    """The version the devices serve, as a desired state names it."""
    return BundleRef(
        url=served.url.replace("digits.edgeship", "digits-1.0.0.edgeship"),
        sha256="11" * 32,
        digest=SERVING["digest"],
        sequence=SERVING["sequence"],
        name=SERVING["name"],
        version=SERVING["version"],
    )


def ab_rollout(
    broker: Broker, served: Served, db: str, fleet: dict[str, ModelDevice], *extra: str
) -> int:
    """Devices told to serve the current version, then an A/B rollout with a collector
    storing their telemetry in ``db``."""
    store = SqliteStore(Path(db))
    client = MqttClient(BrokerConfig(broker.url))
    collector = Collector(client, store, fleet="f")
    collector.start()  # subscribed from the connect on
    client.connect()
    try:
        with MqttClient(BrokerConfig(broker.url)) as publisher:
            publish_desired(publisher, "f", DEVICES, serving_ref(served), model=OCR)
        args = ["--split", "0.2", "--split-min-requests", "100", *extra]
        return main(argv(broker, served, db, *args))
    finally:
        client.stop()
        collector.stop()
        store.close()


def test_an_ab_candidate_as_good_as_serving_is_promoted_wave_by_wave(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, candidate_window=Window(25, errors=0, p95_ms=2.1))
    try:
        code = ab_rollout(broker, served, db, fleet)
    finally:
        stop(fleet)
    assert code == 0
    doc = status(db, capsys)
    assert doc["status"] == "completed"
    digest = doc["bundle"]["digest"]
    for device, p in doc["progress"].items():
        assert (p["outcome"], p["split"]["stage"]) == ("succeeded", "promoted"), device
        assert p["split"]["serving"]["digest"] == SERVING["digest"]
        assert "candidate 1" in p["split"]["verdict"]
        seen = fleet[device].desired_seen
        # the current version, the split, then the same bundle without it
        assert [(d["bundle"]["digest"], d.get("split")) for d in seen] == [
            (SERVING["digest"], None),
            (digest, {"share": 0.2}),
            (digest, None),
        ]
    assert [e["event"] for e in fleet[FIRST].events] == [
        "split-started", "split-ended", "activated", "committed",
    ]  # fmt: skip


def test_an_ab_candidate_with_more_errors_is_dropped_and_the_rollout_halts(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = start(broker, candidate_window=Window(25, errors=5, p95_ms=2.0))
    try:
        code = ab_rollout(broker, served, db, fleet)
        dropped = fleet[FIRST]
        deadline = time.monotonic() + 10
        while dropped.split is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop(fleet)
    assert code == 2
    doc = status(db, capsys)
    p = doc["progress"][FIRST]
    assert (doc["status"], p["outcome"], p["split"]["stage"]) == ("halted", "rejected", "dropped")
    assert p["reason"].startswith("A/B rejected: error rate 20.00% > 1.00% (candidate ")
    assert doc["reason"] == f"the candidate was rejected on {FIRST}: {p['reason']}"
    # The device was told to serve what it served before, and went back to it.
    assert [d["bundle"]["digest"] for d in dropped.desired_seen][-1] == SERVING["digest"]
    assert dropped.events[-1]["event"] == "split-ended"
    assert dropped.events[-1]["outcome"] == "dropped"
    assert (dropped.split, dropped.current) == (None, SERVING)
    others = [d for d in DEVICES if d != FIRST]
    assert all(len(fleet[d].desired_seen) == 1 for d in others)  # only the pre-rollout state


def test_rollouts_of_two_models_run_at_once_on_the_same_devices(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    default, ocr = start(broker, "default"), start(broker, OCR)
    try:
        runs = [
            run_in_thread(rollout_argv(broker, served, db, DEVICES, rid="r1")),
            run_in_thread(rollout_argv(broker, served, db, DEVICES, "--model", OCR, rid="r2")),
        ]
        for thread, _ in runs:
            thread.join(60)
    finally:
        stop(default)
        stop(ocr)
    assert [code for _, code in runs] == [[0], [0]]
    assert (status(db, capsys, "r1")["model"], status(db, capsys, "r2")["model"]) == (
        "default", OCR,
    )  # fmt: skip
    for devices, rollout in ((default, "r1"), (ocr, "r2")):
        for dev in devices.values():
            assert [d["rollout"] for d in dev.desired_seen] == [rollout]
            assert dev.current is not None
            assert dev.current["sequence"] == 7


def test_a_recorded_ab_decision_is_published_by_the_runner_that_resumes(
    broker: Broker, served: Served, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A runner recorded the promotion of the first device, then died before publishing it:
    # the broker still retains the split.
    ref = bundle_ref(served.bundle, served.url)
    plan = RolloutPlan((1.0,), 0.0, 0.2, wave_timeout_s=20.0, split=SplitPlan(0.2, 100))
    promoted = SplitState("promoted", serving_ref(served), decided_at=time.time(), verdict="ok")
    published = time.time() - 1
    progress = {FIRST: DeviceProgress(FIRST, 0, published, split=promoted)}
    rollout = Rollout("r1", "f", ref, (FIRST,), plan, published, model=OCR)
    store = SqliteStore(Path(db))
    with RolloutRecords(store).create(rollout) as runner:
        runner.save(replace(rollout, wave=0, acked_wave=0, progress=progress))
    store.close()
    fleet = start(broker)
    try:
        split = desired_payload("f", FIRST, ref, rollout="r1", ts=published, model=OCR,
                                split=Split(0.2))  # fmt: skip
        with MqttClient(BrokerConfig(broker.url)) as publisher:
            publish_many(publisher, [(Topics("f", FIRST).desired_for(OCR), split)], retain=True)
        resume = ["rollout", "resume", "r1", "--db", db, "--broker", str(broker.url),
                  "--skip-preflight", "--poll", "0.05"]  # fmt: skip
        code = main(resume)
    finally:
        stop(fleet)
    assert code == 0
    assert status(db, capsys)["progress"][FIRST]["outcome"] == "succeeded"
    seen = [(d["bundle"]["digest"], d.get("split")) for d in fleet[FIRST].desired_seen]
    assert seen == [(ref.digest, {"share": 0.2}), (ref.digest, None)]
