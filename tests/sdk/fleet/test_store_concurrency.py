"""Several collectors on one database: opening it at once, writing it at once."""

from __future__ import annotations

import multiprocessing as mp
import threading
import uuid
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from sdk.fleet.records import TelemetryRecord
from sdk.fleet.store import Store, open_store

# Fork: the children start within milliseconds of each other, which is the race.
_MP = mp.get_context("fork")
_ROUNDS = 8


def telemetry(device: str, seq: int) -> TelemetryRecord:
    return TelemetryRecord(
        "f", device, seq, 1000.0 + seq, "digits", "1.1.0", 7, 100, 0,
        1.0, 2.0, 3.0, "stable", 0.02, "{}",
    )  # fmt: skip


def _open_and_write(db: str, barrier: Barrier, device: str, errors: mp.Queue[str]) -> None:
    barrier.wait()
    try:
        store = open_store(db)
        store.write([telemetry(device, 1)], 0.0)
        store.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
        errors.put(f"{type(e).__name__}: {e}")


def open_at_once(db: str) -> list[str]:
    """Two processes open (and write to) ``db`` released by one barrier; their errors."""
    barrier = _MP.Barrier(2)
    errors: mp.Queue[str] = _MP.Queue()
    procs = [
        _MP.Process(target=_open_and_write, args=(db, barrier, f"d{i}", errors)) for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    found = []
    while not errors.empty():
        found.append(errors.get())
    found += [f"exit code {p.exitcode}" for p in procs if p.exitcode != 0]
    return found


def test_two_processes_can_create_one_new_sqlite_file_at_once(tmp_path: Path) -> None:
    for i in range(_ROUNDS):
        db = str(tmp_path / f"fleet-{i}.sqlite")
        assert open_at_once(db) == []
        store = open_store(db)
        assert len(store.query("SELECT device FROM telemetry")) == 2
        store.close()


@pytest.mark.integration
def test_two_processes_can_create_the_tables_of_one_new_postgres_database_at_once(
    pg_server: str,
) -> None:
    import psycopg  # noqa: PLC0415 - optional dependency

    for _ in range(_ROUNDS):
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        db = f"{pg_server}/{name}"
        assert open_at_once(db) == []
        store = open_store(db)
        assert len(store.query("SELECT device FROM telemetry")) == 2
        store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return str(request.getfixturevalue("postgres_url"))


def test_two_writers_sharing_devices_store_each_seq_once_and_heal_each_others_gaps(
    db: str,
) -> None:
    # Like two collectors of one shared subscription: each gets every other message of
    # each device, in batches, so each one's batches leave gaps the other one fills.
    devices = [f"d{i}" for i in range(20)]
    stores: list[Store] = [open_store(db), open_store(db)]
    errors: list[BaseException] = []

    def writer(store: Store, parity: int) -> None:
        try:
            for start in range(1, 200, 10):
                batch = [
                    telemetry(d, seq)
                    for d in devices
                    for seq in range(start, start + 10)
                    if seq % 2 == parity
                ]
                store.write(batch, float(start))
                store.write(batch[:5], float(start))  # re-sent: duplicates
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        rows = stores[0].query("SELECT device, seq FROM telemetry ORDER BY device, seq")
        assert [(r["device"], int(r["seq"])) for r in rows] == [
            (d, seq) for d in sorted(devices) for seq in range(1, 201)
        ]
        assert stores[0].query("SELECT * FROM gaps") == []
        highest = stores[0].query("SELECT DISTINCT max_seq FROM devices")
        assert [int(r["max_seq"]) for r in highest] == [200]
    finally:
        for s in stores:
            s.close()
