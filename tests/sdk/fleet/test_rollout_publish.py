"""A rollout wave is published pipelined: every device's desired state, acknowledged;
a revert the same way."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import PUBLISH_WINDOW
from sdk.fleet._rollout_run import FleetWatcher, finish_pending, run_rollout
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import Rollout, RolloutPlan, wave_order
from sdk.fleet.store import open_store
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
    store = open_store(str(tmp_path / "fleet.sqlite"))
    records = RolloutRecords(store)
    client = MqttClient(BrokerConfig(broker.url))
    client.connect()
    stop = threading.Event()
    try:
        with records.create(rollout) as runner:
            # No device answers: the runner publishes the one wave, then waits for reports.
            thread = threading.Thread(
                target=run_rollout,
                args=(client, runner, rollout),
                kwargs={"poll_s": 0.05, "stop": stop},
            )
            thread.start()
            with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
                assert sub.wait_for(lambda m: len({x.topic for x in m}) == len(devices))
                got = {m.topic.split("/")[3]: json.loads(m.payload) for m in sub.snapshot()}
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert sorted(got) == devices
        assert {d: m["device"] for d, m in got.items()} == {d: d for d in devices}
        assert {m["rollout"] for m in got.values()} == {"big"}
        saved = records.load("big")[0]
        assert sorted(saved.progress) == devices  # recorded before it was published
        assert saved.acked_wave == 0  # and then recorded as acknowledged
        records.abort("big", "test", revert=True)
        with records.take_over("big") as runner:
            watcher = FleetWatcher(client, "f")
            watcher.settle()
            assert finish_pending(client, runner, watcher, runner.rollout).revert == "done"
    finally:
        client.stop()
        store.close()
    # No previous desired state: reverting clears every retained one.
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
        time.sleep(0.3)
        assert sub.snapshot() == []
