"""A rollout wave is published pipelined: every device's desired state, acknowledged."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import PUBLISH_WINDOW
from sdk.fleet._rollout_run import RolloutFiles, revert, run_rollout
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import Rollout, RolloutPlan, wave_order
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.integration

BUNDLE = BundleRef(
    url="http://127.0.0.1:8000/digits.edgeship",
    sha256="ab" * 32,
    digest="cd" * 32,
    sequence=2,
    name="digits",
    version="2.0.0",
)


def test_a_wave_larger_than_the_window_is_published_to_every_device_and_reverted(
    broker: Broker, tmp_path: Path
) -> None:
    devices = [f"d{i:03}" for i in range(2 * PUBLISH_WINDOW + 50)]
    rollout = Rollout(
        id="big",
        fleet="f",
        bundle=BUNDLE,
        devices=wave_order("big", tuple(devices)),
        plan=RolloutPlan(waves=(1.0,), max_failure_rate=0.1, min_healthy_s=0.0),
        created_at=time.time(),
    )
    files = RolloutFiles(tmp_path / "rollouts")
    client = MqttClient(BrokerConfig(broker.url))
    client.connect()
    stop = threading.Event()
    # No device answers: the runner publishes the one wave, then waits for reports.
    runner = threading.Thread(
        target=run_rollout, args=(client, files, rollout), kwargs={"poll_s": 0.05, "stop": stop}
    )
    runner.start()
    try:
        with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
            assert sub.wait_for(lambda m: len({x.topic for x in m}) == len(devices))
            got = {m.topic.split("/")[3]: json.loads(m.payload) for m in sub.snapshot()}
        assert sorted(got) == devices
        assert {d: m["device"] for d, m in got.items()} == {d: d for d in devices}
        assert {m["rollout"] for m in got.values()} == {"big"}
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    saved = files.load("big")
    assert sorted(saved.progress) == devices  # recorded before it was published
    try:
        assert revert(client, saved) == devices
    finally:
        client.stop()
    # No previous desired state: reverting clears every retained one.
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
        time.sleep(0.3)
        assert sub.snapshot() == []
