"""Fuzz the collector's reading of device messages (status, state, events, telemetry).

The first byte of an input picks the topic leaf, the rest is the payload of a message on
``edgeship/v1/plant-7/cam-0042/<leaf>``. Invariants: ``parse_message`` returns (None only
for an empty payload) or raises ``ValueError``; a record is for the topic's device, and
its raw JSON is the payload as sent; every column is one SQLite and PostgreSQL can store
(UTF-8 text without NUL, 64-bit integers: one unstorable value failed the whole batch).
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run

with instrumented("sdk"):
    from sdk.fleet.records import parse_message

LEAVES = ("status", "state", "events", "telemetry")


def target(data: bytes) -> None:
    if not data:
        return
    leaf, payload = LEAVES[data[0] % len(LEAVES)], data[1:]
    try:
        record = parse_message(f"edgeship/v1/plant-7/cam-0042/{leaf}", payload)
    except ValueError:
        return
    if record is None:
        assert not payload
        return
    assert (record.fleet, record.device) == ("plant-7", "cam-0042")
    assert record.raw == payload.decode("utf-8")
    for value in vars(record).values():
        if isinstance(value, str):  # a column both databases can store
            value.encode("utf-8")
            assert "\x00" not in value
        elif isinstance(value, int):
            assert -(2**63) <= value < 2**63


if __name__ == "__main__":
    run(target, "telemetry")
