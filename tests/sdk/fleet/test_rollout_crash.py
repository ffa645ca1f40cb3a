"""The rollout runner killed -9 at each phase, then resumed from another process.

The runner is a real ``edgeship rollout`` process, stopped by the fault seam
(``EDGESHIP_CRASH_AT``, :data:`sdk.fleet._rollout_run.CRASH_POINTS`) or by the test's own
SIGKILL; ``edgeship rollout resume`` runs as another process. Ten simulated devices
answer; a subscriber counts every desired state the broker passed on, so a device
published twice for its wave, or never, fails the test.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk.fleet.publish import bundle_ref
from sdk.fleet.rollout import Rollout, wave_order
from sdk.fleet.store import open_store
from tests.sdk.fleet._rollouts import (
    Served,
    desired_counts,
    devices,
    rollout_argv,
    serve_bundle,
    spawn,
    wait_record,
)
from tests.support.broker import Broker, Subscriber
from tests.support.fake_device import FakeDevice

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = [f"dev{i:02}" for i in range(10)]
ORDER = wave_order("r1", tuple(DEVICES))
RUNNER_TIMEOUT_S = 1.0
EVERY_DEVICE_ONCE = dict.fromkeys(DEVICES, 1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as s:
        yield s


def start_fleet(
    broker: Broker, served: Served, *, failing: tuple[str, ...] = (), probation_s: float = 0.0
) -> list[FakeDevice]:
    digest = bundle_ref(served.bundle, served.url).digest
    ok = [d for d in DEVICES if d not in failing]
    return devices(broker, ok, probation_s=probation_s) + devices(
        broker, list(failing), fail_digests=[digest]
    )


def run_until_killed(argv: list[str], crash_at: str | None = None, **wait: Any) -> None:
    """Start the runner; let the fault seam kill it, or kill it once ``wait`` says so."""
    env = {"EDGESHIP_CRASH_AT": crash_at} if crash_at else None
    proc = spawn([*argv, "--runner-timeout", str(RUNNER_TIMEOUT_S)], env)
    try:
        if crash_at is None:
            wait_record(wait["db"], wait["done"])
            proc.kill()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, out


def resume(broker: Broker, served: Served, db: str) -> tuple[int, str]:
    time.sleep(RUNNER_TIMEOUT_S + 0.2)  # the killed runner's lease runs out
    argv = [
        "rollout", "resume", "r1", "--db", db, "--trust", str(served.trust),
        "--broker", f"mqtt://{broker.host}:{broker.port}", "--poll", "0.05",
    ]  # fmt: skip
    proc = spawn(argv)
    out, _ = proc.communicate(timeout=90)
    return proc.returncode, out


def finish(broker: Broker, served: Served, db: str, fleet: list[FakeDevice]) -> Rollout:
    try:
        code, out = resume(broker, served, db)
    finally:
        for d in fleet:
            d.stop()
    assert code == 0, out
    return wait_record(db, lambda r: r.status == "completed", timeout_s=1)


def completes_with_each_device_sent_once(
    broker: Broker, served: Served, db: str, fleet: list[FakeDevice], sub: Subscriber
) -> Rollout:
    final = finish(broker, served, db, fleet)
    assert final.counts()["succeeded"] == 10
    assert desired_counts(sub) == EVERY_DEVICE_ONCE
    return final


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite")


def test_killed_before_the_first_publish_it_resumes_and_publishes_each_device_once(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = start_fleet(broker, served)
    run_until_killed(rollout_argv(broker, served, db, DEVICES), "rollout-started")
    assert wait_record(db, lambda r: True, timeout_s=1).progress == {}
    assert desired_counts(sub) == {}
    completes_with_each_device_sent_once(broker, served, db, fleet, sub)


def test_killed_between_waves_it_publishes_the_recorded_wave_and_skips_no_device(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = start_fleet(broker, served)
    run_until_killed(rollout_argv(broker, served, db, DEVICES), "rollout-wave-1-recorded")
    stopped = wait_record(db, lambda r: True, timeout_s=1)
    assert (stopped.wave, stopped.acked_wave, len(stopped.progress)) == (1, 0, 10)
    assert desired_counts(sub) == dict.fromkeys(ORDER[:2], 1)  # only the first wave
    completes_with_each_device_sent_once(broker, served, db, fleet, sub)


def test_killed_after_a_wave_was_published_but_not_recorded_it_publishes_none_again(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = start_fleet(broker, served)
    run_until_killed(rollout_argv(broker, served, db, DEVICES), "rollout-wave-1-published")
    stopped = wait_record(db, lambda r: True, timeout_s=1)
    assert (stopped.wave, stopped.acked_wave) == (1, 0)
    sub.wait_for(lambda m: len({x.topic for x in m}) == 10)
    assert desired_counts(sub) == EVERY_DEVICE_ONCE
    completes_with_each_device_sent_once(broker, served, db, fleet, sub)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_killed_mid_wave_it_waits_for_the_same_devices_and_completes(
    broker: Broker,
    served: Served,
    sub: Subscriber,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    db = str(tmp_path / "fleet.sqlite")
    if backend == "postgres":  # the store another host would reach
        db = str(request.getfixturevalue("postgres_url"))
    # Devices stay in probation for 2 s: the kill lands while the second wave installs.
    fleet = start_fleet(broker, served, probation_s=2.0)
    argv = rollout_argv(broker, served, db, DEVICES)
    run_until_killed(argv, db=db, done=lambda r: r.acked_wave == 1)
    stopped = wait_record(db, lambda r: True, timeout_s=1)
    assert stopped.counts()["pending"] > 0
    final = completes_with_each_device_sent_once(broker, served, db, fleet, sub)
    assert {d: p.wave for d, p in final.progress.items()} == {
        d: 0 if d in ORDER[:2] else 1 for d in DEVICES
    }


def test_killed_during_the_revert_it_finishes_the_revert_once(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = start_fleet(broker, served, failing=ORDER[2:6])
    argv = rollout_argv(
        broker, served, db, DEVICES, "--max-failure-rate", "0.3", "--revert-on-halt"
    )
    run_until_killed(argv, "rollout-reverting")
    stopped = wait_record(db, lambda r: True, timeout_s=1)
    assert (stopped.status, stopped.revert) == ("halted", "pending")
    try:
        code, out = resume(broker, served, db)
    finally:
        for d in fleet:
            d.stop()
    assert code == 2, out
    assert wait_record(db, lambda r: True, timeout_s=1).revert == "done"
    clears = [m.topic.split("/")[3] for m in sub.snapshot() if not m.payload]
    assert sorted(clears) == sorted(DEVICES)  # each device cleared once
    assert desired_counts(sub) == EVERY_DEVICE_ONCE


def test_a_second_runner_is_refused_while_the_first_lives_and_takes_over_once_it_is_killed(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = start_fleet(broker, served, probation_s=3.0)
    first = spawn([*rollout_argv(broker, served, db, DEVICES), "--runner-timeout", "1"])
    try:
        wait_record(db, lambda r: r.acked_wave == 0)
        argv = ["rollout", "resume", "r1", "--db", db, "--trust", str(served.trust)]
        refused = spawn([*argv, "--broker", f"mqtt://{broker.host}:{broker.port}"])
        out, _ = refused.communicate(timeout=60)
        assert refused.returncode == 1, out
        assert "is driven by" in out
        assert first.poll() is None  # the first one goes on
        first.kill()
        first.communicate(timeout=30)
        time.sleep(RUNNER_TIMEOUT_S + 0.2)
        status = spawn(["rollout", "status", "r1", "--db", db, "--json"])
        doc = json.loads(status.communicate(timeout=60)[0])
        assert doc["runner"]["alive"] is False
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)
    completes_with_each_device_sent_once(broker, served, db, fleet, sub)


def test_failures_reported_while_no_runner_ran_are_read_back_from_the_collector(
    broker: Broker, served: Served, db: str
) -> None:
    # The simulated devices report a rollback by event only (their state names no time),
    # so only the events a collector stored can tell the resumed runner.
    fleet = start_fleet(broker, served, failing=ORDER[:2])
    url = f"mqtt://{broker.host}:{broker.port}"
    collector = spawn(["collect", "--broker", url, "--db", db, "--fleet", "f", "--duration", "60"])
    try:
        argv = rollout_argv(broker, served, db, DEVICES, "--wave-timeout", "300")
        run_until_killed(argv, "rollout-wave-0-published")
        store = open_store(db)
        try:
            deadline = time.monotonic() + 30
            while len(store.query("SELECT * FROM events WHERE event = 'rolled-back'")) < 2:
                assert time.monotonic() < deadline, "the collector stored no rollback"
                time.sleep(0.1)
        finally:
            store.close()
        code, out = resume(broker, served, db)
    finally:
        collector.terminate()
        collector.communicate(timeout=30)
        for d in fleet:
            d.stop()
    assert code == 2, out
    halted = wait_record(db, lambda r: True, timeout_s=1)
    assert {d: p.reason for d, p in halted.progress.items()} == dict.fromkeys(
        ORDER[:2], "rolled back: health check failed"
    )
