"""Fleet scale benchmark: collector ingest, rollout wall time, broker and collector cost.

    .venv/bin/python bench/fleet.py [--quick] [--devices 300] [--rate 3] [--seconds 10]
                                    [--rollout-devices 500] [--postgres] [--workers 2]
                                    [--outage 2]

A full run takes about 100 s (150 s with ``--postgres``) on 2 cores; ``--quick`` (20
devices for 1 s, 6 s for the fault run, a 20-device rollout with a 0.2 s min healthy
time) about 50 s.

Everything runs on this machine: a private mosquitto on a free loopback port (started
by ``tests.support.broker.Broker`` with ``max_queued_messages`` raised so QoS 1 is never
dropped to a slow subscriber), the simulated devices in ``--workers`` processes, the
collector as the real CLI (``edgeship collect``, a :class:`sdk.fleet.collect.Collector`
over :class:`sdk.fleet.store.SqliteStore` / ``PostgresStore``) in its own process, and a
bare paho MQTT 5 subscriber in another.

1. Ingest. Each simulated device is the agent's real telemetry path: a
   :class:`agent.telemetry.Reporter` with its own :class:`Outbox` (SQLite, one file per
   device) and :class:`MqttClient` (its own connection, birth and last will). Only
   the timer differs: a pacer thread per worker calls ``Reporter.report_now()`` for
   every device at ``--rate`` messages/s, staggered, for ``--seconds`` (the reporter's
   own timer would work the same but could not stop every device at one instant, and
   the count of published messages must be exact). The reporter thread drains the
   outbox through the transport exactly as on a device (window of unacknowledged
   messages, delete on PUBACK). A device thus costs two threads (transport, reporter);
   the workers are processes so that the simulator is not one GIL.
   Device outboxes live on tmpfs (/dev/shm) when there is one: on a real fleet every
   device fsyncs its own flash, and 300 devices fsyncing one shared virtual disk would
   measure that disk, not the fleet side. The collector's database is on the real disk.

   Measured per run, in the same run: messages stored per second by the collector
   (rows in ``telemetry`` over the time from the first publish to the last row's
   ``received_at``) against the bare subscriber's messages per second (over the time to
   its last message); their ratio (target >= 0.8); delivery latency (device ``ts`` to
   stored / received); and the CPU seconds and peak RSS of mosquitto and each collector
   (``/proc/<pid>/stat`` and ``status``). Variants: one collector on SQLite, two
   collectors in one shared-subscription group writing one SQLite file, and with
   ``--postgres`` the same two on a private PostgreSQL (initdb + pg_ctl in a temporary
   directory, ``fsync=off``).

2. Catch-up. The collector is stopped (its broker session kept: ``--client-id`` and
   ``--session-expiry``) while the devices publish, then started again: the broker
   hands it the whole backlog as fast as it can take it. This is the collector's
   ceiling on this machine, against the bare subscriber draining the same backlog the
   same way (the two drain one after the other, so each has both cores). With one
   collector and with two in one shared-subscription group (the broker queued half of
   the backlog for each). The collector's rate is rows over the span of ``received_at``
   (stamped per batch, when it is written), without the first batch's rows, which
   arrived before that span began; the bare subscriber's is messages over the span of
   their arrival times.

3. Faults (needs PostgreSQL; reported as skipped without it). Live ingest as in 1 into
   a private PostgreSQL, one collector with a kept session (``--client-id``), for
   ``max(--seconds, 6)`` seconds: at 25 % of it PostgreSQL is stopped (``-m fast``, every
   session ended, as by a restart) for ``--outage`` seconds; once the collector logged
   that it stores again, at 65 %, it is killed with SIGKILL and started again under the
   same client id. ``lost`` counts what the devices' outboxes had acknowledged by the
   broker (the workers report every ``seq`` they published, and every outbox drained)
   and the database does not hold; ``unexpected`` what it holds beyond that. The ratio
   to the bare subscriber is over the whole run, faults included.

4. Rollout. ``--rollout-devices`` simulated devices (``tests.support.fake_device``:
   the agent's MQTT transport, answering a new desired state with events and a
   retained state, ``committed`` after ``--commit-delay`` seconds), rolled out with
   :func:`sdk.fleet._rollout_run.run_rollout` in waves 1%,10%,50%,100% with a min
   healthy time of 1 s and the CLI's default poll interval (0.5 s). Per wave: when it
   was published, when its last device committed, and when the next wave started.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.stats import percentile
from agent.telemetry import Outbox, Reporter, TelemetryConfig
from bench._machine import machine
from sdk.fleet._rollout_run import run_rollout
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import Decision, Rollout, RolloutPlan, parse_waves, wave_order
from sdk.fleet.store import open_store
from tests.support.broker import MOSQUITTO, Broker
from tests.support.collector import CollectorProcess as CollectProcess
from tests.support.fake_device import FakeDevice
from tests.support.postgres import PgServer, create_database

ROOT = Path(__file__).resolve().parents[1]

# On top of tests.support.broker's settings (max_queued_messages 1000000: the default of
# 1000 drops QoS 1 messages queued for a slow or absent subscriber). 20 unacknowledged
# QoS 1 messages per client is mosquitto's default and what the agent's paho client
# allows itself; written out so that the output says what was measured.
BROKER_EXTRA = "max_inflight_messages 20\nmax_queued_bytes 0\nmax_connections -1\n"
_REPORTED = ("max_", "persistence ", "allow_anonymous")


def start_broker(directory: Path) -> tuple[Broker, int]:
    """A private mosquitto on a free loopback port, and its pid."""
    broker = Broker(directory, extra_config=BROKER_EXTRA)
    broker.start()
    return broker, child_pid("mosquitto")


def broker_settings(broker: Broker) -> list[str]:
    lines = broker.config_file.read_text().splitlines()
    return [line for line in lines if line.startswith(_REPORTED)]


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_MP = mp.get_context("spawn")


# --- process accounting -----------------------------------------------------------------


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and peak / current RSS in MiB of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may contain spaces
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1),
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
    }


def child_pid(name: str) -> int:
    """The pid of this process's child named ``name`` (e.g. the broker)."""
    me = os.getpid()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == me and comm == name:
            return int(stat.split("/")[2])
    raise RuntimeError(f"no child process named {name}")


