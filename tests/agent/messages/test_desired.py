"""The desired-state message: what the fleet side writes is what the agent reads."""

from __future__ import annotations

import pytest

from agent.messages.desired import BundleRef, Desired, parse_desired

REF = BundleRef("https://cdn.example/d.edgeship", "a" * 64, "b" * 64, 7, "digits", "1.1.0")


def test_payload_written_by_the_fleet_parses_back_to_the_same_message() -> None:
    desired = Desired(REF, rollout="r1", ts=1795373687.123)
    payload = desired.to_payload(fleet="f", device="d1")
    assert parse_desired(payload, fleet="f", device="d1") == desired


def test_payload_for_another_device_is_refused() -> None:
    payload = Desired(REF).to_payload(fleet="f", device="d1")
    with pytest.raises(ValueError, match="device"):
        parse_desired(payload, fleet="f", device="d2")


def test_empty_payload_clears_the_desired_state() -> None:
    assert parse_desired(b"", fleet="f", device="d1") is None
