"""The desired-state message: what the fleet side writes is what the agent reads."""

from __future__ import annotations

import json

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


def _payload(**changes: object) -> bytes:
    doc = json.loads(Desired(REF, rollout="r1", ts=1.0).to_payload(fleet="f", device="d1"))
    bundle = changes.pop("bundle", {})
    doc.update(changes)
    doc["bundle"].update(bundle)  # type: ignore[arg-type]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{", "not valid JSON"),
        (b'{"v": 1, "v": 1}', "duplicate key"),
        (b"[]", "must be an object"),
        (_payload(v=2), "desired.v must be 1"),
        (_payload(fleet="other"), "fleet 'other'"),
        (_payload(extra=True), "unknown key"),
        (_payload(bundle={"url": "ftp://x/b"}), "http:// or https://"),
        (_payload(bundle={"url": "file:///etc/passwd"}), "http:// or https://"),
        (_payload(bundle={"url": "https://x/b\n"}), "http:// or https://"),
        (_payload(bundle={"sha256": "A" * 64}), "64 lowercase hex"),
        (_payload(bundle={"digest": "b" * 63 + "\n"}), "digest must be 64 lowercase hex"),
        (_payload(bundle={"sequence": -1}), "sequence must be >= 0"),
        (_payload(bundle={"sequence": True}), "sequence must be an integer"),
        (_payload(bundle={"signed": "yes"}), "unknown key"),
        (_payload(ts="soon"), "ts must be a finite number"),
        (b'{"v": 1, "bundle": {}, "ts": NaN}', "NaN"),
    ],
)
def test_a_malformed_desired_message_is_refused_naming_the_field(
    payload: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_desired(payload, fleet="f", device="d1")