def self_usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
    }


def _ms(latencies_s: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile in milliseconds; None without latencies."""
    return round(percentile(latencies_s, q) * 1e3, 1) if latencies_s else None


# --- simulated devices (worker processes) ----------------------------------------------------


def _connect_all(transports: list[MqttClient], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for t in transports:
        if not t.wait_connected(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"a simulated device could not connect: {t.last_error}")


def _in_parallel(fn: Any, items: list[Any]) -> None:
    """Stopping a transport takes up to ~0.3 s (its loop ticks); do many at once."""
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(fn, items))


def telemetry_worker(
    conn: Connection,
    host: str,
    port: int,
    fleet: str,
    names: list[str],
    rate_hz: float,
    seconds: float,
    state_dir: str,
) -> None:
    """Devices with the agent's Reporter + Outbox + MqttClient; one pacer thread.

    Protocol on ``conn``: sends "ready"; receives the wall-clock start time; publishes;
    sends a result dict once every device's outbox is empty (all PUBACKed); receives
    "stop"; sends the final usage.
    """
    devices = []
    for name in names:
        outbox = Outbox(Path(state_dir) / f"{name}.db")
        transport = MqttClient(
            BrokerConfig(
                BrokerUrl(host, port, tls=False), backoff_initial_s=0.2, backoff_max_s=2.0
            ),
            presence=device_presence(Topics(fleet, name)),
        )
        reporter = Reporter(
            Topics(fleet, name), outbox, transport, config=TelemetryConfig(interval_s=3600.0)
        )
        devices.append((outbox, transport, reporter))
    for _, transport, reporter in devices:
        transport.start()
        reporter.start()
    _connect_all([t for _, t, _ in devices], 60.0)
    conn.send("ready")
    start_at: float = conn.recv()

    published, late_max, n = 0, 0.0, len(devices)
    keys: list[tuple[str, int]] = []
    ticks = round(rate_hz * seconds)
    for k in range(ticks):
        for i, (_, _, reporter) in enumerate(devices):
            due = start_at + (k + i / n) / rate_hz
            wait = due - time.time()
            if wait > 0.001:
                time.sleep(wait)
            else:
                late_max = max(late_max, -wait)
            for _ in range(10):  # a few inferences, so the message carries percentiles
                reporter.metrics.record(0.002, None)
            seq = reporter.report_now()
            if seq is not None:
                published += 1
                keys.append((names[i], seq))
    publish_end = time.time()
    flushed = all(r.flush(max(1.0, seconds * 2)) for _, _, r in devices)
    conn.send(
        {
            "published": published,
            "publish_end": publish_end,
            "flushed_at": time.time(),
            "all_acked": flushed,
            "pacer_late_max_s": round(late_max, 3),
            "dropped": sum(o.stats().dropped_capacity for o, _, _ in devices),
            "threads": threading.active_count(),
            # Acknowledged by the broker, once every outbox is empty (all_acked).
            "keys": keys,
        }
    )
    conn.recv()

    def stop(device: tuple[Outbox, MqttClient, Reporter]) -> None:
        outbox, transport, reporter = device
        reporter.stop()
        transport.stop(timeout_s=1.0)
        outbox.close()

    _in_parallel(stop, devices)
    conn.send(self_usage())


def rollout_worker(
    conn: Connection, host: str, port: int, fleet: str, names: list[str], delay_s: float
) -> None:
    """Fake devices (tests.support.fake_device) that commit ``delay_s`` after a desired state."""
    devices = [FakeDevice(host, port, fleet, n, probation_s=delay_s) for n in names]
    for d in devices:
        d.transport.start()
    _connect_all([d.transport for d in devices], 60.0)
    conn.send("ready")
    conn.recv()
    _in_parallel(lambda d: d.transport.stop(timeout_s=1.0), devices)
    conn.send(self_usage())


class Workers:
    """Worker processes, each running ``target`` on a slice of the devices."""

    def __init__(self, target: Any, names: list[str], workers: int, *args: Any) -> None:
        self.conns: list[Connection] = []
        self.procs = []
        for w in range(workers):
            parent, child = _MP.Pipe()
            proc = _MP.Process(
                target=target,
                args=(child, *args[:3], names[w::workers], *args[3:]),
                daemon=True,
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def gather(self, timeout_s: float) -> list[Any]:
        out = []
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if not conn.poll(timeout_s):
                raise RuntimeError(f"worker {proc.pid} did not answer within {timeout_s}s")
            out.append(conn.recv())
        return out

    def send(self, value: Any) -> None:
        for conn in self.conns:
            conn.send(value)

    def close(self) -> list[Any]:
        """Stop the devices; the workers' own CPU and peak RSS."""
        try:
            self.send("stop")
            usage = self.gather(60.0)
        finally:
            for proc in self.procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return usage


# --- the bare subscriber (its own process) ----------------------------------------------------


def bare_worker(
    conn: Connection, host: str, port: int, topic_filter: str, client_id: str, persistent: bool
) -> None:
    """A paho MQTT 5 subscriber that only timestamps and keeps what arrives.

    Commands on ``conn``: "count" -> number received; "pause" -> disconnect (a
    persistent session keeps queueing); "resume" -> reconnect; "stop" -> a result dict.
    """
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415 - only in this process
    from paho.mqtt.properties import Properties  # noqa: PLC0415 - only in this process

    got: list[tuple[float, bytes | bytearray]] = []
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)

    def on_connect(c: paho.Client, _u: object, flags: Any, _rc: object, _p: object) -> None:
        if not flags.session_present:
            c.subscribe(topic_filter, qos=1)
        else:
            subscribed.set()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        got.append((time.time(), msg.payload))

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message

    def connect() -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600 if persistent else 0
        subscribed.clear()
        client.connect(host, port, 30, clean_start=not persistent, properties=props)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("bare subscriber could not subscribe")

    connect()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "count":
            conn.send(len(got))
        elif cmd == "pause":
            client.disconnect()
            client.loop_stop()
            conn.send("paused")
        elif cmd == "resume":
            got.clear()
            connect()
            conn.send("resumed")
        else:
            break
    client.disconnect()
    client.loop_stop()
    keys, latencies = set(), []
    for at, payload in got:
        doc = json.loads(payload)
        keys.add((doc["device"], doc["seq"]))
        latencies.append(at - doc["ts"])
    conn.send(
        {
            "received": len(got),
            "distinct": len(keys),
            "first_at": got[0][0] if got else None,
            "last_at": got[-1][0] if got else None,
            "latency_p50_ms": _ms(latencies, 0.5),
            "latency_p99_ms": _ms(latencies, 0.99),
            **self_usage(),
        }
    )


