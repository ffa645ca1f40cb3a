"""The desired-state message: what the fleet side writes is what the agent reads."""

from __future__ import annotations

import json

import pytest

from agent.messages.desired import (
    BundleRef,
    Desired,
    ProbationRule,
    PromotionRule,
    Split,
    parse_desired,
)

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


# --- several models, stages, ground truth in probation --------------------------------------


def test_a_named_models_stages_and_probation_rule_parse_back_to_the_same_message() -> None:
    for desired in (
        Desired(REF, ts=1.0, model="camera", shadow=PromotionRule(min_samples=50)),
        Desired(REF, ts=1.0, model="camera", split=Split(0.25)),
        Desired(REF, ts=1.0, probation=ProbationRule(min_accuracy=0.9, min_feedback=30)),
    ):
        payload = desired.to_payload(fleet="f", device="d1")
        assert parse_desired(payload, fleet="f", device="d1", model=desired.model) == desired


def test_a_partial_shadow_rule_takes_the_defaults_for_the_rest() -> None:
    payload = _payload(shadow={"min_samples": 10})
    desired = parse_desired(payload, fleet="f", device="d1")
    assert desired is not None
    assert desired.shadow == PromotionRule(min_samples=10)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "camera"}, "for model 'camera', not 'default'"),
        ({"model": "Not A Name"}, "for model"),
        ({"shadow": {"min_agreement": 1.5}}, "min_agreement"),
        ({"shadow": {"sample_rate": 0}}, "sample_rate"),
        ({"shadow": {"min_samples": 0}}, "min_samples"),
        ({"shadow": {"surprise": 1}}, "unknown key"),
        ({"split": {"share": 1.0}}, "strictly between 0 and 1"),
        ({"split": {"share": 0.2}, "shadow": {}}, "not both"),
        ({"probation": {"min_accuracy": 2}}, "min_accuracy"),
        ({"probation": {}}, "min_accuracy"),
    ],
)
def test_stages_out_of_their_rules_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_desired(_payload(**changes), fleet="f", device="d1")


def test_a_named_models_message_on_another_models_topic_is_refused() -> None:
    payload = Desired(REF, model="camera").to_payload(fleet="f", device="d1")
    with pytest.raises(ValueError, match="for model 'camera', not 'gate'"):
        parse_desired(payload, fleet="f", device="d1", model="gate")
