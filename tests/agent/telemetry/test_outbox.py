import json
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.telemetry._outbox import Outbox


def _payload(ob: Outbox, seq: int) -> dict:
    (rec,) = [r for r in ob.pending(seq - 1, 1) if r.seq == seq]
    return json.loads(rec.payload)


def test_sequence_numbers_grow_by_one_and_are_stamped_in_the_payload(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        seqs = [ob.append("t", "telemetry", {"i": i}) for i in range(3)]
        assert seqs == [1, 2, 3]
        assert [json.loads(r.payload)["seq"] for r in ob.pending()] == [1, 2, 3]


def test_sequence_survives_reopen_even_when_the_outbox_was_emptied(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.append("t", "event", {"a": 1})
        ob.append("t", "event", {"a": 2})
        assert ob.ack([1, 2]) == 2
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.append("t", "event", {"a": 3}) == 3


def test_unacknowledged_rows_survive_reopen_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        for i in range(5):
            ob.append(f"topic/{i}", "event", {"i": i})
        ob.ack([2, 4])
    with Outbox(tmp_path / "o.db") as ob:
        assert [(r.seq, r.topic) for r in ob.pending()] == [
            (1, "topic/0"),
            (3, "topic/2"),
            (5, "topic/4"),
        ]


def test_pending_pages_after_a_cursor(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        for i in range(10):
            ob.append("t", "telemetry", {"i": i})
        assert [r.seq for r in ob.pending(after_seq=4, limit=3)] == [5, 6, 7]


def test_ack_of_unknown_or_repeated_seq_is_harmless(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.append("t", "event", {})
        assert ob.ack([1, 1, 99]) == 1
        assert ob.stats().rows == 0
        assert ob.stats().stored_bytes == 0


def test_stored_bytes_never_exceed_the_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        for i in range(200):
            ob.append("t", "telemetry", {"pad": "x" * (i % 50)})
            assert ob.stats().stored_bytes <= 4096
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        assert ob.stats().stored_bytes == sum(
            len(r.payload) + 1 + 48 for r in ob.pending(limit=1000)
        )


def test_when_full_the_oldest_telemetry_is_dropped_before_any_event(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        events = [ob.append("e", "event", {"n": i}) for i in range(3)]
        for i in range(100):
            ob.append("t", "telemetry", {"n": i, "pad": "x" * 40})
        kept = ob.pending(limit=1000)
        assert [r.seq for r in kept if r.kind == "event"] == events
        telemetry = [r.seq for r in kept if r.kind == "telemetry"]
        # The survivors are the newest telemetry messages, contiguous up to the last one.
        assert telemetry == list(range(telemetry[0], 103 + 1))
        assert ob.stats().dropped_capacity == 100 - len(telemetry)


def test_the_next_telemetry_message_reports_the_drops_since_the_previous_one(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=2048) as ob:
        for i in range(60):
            ob.append("t", "telemetry", {"n": i})
        last = ob.pending(limit=1000)[-1]
        reported_so_far = json.loads(last.payload)["dropped"]["capacity_total"]
        dropped = ob.stats().dropped_capacity
        seq = ob.append("t", "telemetry", {"n": 60})
        assert seq is not None
        dropped_doc = _payload(ob, seq)["dropped"]
        # Counts cover the drops before this message was stored.
        assert dropped_doc["capacity_total"] == dropped
        assert dropped_doc["capacity"] == dropped - reported_so_far
        assert dropped > 0


def test_a_telemetry_message_is_refused_rather_than_dropping_events(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=2048) as ob:
        while ob.stats().stored_bytes < 2048 - 200:
            ob.append("e", "event", {"pad": "y" * 80})
        events = ob.stats().event_rows
        assert ob.append("t", "telemetry", {"pad": "z" * 400}) is None
        assert ob.stats().event_rows == events
        assert ob.stats().dropped_capacity == 1
        # The refusal is reported by the next telemetry message that fits.
        seq = ob.append("t", "telemetry", {})
        assert seq is not None
        assert _payload(ob, seq)["dropped"]["capacity"] == 1


def test_events_drop_the_oldest_events_when_only_events_remain(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=2048) as ob:
        seqs = [ob.append("e", "event", {"pad": "y" * 80}) for _ in range(40)]
        kept = [r.seq for r in ob.pending(limit=1000)]
        assert kept == seqs[-len(kept) :]
        assert seqs[-1] in kept
        assert ob.stats().dropped_capacity == 40 - len(kept)


def test_expired_telemetry_is_removed_and_counted(tmp_path: Path) -> None:
    now = [1000.0]
    with Outbox(tmp_path / "o.db", clock=lambda: now[0]) as ob:
        ob.append("t", "telemetry", {}, ttl_s=10)
        ob.append("e", "event", {})
        now[0] += 11
        assert ob.expire() == 1
        assert [r.kind for r in ob.pending()] == ["event"]
        seq = ob.append("t", "telemetry", {})
        assert seq is not None
        assert _payload(ob, seq)["dropped"]["expired"] == 1


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"x": float("nan")}, "event"),
        ({"x": object()}, "event"),
        ({"seq": 3}, "event"),
        ({}, "metrics"),
        ({"pad": "x" * 5000}, "event"),
    ],
)
def test_bad_messages_are_refused_and_leave_no_trace(tmp_path: Path, body: dict, kind: str) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        ob.append("t", "event", {"ok": True})
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            ob.append("t", kind, body)  # type: ignore[arg-type]
        assert ob.stats().rows == 1
        assert ob.append("t", "event", {}) == 2


def test_concurrent_appends_get_distinct_consecutive_sequence_numbers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        got: list[int | None] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(50):
                s = ob.append("t", "event", {})
                with lock:
                    got.append(s)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(s for s in got if s is not None) == list(range(1, 201))


def test_the_database_uses_wal_journaling(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db").close()
    db = sqlite3.connect(tmp_path / "o.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_retained_state_keeps_only_the_latest_value_per_topic(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.put_retained("s", {"a": 1})
        ob.put_retained("s", {"a": 2})
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.retained() == {"s": b'{"a":2}'}
