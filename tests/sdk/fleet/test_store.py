"""The collector's storage, the same tests on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.fleet.collect import parse_message
from sdk.fleet.records import EventRecord, Record, StatusRecord, TelemetryRecord
from sdk.fleet.status import fleet_status
from sdk.fleet.store import PostgresStore, SqliteStore, Store, open_store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = open_store(str(tmp_path / "fleet.sqlite"))
        assert isinstance(s, SqliteStore)
    else:
        s = open_store(request.getfixturevalue("postgres_url"))
        assert isinstance(s, PostgresStore)
    yield s
    s.close()


def telemetry(device: str, seq: int, *, p95: float = 2.0, errors: int = 0) -> TelemetryRecord:
    return TelemetryRecord(
        "f", device, seq, 1000.0 + seq, "digits", "1.1.0", 7, 100, errors,
        1.0, p95, 3.0, "stable", 0.02, json.dumps({"seq": seq}),
    )  # fmt: skip


def event(device: str, seq: int, kind: str = "committed") -> EventRecord:
    return EventRecord("f", device, seq, 1000.0 + seq, kind, "d" * 64, None, "{}")


def seqs(store: Store, table: str) -> list[int]:
    rows = store.query(f"SELECT seq FROM {table} ORDER BY seq")
    return [int(r["seq"]) for r in rows]


def gaps(store: Store) -> list[tuple[int, int]]:
    rows = store.query("SELECT first_seq, last_seq FROM gaps ORDER BY first_seq")
    return [(int(r["first_seq"]), int(r["last_seq"])) for r in rows]


def test_a_repeated_seq_is_stored_once_and_counted_as_duplicate(store: Store) -> None:
    first = store.write([telemetry("d1", 1), telemetry("d1", 2)], 0.0)
    again = store.write([telemetry("d1", 2)], 1.0)
    assert (first.stored, again.stored, again.duplicates) == (2, 0, 1)
    assert seqs(store, "telemetry") == [1, 2]


def test_events_and_telemetry_share_one_seq_counter_without_false_gaps(store: Store) -> None:
    store.write([telemetry("d1", 1), event("d1", 2), telemetry("d1", 3)], 0.0)
    assert gaps(store) == []


def test_missing_seqs_are_recorded_as_a_gap(store: Store) -> None:
    result = store.write([telemetry("d1", 1), telemetry("d1", 5)], 0.0)
    assert result.gaps == [("f", "d1", 2, 4)]
    assert gaps(store) == [(2, 4)]


def test_a_late_message_splits_its_gap(store: Store) -> None:
    store.write([telemetry("d1", 1), telemetry("d1", 6)], 0.0)
    store.write([event("d1", 3)], 1.0)
    assert gaps(store) == [(2, 2), (4, 5)]
    store.write([telemetry("d1", 2), telemetry("d1", 4), telemetry("d1", 5)], 2.0)
    assert gaps(store) == []


def test_gaps_are_per_device(store: Store) -> None:
    store.write([telemetry("d1", 1), telemetry("d2", 3)], 0.0)
    rows = store.query("SELECT device, first_seq, last_seq FROM gaps")
    assert [(r["device"], r["first_seq"], r["last_seq"]) for r in rows] == [("d2", 1, 2)]


def test_status_keeps_the_newest_message_and_the_birth_attributes(store: Store) -> None:
    birth = StatusRecord("f", "d1", 10.0, "online", {"arch": "aarch64"}, "{}")
    death = StatusRecord("f", "d1", 20.0, "offline", None, "{}")
    stale = StatusRecord("f", "d1", 5.0, "online", {"arch": "x86_64"}, "{}")
    records: list[Record] = [birth, death]
    store.write(records, 0.0)
    store.write([stale], 1.0)
    row = store.query("SELECT status, attributes FROM devices")[0]
    assert row["status"] == "offline"
    assert json.loads(row["attributes"]) == {"arch": "aarch64"}


def test_fleet_status_summarises_each_device(store: Store) -> None:
    store.write(
        [
            StatusRecord("f", "d1", 1.0, "online", {"arch": "aarch64"}, "{}"),
            telemetry("d1", 1, p95=4.0, errors=0),
            telemetry("d1", 2, p95=8.0, errors=10),
        ],
        received_at=1002.0,
    )
    (row,) = fleet_status(store, now=1003.0, window_s=900)
    assert row.online is True
    assert (row.model, row.name, row.version) == ("default", "digits", "1.1.0")
    assert row.p95_ms == 8.0
    assert row.error_rate == pytest.approx(10 / 200)
    assert row.drift_band == "stable"
    assert row.last_seen == 1002.0


def test_parsed_messages_can_be_stored(store: Store) -> None:
    payload = json.dumps(
        {"v": 1, "fleet": "f", "device": "d9", "ts": 5.0, "seq": 1, "event": "failed",
         "digest": "x", "reason": "bad signature"}
    ).encode()  # fmt: skip
    record = parse_message("edgeship/v1/f/d9/events", payload)
    assert record is not None
    store.write([record], 6.0)
    assert store.query("SELECT reason FROM events")[0]["reason"] == "bad signature"


def test_a_message_with_a_lone_surrogate_or_nul_is_stored_not_fatal(store: Store) -> None:
    # JSON's "\ud800" parses to a lone surrogate, which neither database can encode: the
    # whole batch failed, the collector stopped, and the unacknowledged message stopped
    # it again after every restart.
    payload = (
        b'{"v":1,"fleet":"f","device":"d9","ts":5.0,"seq":1,'
        b'"event":"x\\udc00\\u0000y","digest":"\\ud800","reason":"a\\ud800b"}'
    )
    record = parse_message("edgeship/v1/f/d9/events", payload)
    assert isinstance(record, EventRecord)
    assert store.write([record], 6.0).stored == 1
    row = store.query("SELECT event, digest, reason, raw FROM events")[0]
    assert (row["digest"], row["reason"]) == (None, None)
    assert row["event"] == "x?\ufffdy"
    assert row["raw"] == payload.decode()  # what was sent is kept, escaped


def test_a_seq_repeated_within_one_batch_is_stored_once(store: Store) -> None:
    result = store.write([telemetry("d1", 1), telemetry("d1", 1), event("d1", 2)], 0.0)
    assert (result.stored, result.duplicates) == (2, 1)
    assert seqs(store, "telemetry") == [1]


def test_a_batch_larger_than_one_statement_is_stored_whole_with_its_gaps(store: Store) -> None:
    # 3 devices x 400 messages: more rows than one multi-row INSERT carries.
    records: list[Record] = [
        telemetry(d, seq) for d in ("d1", "d2", "d3") for seq in range(1, 801) if seq % 2
    ]
    result = store.write(records, 0.0)
    assert (result.stored, result.duplicates) == (1200, 0)
    assert len(result.gaps) == 3 * 399
    assert ("f", "d2", 2, 2) in result.gaps


def test_late_messages_in_one_batch_split_several_gaps_while_new_ones_open(store: Store) -> None:
    store.write([telemetry("d1", 1), telemetry("d1", 5), telemetry("d1", 9)], 0.0)
    result = store.write([event("d1", 3), telemetry("d1", 7), telemetry("d1", 12)], 1.0)
    assert result.gaps == [("f", "d1", 10, 11)]
    assert gaps(store) == [(2, 2), (4, 4), (6, 6), (8, 8), (10, 11)]
    assert store.query("SELECT max_seq FROM devices")[0]["max_seq"] == 12


def test_a_gap_keeps_when_it_was_detected_when_it_is_split(store: Store) -> None:
    store.write([telemetry("d1", 1), telemetry("d1", 5)], 10.0)
    store.write([telemetry("d1", 3)], 20.0)
    rows = store.query("SELECT detected_at FROM gaps")
    assert [float(r["detected_at"]) for r in rows] == [10.0, 10.0]


def test_statuses_in_one_batch_apply_in_sender_time_order(store: Store) -> None:
    death = StatusRecord("f", "d1", 20.0, "offline", None, "{}")
    birth = StatusRecord("f", "d1", 10.0, "online", {"arch": "aarch64"}, "{}")
    store.write([death, birth], 0.0)
    row = store.query("SELECT status, attributes FROM devices")[0]
    assert row["status"] == "offline"
    assert json.loads(row["attributes"]) == {"arch": "aarch64"}


def test_a_batch_of_only_statuses_still_marks_the_device_seen(store: Store) -> None:
    store.write([StatusRecord("f", "d1", 1.0, "online", None, "{}")], 5.0)
    row = store.query("SELECT last_seen, max_seq FROM devices")[0]
    assert (float(row["last_seen"]), int(row["max_seq"])) == (5.0, 0)
