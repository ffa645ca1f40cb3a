"""Fuzz the desired-state parser (what a device reads from ``.../desired``).

Invariants: ``parse_desired`` returns (None only for an empty payload) or raises
``ValueError``; what it accepts is for this device, with printable text, and its own
encoding parses back to the same value (times to the millisecond).
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run
from tests.support.hostile import assert_printable

with instrumented():
    from agent.messages.desired import parse_desired

FLEET, DEVICE = "plant-7", "cam-0042"


def target(data: bytes) -> None:
    try:
        desired = parse_desired(data, fleet=FLEET, device=DEVICE)
    except ValueError:
        return
    if desired is None:
        assert not data
        return
    assert_printable(desired.bundle.to_json())
    again = parse_desired(
        desired.to_payload(fleet=FLEET, device=DEVICE), fleet=FLEET, device=DEVICE
    )
    assert again is not None
    assert (again.bundle, again.rollout) == (desired.bundle, desired.rollout)
    # Written rounded to the millisecond; a float survives JSON exactly.
    assert again.ts == (None if desired.ts is None else round(desired.ts, 3))


if __name__ == "__main__":
    run(target, "desired")