class Bare:
    def __init__(self, broker: Broker, fleet: str, *, client_id: str, persistent: bool) -> None:
        self.conn, child = _MP.Pipe()
        topic_filter = f"edgeship/v1/{fleet}/+/telemetry"
        self.proc = _MP.Process(
            target=bare_worker,
            args=(child, broker.host, broker.port, topic_filter, client_id, persistent),
            daemon=True,
        )
        self.proc.start()
        self._ask(None, 30)

    def _ask(self, cmd: str | None, timeout_s: float = 30.0) -> Any:
        if cmd is not None:
            self.conn.send(cmd)
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"bare subscriber did not answer {cmd!r}")
        return self.conn.recv()

    def count(self) -> int:
        return int(self._ask("count"))

    def pause(self) -> None:
        self._ask("pause")

    def resume(self) -> None:
        self._ask("resume")

    def stop(self) -> dict[str, Any]:
        result: dict[str, Any] = self._ask("stop", 120)
        self.proc.join(10)
        return result


# --- collectors (the real CLI, one process each) ---------------------------------------------


class CollectorProcess:
    """``edgeship collect`` in a subprocess; ready once the broker logged its subscription."""

    def __init__(
        self, broker: Broker, fleet: str, db: str, client_id: str, *, session_expiry_s: int = 0
    ) -> None:
        self.broker, self.client_id = broker, client_id
        argv = [
            sys.executable,
            "-c",
            "import sys; from sdk.cli import main; sys.exit(main())",
            "collect",
            "--broker",
            f"mqtt://{broker.host}:{broker.port}",
            "--fleet",
            fleet,
            "--db",
            db,
            "--group",
            "bench",
            "--client-id",
            client_id,
            "--session-expiry",
            str(session_expiry_s),
            "--json",
        ]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._marker = f"{client_id} 1 $share/bench/edgeship/v1/{fleet}/+/telemetry"
        self._seen = broker.log().count(self._marker)

    @classmethod
    def start(
        cls, broker: Broker, fleet: str, db: str, ids: list[str], *, session_expiry_s: int = 0
    ) -> list[CollectorProcess]:
        """Launch one collector per client id at once; return when all have subscribed.

        Raises:
            RuntimeError: a collector exited or did not subscribe within 30 s.
        """
        # The schema is created here first: two collectors creating one new database at
        # the same instant collide (SQLite: "database is locked" from the WAL switch).
        open_store(db).close()
        started = [cls(broker, fleet, db, i, session_expiry_s=session_expiry_s) for i in ids]
        deadline = time.monotonic() + 30
        for c in started:
            while broker.log().count(c._marker) <= c._seen:
                if c.proc.poll() is not None or time.monotonic() > deadline:
                    for other in started:
                        other.proc.kill()
                    raise RuntimeError(f"collector did not subscribe: {c.proc.communicate()[1]}")
                time.sleep(0.05)
        return started

    def usage(self) -> dict[str, float]:
        return proc_usage(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the collector writes what it has and prints its counts."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"collector failed ({self.proc.returncode}): {err}")
        stats: dict[str, Any] = json.loads(out)
        return stats


# --- PostgreSQL ------------------------------------------------------------------------------


@contextmanager
def postgres_server() -> Iterator[PgServer]:
    """A private PostgreSQL (tests/support/postgres.py: ``fsync=off``), restartable.

    Raises:
        RuntimeError: no PostgreSQL binaries or no psycopg.
    """
    try:
        import psycopg  # noqa: F401, PLC0415 - optional, only to check it is there
    except ImportError:
        raise RuntimeError("psycopg 3 is not installed") from None
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# --- 1 and 2: ingest -----------------------------------------------------------------------


class Fleet:
    """A broker with simulated devices connected; one per ingest scenario."""

    def __init__(self, tmp: Path, label: str, args: argparse.Namespace) -> None:
        self.fleet = label
        self.args = args
        self.broker, self.broker_pid = start_broker(tmp / f"broker-{label}")
        shm = Path("/dev/shm")
        self.outboxes = tempfile.mkdtemp(
            prefix=f"edgeship-bench-{label}-", dir=shm if shm.is_dir() else None
        )
        self.names = [f"d{i:04}" for i in range(args.devices)]
        self.workers: Workers | None = None

    def start_devices(self) -> float:
        """Connect every device; the seconds it took."""
        t0 = time.perf_counter()
        b, a = self.broker, self.args
        self.workers = Workers(
            telemetry_worker,
            self.names,
            a.workers,
            b.host,
            b.port,
            self.fleet,
            a.rate,
            a.seconds,
            self.outboxes,
        )
        self.workers.gather(120)
        return time.perf_counter() - t0

    def publish(self, start_at: float | None = None) -> dict[str, Any]:
        """Publish for ``--seconds`` from ``start_at`` (default: in 0.3 s); returns when
        every message was PUBACKed."""
        assert self.workers is not None
        start_at = time.time() + 0.3 if start_at is None else start_at
        self.workers.send(start_at)
        results = self.workers.gather(self.args.seconds * 4 + 60)
        return {
            "start_at": start_at,
            "published": sum(r["published"] for r in results),
            "publish_end": max(r["publish_end"] for r in results),
            "acked_at": max(r["flushed_at"] for r in results),
            "all_acked": all(r["all_acked"] for r in results),
            "pacer_late_max_s": max(r["pacer_late_max_s"] for r in results),
            "outbox_dropped": sum(r["dropped"] for r in results),
            "threads_per_worker": max(r["threads"] for r in results),
            "keys": [tuple(k) for r in results for k in r["keys"]],
        }

    def close(self) -> dict[str, Any]:
        usage = self.workers.close() if self.workers is not None else []
        self.broker.stop()
        shutil.rmtree(self.outboxes, ignore_errors=True)
        return {
            "worker_cpu_s": round(sum(u["cpu_s"] for u in usage), 2),
            "worker_peak_rss_mib": max((u["peak_rss_mib"] for u in usage), default=0.0),
        }


def _stored(db: str, fleet: str) -> dict[str, Any]:
    store = open_store(db)
    try:
        rows = store.query(
            "SELECT COUNT(*) AS n, MIN(received_at) AS first, MAX(received_at) AS last"
            " FROM telemetry WHERE fleet = ?",
            (fleet,),
        )
        # received_at is per batch (the time it was written): the rows of the first batch
        # were received before the span from the first batch to the last one.
        first_batch = store.query(
            "SELECT COUNT(*) AS n FROM telemetry WHERE fleet = ? AND received_at = ?",
            (fleet, rows[0]["first"]),
        )
        lat = store.query("SELECT received_at - ts AS d FROM telemetry WHERE fleet = ?", (fleet,))
    finally:
        store.close()
    latencies = [float(r["d"]) for r in lat]
    return {
        "n": int(rows[0]["n"]),
        "n_first_batch": int(first_batch[0]["n"]),
        "first": rows[0]["first"],
        "last": rows[0]["last"],
        "latency_p50_ms": _ms(latencies, 0.5),
        "latency_p99_ms": _ms(latencies, 0.99),
    }


def _wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def bench_live(
    tmp: Path, label: str, db: str, collectors: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Devices publish at a fixed rate; collectors and the bare subscriber take it live."""
    fleet = Fleet(tmp, label, args)
    running: list[CollectorProcess] = []
    try:
        broker_cpu0 = proc_usage(fleet.broker_pid)["cpu_s"]
        running = CollectorProcess.start(
            fleet.broker, label, db, [f"{label}-c{i}" for i in range(collectors)]
        )
        bare = Bare(fleet.broker, label, client_id=f"{label}-bare", persistent=False)
        connect_s = fleet.start_devices()
        pub = fleet.publish()
        expected = pub["published"]
        bare_done = _wait_for(lambda: bare.count() >= expected, 60)
        stored_done = _wait_for(lambda: _stored(db, label)["n"] >= expected, 60)
        coll_usage = [c.usage() for c in running]
        broker_usage = proc_usage(fleet.broker_pid)
        stats = [c.stop() for c in running]
        running = []
        bare_result = bare.stop()
        stored = _stored(db, label)
    finally:
        for c in running:
            c.proc.kill()
        sim = fleet.close()
    t0 = pub["start_at"]
    bare_rate = bare_result["distinct"] / (bare_result["last_at"] - t0)
    coll_rate = stored["n"] / (stored["last"] - t0)
    return {
        "devices": args.devices,
        "rate_per_device_hz": args.rate,
        "seconds": args.seconds,
        "collectors": collectors,
        "database": "postgresql" if db.startswith("postgresql") else "sqlite",
        "devices_connect_s": round(connect_s, 2),
        "offered_msgs_per_s": round(expected / (pub["publish_end"] - t0), 1),
        "published": expected,
        "all_acked_by_broker": pub["all_acked"],
        "outbox_dropped": pub["outbox_dropped"],
        "pacer_late_max_s": pub["pacer_late_max_s"],
        "bare": {
            "received": bare_result["received"],
            "distinct": bare_result["distinct"],
            "complete": bare_done,
            "msgs_per_s": round(bare_rate, 1),
            "latency_p50_ms": bare_result["latency_p50_ms"],
            "latency_p99_ms": bare_result["latency_p99_ms"],
            "cpu_s": bare_result["cpu_s"],
        },
        "collector": {
            "stored": stored["n"],
            "complete": stored_done,
            "msgs_per_s": round(coll_rate, 1),
            "latency_p50_ms": stored["latency_p50_ms"],
            "latency_p99_ms": stored["latency_p99_ms"],
            "stats": stats,
            "processes": coll_usage,
        },
        "ratio_collector_to_bare": round(coll_rate / bare_rate, 3),
        "broker": {
            "cpu_s": round(broker_usage["cpu_s"] - broker_cpu0, 2),
            "peak_rss_mib": broker_usage["peak_rss_mib"],
        },
        "simulator": sim,
    }


def bench_catchup(
    tmp: Path, label: str, db: str, collectors: int, args: argparse.Namespace
) -> dict[str, Any]:
    """A backlog queued by the broker while the collectors were away, then drained.

    The collectors' sessions are registered first (``--client-id``, ``--session-expiry``),
    so the broker queues their share of the shared subscription while they are stopped.
    The bare subscriber drains its (complete) backlog first, alone, then the collectors.
    """
    fleet = Fleet(tmp, label, args)
    running: list[CollectorProcess] = []
    ids = [f"{label}-c{i}" for i in range(collectors)]
    try:
        for c in CollectorProcess.start(fleet.broker, label, db, ids, session_expiry_s=600):
            c.stop()
        bare = Bare(fleet.broker, label, client_id=f"{label}-bare", persistent=True)
        bare.pause()
        fleet.start_devices()
        pub = fleet.publish()
        expected = pub["published"]
        broker_cpu0 = proc_usage(fleet.broker_pid)["cpu_s"]
        bare.resume()
        bare_done = _wait_for(lambda: bare.count() >= expected, 120)
        bare_result = bare.stop()
        broker_cpu1 = proc_usage(fleet.broker_pid)["cpu_s"]
        drain_started = time.time()
        running = CollectorProcess.start(fleet.broker, label, db, ids, session_expiry_s=600)
        stored_done = _wait_for(lambda: _stored(db, label)["n"] >= expected, 120)
        coll_usage = [c.usage() for c in running]
        broker_usage = proc_usage(fleet.broker_pid)
        stats = [c.stop() for c in running]
        running = []
        stored = _stored(db, label)
    finally:
        for c in running:
            c.proc.kill()
        fleet.close()
    bare_rate = bare_result["distinct"] / (bare_result["last_at"] - bare_result["first_at"])
    if stored["last"] > stored["first"]:
        coll_rate = (stored["n"] - stored["n_first_batch"]) / (stored["last"] - stored["first"])
    else:  # all in one batch (a --quick run): from the collectors' subscription instead
        coll_rate = stored["n"] / max(stored["last"] - drain_started, 1e-3)
    return {
        "backlog_messages": expected,
        "collectors": collectors,
        "database": "postgresql" if db.startswith("postgresql") else "sqlite",
        "bare": {
            "received": bare_result["received"],
            "distinct": bare_result["distinct"],
            "complete": bare_done,
            "msgs_per_s": round(bare_rate, 1),
            "cpu_s": bare_result["cpu_s"],
            "broker_cpu_s": round(broker_cpu1 - broker_cpu0, 2),
        },
        "collector": {
            "stored": stored["n"],
            "complete": stored_done,
            "msgs_per_s": round(coll_rate, 1),
            "stats": stats,
            "processes": coll_usage,
            "broker_cpu_s": round(broker_usage["cpu_s"] - broker_cpu1, 2),
        },
        "ratio_collector_to_bare": round(coll_rate / bare_rate, 3),
        "broker_peak_rss_mib": broker_usage["peak_rss_mib"],
    }


class CommitClock:
    """When each device's ``committed`` event for ``digest`` arrived (a plain subscriber)."""

    def __init__(self, broker: Broker, fleet: str, digest: str) -> None:
        self.at: dict[str, float] = {}
        self.client = MqttClient(BrokerConfig(broker.url))
        self.client.connect()

        def on_event(msg: Any) -> None:
            doc = json.loads(msg.payload)
            if doc.get("event") == "committed" and doc.get("digest") == digest:
                self.at.setdefault(doc["device"], time.time())

        self.client.subscribe(f"edgeship/v1/{fleet}/+/events", on_event)

    def close(self) -> None:
        self.client.stop()


def bench_rollout(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--rollout-devices`` fake devices, waves 1%,10%,50%,100%, min healthy time 1 s."""
    fleet = "ro"
    broker, broker_pid = start_broker(tmp / "broker-rollout")
    names = [f"r{i:04}" for i in range(args.rollout_devices)]
    bundle = BundleRef(
        url="http://127.0.0.1:8000/digits-2.edgeship",
        sha256="ab" * 32,
        digest="cd" * 32,
        sequence=2,
        name="digits",
        version="2.0.0",
    )
    plan = RolloutPlan(
        waves=parse_waves("1%,10%,50%,100%"),
        max_failure_rate=0.05,
        min_healthy_s=args.min_healthy,
        wave_timeout_s=120.0,
    )
    rollout = Rollout(
        id="bench",
        fleet=fleet,
        bundle=bundle,
        devices=wave_order("bench", tuple(names)),
        plan=plan,
        created_at=time.time(),
    )
    decisions: list[tuple[float, Decision, int]] = []
    workers: Workers | None = None
    try:
        t0 = time.perf_counter()
        workers = Workers(
            rollout_worker, names, args.workers, broker.host, broker.port, fleet, args.commit_delay
        )
        workers.gather(120)
        connect_s = time.perf_counter() - t0
        commits = CommitClock(broker, fleet, bundle.digest)
        client = MqttClient(BrokerConfig(broker.url))
        client.connect()
        store = open_store(str(tmp / "rollouts.sqlite"))
        started = time.time()
        try:
            with RolloutRecords(store).create(rollout) as runner:
                final = run_rollout(
                    client,
                    runner,
                    rollout,
                    on_change=lambda r, d: decisions.append((time.time(), d, r.wave)),
                )
        finally:
            client.stop()
            commits.close()
            store.close()
        total_s = time.time() - started
        broker_usage = proc_usage(broker_pid)
    finally:
        sim = workers.close() if workers is not None else []
        broker.stop()
    # A wave starts when the runner decided to publish it (``published_at``, recorded
    # before the first publish) and ends when the next decision is taken.
    starts = [
        (min(final.progress[x].published_at for x in d.devices), d, w, at)
        for at, d, w in decisions
        if d.action == "publish"
    ]
    ends = [s for s, _, _, _ in starts[1:]] + [decisions[-1][0]]
    waves = []
    for (start, d, w, published), end in zip(starts, ends, strict=True):
        committed = [commits.at[x] for x in d.devices if x in commits.at]
        waves.append(
            {
                "wave": w,
                "share": plan.waves[w],
                "new_devices": len(d.devices),
                "published_after_s": round(published - start, 2),
                "all_committed_after_s": (
                    round(max(committed) - start, 2) if len(committed) == len(d.devices) else None
                ),
                "wave_s": round(end - start, 2),
            }
        )
    return {
        "devices": args.rollout_devices,
        "waves": "1%,10%,50%,100%",
        "min_healthy_s": plan.min_healthy_s,
        "commit_delay_s": args.commit_delay,
        "poll_s": 0.5,
        "devices_connect_s": round(connect_s, 2),
        "status": final.status,
        "counts": final.counts(),
        "total_s": round(total_s, 2),
        "per_wave": waves,
        "broker_cpu_s": broker_usage["cpu_s"],
        "broker_peak_rss_mib": broker_usage["peak_rss_mib"],
        "simulator_cpu_s": round(sum(u["cpu_s"] for u in sim), 2),
        "runner_process": self_usage(),
    }


def _stored_keys(db: str, fleet: str) -> set[tuple[str, int]]:
    store = open_store(db)
    try:
        rows = store.query("SELECT device, seq FROM telemetry WHERE fleet = ?", (fleet,))
    finally:
        store.close()
    return {(str(r["device"]), int(r["seq"])) for r in rows}


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


def bench_faults(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Live ingest into PostgreSQL while the database restarts and the collector is killed.

    One collector with a kept broker session (``--client-id``) and the bare subscriber
    take the devices' messages live for ``max(--seconds, 6)`` seconds. At 25 % of that
    PostgreSQL is stopped (``-m fast``: every session is ended, as by a restart) for
    ``--outage`` seconds and started again; at 65 % the collector is killed with SIGKILL
    and started again under the same client id. Lost: what the devices' outboxes had
    acknowledged by the broker and the database does not hold.
    """
    try:
        with postgres_server() as pg:
            return _faults(tmp, pg, args)
    except RuntimeError as e:
        return {"skipped": str(e)}


def _faults(tmp: Path, pg: PgServer, args: argparse.Namespace) -> dict[str, Any]:
    seconds = max(args.seconds, 6.0)
    label, db = "flt", create_database(pg.url)
    fleet = Fleet(tmp, label, argparse.Namespace(**{**vars(args), "seconds": seconds}))
    log = tmp / f"{label}-collect.log"
    options = ("--group", "bench", "--client-id", f"{label}-c0")
    collectors: list[CollectProcess] = []
    at: dict[str, float] = {}

    def inject(start_at: float) -> None:
        _sleep_until(start_at + 0.25 * seconds)
        at["store_stopped_s"] = round(time.time() - start_at, 2)
        pg.stop("fast")
        time.sleep(args.outage)
        pg.start()
        at["store_started_s"] = round(time.time() - start_at, 2)
        # Killed once it has stored again: one fault after the other, each seen alone.
        _wait_for(lambda: "the store is back" in log.read_text(errors="replace"), 30)
        _sleep_until(start_at + 0.65 * seconds)
        collectors[-1].kill()
        at["collector_killed_s"] = round(time.time() - start_at, 2)
        collectors.append(CollectProcess(fleet.broker, db, log, fleet=label, options=options))
        at["collector_back_s"] = round(time.time() - start_at, 2)

    try:
        collectors.append(CollectProcess(fleet.broker, db, log, fleet=label, options=options))
        bare = Bare(fleet.broker, label, client_id=f"{label}-bare", persistent=False)
        fleet.start_devices()
        start_at = time.time() + 0.5
        injector = threading.Thread(target=inject, args=(start_at,))
        injector.start()
        pub = fleet.publish(start_at)
        injector.join()
        expected = set(pub["keys"])
        bare_done = _wait_for(lambda: bare.count() >= len(expected), 60)
        stored_done = _wait_for(lambda: _stored(db, label)["n"] >= len(expected), 120)
        code, stats = collectors[-1].stop()
        bare_result = bare.stop()
        keys, stored = _stored_keys(db, label), _stored(db, label)
    finally:
        for c in collectors:
            if c.proc.poll() is None:
                c.proc.kill()
        fleet.close()
    bare_rate = bare_result["distinct"] / (bare_result["last_at"] - start_at)
    coll_rate = stored["n"] / (stored["last"] - start_at)
    text = log.read_text(errors="replace")
    return {
        "devices": args.devices,
        "rate_per_device_hz": args.rate,
        "seconds": seconds,
        "database": "postgresql",
        "faults": {"store_outage_s": args.outage, **at},
        "published": len(expected),
        "all_acked_by_broker": pub["all_acked"],
        "outbox_dropped": pub["outbox_dropped"],
        "stored": len(keys),
        "lost": len(expected - keys),
        "unexpected": len(keys - expected),
        "bare": {
            "distinct": bare_result["distinct"],
            "complete": bare_done,
            "msgs_per_s": round(bare_rate, 1),
        },
        "collector": {
            "complete": stored_done,
            "msgs_per_s": round(coll_rate, 1),
            "latency_p50_ms": stored["latency_p50_ms"],
            "latency_p99_ms": stored["latency_p99_ms"],
            "exit_code": code,
            "stats_after_restart": stats,
            "outages_logged": text.count("cannot store:"),
            "recoveries_logged": text.count("the store is back"),
        },
        "ratio_collector_to_bare": round(coll_rate / bare_rate, 3),
    }


def bench_postgres(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two collectors on a private PostgreSQL: live ingest and catch-up."""
    try:
        with postgres_server() as pg:
            return {
                "ingest_2_collectors": bench_live(tmp, "pg2", create_database(pg.url), 2, args),
                "catchup_2_collectors": bench_catchup(tmp, "cup", create_database(pg.url), 2, args),
            }
    except RuntimeError as e:
        return {"skipped": str(e)}


def _mosquitto_version() -> str:
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "mosquitto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--rate", type=float, default=3.0, help="messages/s per device")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time")
    parser.add_argument("--workers", type=int, default=2, help="device simulator processes")
    parser.add_argument("--rollout-devices", type=int, default=500)
    parser.add_argument("--commit-delay", type=float, default=0.2, help="fake install time (s)")
    parser.add_argument("--min-healthy", type=float, default=1.0, help="rollout min healthy (s)")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument(
        "--outage", type=float, default=2.0, help="fault run: seconds PostgreSQL is down"
    )
    args = parser.parse_args()
    if args.quick:
        args.devices, args.seconds, args.rollout_devices, args.min_healthy = 20, 1.0, 20, 0.2
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)

        def sqlite(name: str) -> str:
            return str(tmp / f"{name}.sqlite")

        result: dict[str, Any] = {
            "machine": machine(),
            "broker": {"program": _mosquitto_version(), "settings": []},
            "device_outboxes_on": "/dev/shm (tmpfs)" if Path("/dev/shm").is_dir() else "tmp",
            "collector_db_on": tempfile.gettempdir(),
        }
        phases: list[tuple[str, Any]] = [
            ("ingest_sqlite_1_collector", lambda: bench_live(tmp, "sq1", sqlite("sq1"), 1, args)),
            ("ingest_sqlite_2_collectors", lambda: bench_live(tmp, "sq2", sqlite("sq2"), 2, args)),
            (
                "catchup_sqlite_1_collector",
                lambda: bench_catchup(tmp, "cu1", sqlite("cu1"), 1, args),
            ),
            (
                "catchup_sqlite_2_collectors",
                lambda: bench_catchup(tmp, "cu2", sqlite("cu2"), 2, args),
            ),
            ("faults_postgres", lambda: bench_faults(tmp, args)),
            ("postgres", lambda: bench_postgres(tmp, args)),
            ("rollout", lambda: bench_rollout(tmp, args)),
        ]
        wall: dict[str, float] = {}
        for name, run in phases:
            if name == "postgres" and not args.postgres:
                continue
            t0 = time.perf_counter()
            result[name] = run()
            wall[name] = round(time.perf_counter() - t0, 1)
        result["broker"]["settings"] = broker_settings(
            Broker(tmp / "settings", extra_config=BROKER_EXTRA)
        )
    result["wall_s"] = {**wall, "total": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
