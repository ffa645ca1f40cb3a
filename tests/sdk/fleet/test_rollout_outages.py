"""A running rollout across a broker restart and a PostgreSQL restart.

The runner is a real ``edgeship rollout`` process; ten simulated devices (which reconnect
as agents do) answer. The outage lands while the second wave installs: the runner must
ride it out, not exit, and finish with each device sent its desired state once, counted
by the broker itself (its debug log names every PUBLISH it received, with the sender and
the DUP flag), not by a subscriber, whose QoS 1 session may rightly see a message twice
across a restart.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdk.errors import StoreUnavailableError
from sdk.fleet._rollout_run import _Outage
from sdk.fleet.rollout import wave_order
from tests.sdk.fleet._rollouts import (
    Served,
    devices,
    rollout_argv,
    serve_bundle,
    spawn,
    wait_record,
)
from tests.support.broker import Broker
from tests.support.postgres import PgServer, create_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = [f"dev{i:02}" for i in range(10)]
ORDER = wave_order("r1", tuple(DEVICES))
# mosquitto 2.0: "Received PUBLISH from CLIENT (d0, q1, r1, m3, 'TOPIC', ... (N bytes))"
_RECEIVED = re.compile(
    r"Received PUBLISH from \S+ \(d(\d), q\d, r\d, m\d+, '([^']+)',.*\((\d+) bytes\)\)"
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


@pytest.fixture
def logged_broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory(extra_config="log_type debug\n")


def desired_published(broker: Broker) -> Counter[str]:
    """Desired states (not clears, not a client's DUP resend) the broker received, by device."""
    counts: Counter[str] = Counter()
    for line in broker.log().splitlines():
        m = _RECEIVED.search(line)
        if m and m[1] == "0" and m[2].endswith("/desired") and int(m[3]) > 0:
            counts[m[2].split("/")[3]] += 1
    return counts


def run_through(broker: Broker, served: Served, db: str, outage: Callable[[], None]) -> str:
    """Roll out to the devices (2 s of probation each); once the second wave is published,
    ``outage``. Returns the runner's output; asserts the rollout completed, each device
    published to once, in its wave."""
    fleet = devices(broker, DEVICES, probation_s=2.0)
    proc = spawn(rollout_argv(broker, served, db, DEVICES))
    try:
        wait_record(db, lambda r: r.acked_wave == 1)
        outage()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for d in fleet:
            d.stop()
    assert proc.returncode == 0, out
    final = wait_record(db, lambda r: True, timeout_s=1)
    assert (final.status, final.counts()["succeeded"]) == ("completed", 10), out
    assert {d: p.wave for d, p in final.progress.items()} == {
        d: 0 if d in ORDER[:2] else 1 for d in DEVICES
    }
    assert desired_published(broker) == dict.fromkeys(DEVICES, 1)
    return out


def test_a_broker_restart_mid_wave_is_ridden_out_and_each_device_is_sent_once(
    logged_broker: Broker, served: Served, tmp_path: Path
) -> None:
    run_through(logged_broker, served, str(tmp_path / "fleet.sqlite"), logged_broker.restart)
    # It did restart while the devices ran: each connected twice.
    assert logged_broker.log().count(" as edgeship-f-dev00 ") == 2


def test_a_postgres_restart_mid_wave_is_ridden_out_and_each_device_is_sent_once(
    logged_broker: Broker, served: Served, pg_factory: Callable[[], PgServer]
) -> None:
    server = pg_factory()
    db = create_database(server.url)

    def restart() -> None:
        server.stop("fast")  # ends every session, as a restart of the database does
        time.sleep(1.0)
        server.start()

    out = run_through(logged_broker, served, db, restart)
    # The outage reached the runner while it was running, and it said so both ways.
    assert "the store is out" in out
    assert re.search(r"the store is back after \d+\.\d s", out), out


class _Flaky:
    """A runner whose store answers after ``outages`` failed reloads."""

    def __init__(self, outages: int) -> None:
        self.rollout = SimpleNamespace(id="r1")
        self.outages = outages
        self.reloads = 0

    def reload(self) -> str:
        self.reloads += 1
        if self.reloads <= self.outages:
            raise StoreUnavailableError(f"out ({self.reloads})")
        return "as stored"


def test_an_outage_is_waited_out_until_the_store_answers_and_the_record_is_reloaded() -> None:
    runner = _Flaky(outages=3)
    outage = _Outage(runner, threading.Event())  # type: ignore[arg-type]
    assert outage.ride_out(StoreUnavailableError("out")) == "as stored"
    assert runner.reloads == 4


def test_a_runner_stopped_during_an_outage_raises_the_last_error() -> None:
    stop = threading.Event()
    stop.set()
    outage = _Outage(_Flaky(outages=10**6), stop)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailableError, match=r"^out$"):
        outage.ride_out(StoreUnavailableError("out"))
