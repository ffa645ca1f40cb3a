"""The manifest schema v1: round trips, canonical bytes, golden files, strictness."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.bundle.manifest import (
    SCHEMA_MINOR,
    SCHEMA_VERSION,
    FileEntry,
    GoldenCases,
    Manifest,
    ModelCard,
    ModelSpec,
    QuantParams,
    TensorSpec,
    Tolerance,
    is_safe_member_path,
    scores_output,
)
from agent.errors import MalformedManifestError, SchemaVersionError
from tests.support.bundles import DEFAULT_PAYLOAD, make_manifest

GOLDEN = Path(__file__).parent / "golden"
NEWER = f"1.{SCHEMA_MINOR + 1}"  # a minor this reader does not know yet


def _golden() -> bytes:
    return (GOLDEN / "manifest_v1.json").read_bytes()


def test_golden_full_manifest_parses_with_every_section() -> None:
    m = Manifest.from_bytes(_golden())
    assert (m.name, m.version, m.sequence) == ("digits-int8", "2.1.0", 42)
    assert m.expires == datetime(2026, 9, 1, 12, 0, tzinfo=UTC)
    assert [r.name for r in m.compatibility.runtimes] == ["litert", "tflite-runtime"]
    assert m.compatibility.runtimes[1].max_version == "2.15"
    assert m.model.inputs[0].shape == (None, 64)
    assert m.model.inputs[0].quantization == QuantParams(scale=0.0627451, zero_point=-128)
    assert m.quantization.details["per_channel"] is True
    assert m.health.probation.max_p95_ms == 8.0
    assert m.drift_reference is not None
    assert m.drift_reference.features[0].fractions == (0.25, 0.25, 0.25, 0.25)
    assert m.evaluation is not None
    assert m.evaluation["quantized"]["accuracy"] == 0.972
    assert m.model_card.retraining_triggers == ("accuracy drop > 2%", "input drift PSI > 0.2")
    assert m.file("model/model.tflite").size == 14000
    assert m.extensions == {}


def test_golden_manifest_canonical_bytes_are_unchanged() -> None:
    # If this fails, the canonical encoding changed: bundles stop being reproducible
    # across versions. Change the golden file only on purpose.
    canonical = (GOLDEN / "manifest_v1.canonical.json").read_bytes()
    assert Manifest.from_bytes(_golden()).to_bytes() == canonical


def test_round_trip_through_bytes_is_identity() -> None:
    m = Manifest.from_bytes(_golden())
    assert Manifest.from_bytes(m.to_bytes()) == m
    minimal = make_manifest()
    assert Manifest.from_bytes(minimal.to_bytes()) == minimal


def test_canonical_bytes_are_sorted_compact_utf8_with_newline() -> None:
    m = make_manifest(model_card=ModelCard(description="Zähler ✓"))
    raw = m.to_bytes()
    assert raw.endswith(b"}\n")
    assert b"\n" not in raw[:-1]
    assert "Zähler ✓".encode() in raw  # UTF-8, not \u escapes
    doc = json.loads(raw)
    assert (
        raw
        == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        + b"\n"
    )


def test_to_bytes_sorts_files_by_path() -> None:
    m = make_manifest()
    shuffled = replace(m, files=tuple(reversed(m.files)))
    assert shuffled.to_bytes() == m.to_bytes()


def test_created_and_expires_are_whole_seconds_utc() -> None:
    t = datetime(2026, 5, 1, 10, 30, 15, 999_999, tzinfo=UTC)
    raw = make_manifest(created=t).to_bytes()
    assert b'"created":"2026-05-01T10:30:15Z"' in raw


def test_default_schema_version_is_current() -> None:
    assert make_manifest().schema_version == SCHEMA_VERSION == "1.3"


def _edited(edit: dict[str, Any]) -> bytes:
    doc = make_manifest().to_json()
    doc.update(edit)
    return json.dumps(doc).encode()


def test_newer_minor_schema_keeps_unknown_top_level_fields() -> None:
    m = Manifest.from_bytes(_edited({"schema_version": NEWER, "signed_by_hsm": {"slot": 2}}))
    assert m.extensions == {"signed_by_hsm": {"slot": 2}}
    # Kept verbatim when written again, so a relay does not drop what it does not know.
    assert json.loads(m.to_bytes())["signed_by_hsm"] == {"slot": 2}


def test_same_minor_schema_refuses_unknown_fields() -> None:
    with pytest.raises(MalformedManifestError, match="unknown key"):
        Manifest.from_bytes(_edited({"signed_by_hsm": 1}))


def test_newer_major_schema_is_refused_with_schema_version_error() -> None:
    with pytest.raises(SchemaVersionError, match="upgrade the agent"):
        Manifest.from_bytes(_edited({"schema_version": "2.0"}))


def test_older_major_schema_is_refused_too() -> None:
    with pytest.raises(SchemaVersionError):
        Manifest.from_bytes(_edited({"schema_version": "0.9"}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"expires": "2025-01-01T00:00:00Z"}, "expires must be after created"),
        ({"files": []}, "not listed in files"),
        ({"sequence": 2**70 * -1}, "sequence"),
        ({"version": "x" * 65}, "version"),
    ],
)
def test_inconsistent_manifest_is_refused(edit: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedManifestError, match=message):
        Manifest.from_bytes(_edited(edit))


def test_file_inside_another_file_is_refused() -> None:
    files = (*make_manifest().files, FileEntry("model/model.onnx/x", 1, "0" * 64))
    with pytest.raises(MalformedManifestError, match="inside another file"):
        Manifest.from_bytes(
            make_manifest(files=tuple(sorted(files, key=lambda f: f.path))).to_bytes()
        )


def test_unsorted_files_are_refused() -> None:
    doc = make_manifest().to_json()
    doc["files"].reverse()
    with pytest.raises(MalformedManifestError, match="sorted"):
        Manifest.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "path",
    ["a", "model/model.onnx", "a_b/c-d.e", "_x/y", "x" * 100],
)
def test_safe_member_paths(path: str) -> None:
    assert is_safe_member_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "../x",
        "a/../b",
        "./a",
        "a//b",
        "a/",
        ".hidden",
        "a\\b",
        "x" * 101,
        "manifest.json",
        "manifest.sig",
        "caf\u00e9",
        "a b",
        "-rf",
    ],
)
def test_unsafe_member_paths(path: str) -> None:
    assert not is_safe_member_path(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "1.0\ud800"),  # a lone surrogate: no terminal or log can print it
        ("version", "1.0\x1b[2J"),  # an escape sequence
        ("version", "1.0\n"),
        ("name", "digits\n"),  # a "$"-anchored pattern let a trailing newline through
        ("sequence", None),
    ],
)
def test_an_unprintable_or_malformed_top_level_field_is_refused(field: str, value: object) -> None:
    with pytest.raises(MalformedManifestError, match=field):
        Manifest.from_bytes(_edited({field: value}))


CARD = make_manifest().to_json()["model_card"]


@pytest.mark.parametrize(
    "edit",
    [
        {"model_card": {**CARD, "description": "a\x00b"}},
        {"model_card": {**CARD, "owners": ["\udc80"]}},
        {"evaluation": {"notes": {"deep": ["\x07"]}}},
        {"schema_version": NEWER, "future": {"k\x1f": 1}},
        # A right-to-left override shows "v1.0-vlb" where "v1.0-\u202eblv" was signed.
        {"model_card": {**CARD, "description": "v1.0-\u202eblv"}},
        {"evaluation": {"notes": ["\u2067isolate\u2069"]}},
    ],
)
def test_control_characters_lone_surrogates_and_bidi_overrides_are_refused_anywhere(
    edit: dict[str, Any],
) -> None:
    with pytest.raises(MalformedManifestError, match="no control character, bidirectional"):
        Manifest.from_bytes(_edited(edit))


def test_bidi_marks_stay_allowed_in_free_text() -> None:
    card = {
        **make_manifest().to_json()["model_card"],
        "description": "\u05e9\u05dc\u05d5\u05dd\u200f (v1)",
    }
    assert Manifest.from_bytes(_edited({"model_card": card})).model_card.description.endswith(
        "(v1)"
    )


def test_an_integer_too_large_for_a_float_is_a_malformed_field() -> None:
    # math.isfinite(10**400) raises OverflowError: it must be the manifest's own error.
    health = make_manifest().to_json()["health"]
    with pytest.raises(MalformedManifestError, match="finite number"):
        Manifest.from_bytes(
            _edited(
                {"health": {**health, "probation": {**health["probation"], "seconds": 10**400}}}
            )
        )


def test_non_ascii_digits_do_not_make_a_schema_version() -> None:
    with pytest.raises(MalformedManifestError, match=r"MAJOR\.MINOR"):
        Manifest.from_bytes(_edited({"schema_version": "\u0661.0"}))


# --- model.scores_output (schema 1.1) ------------------------------------------------

LABEL = TensorSpec("label", "int64", (None,))
PROBS = TensorSpec("probabilities", "float32", (None, 10))


def _classifier(scores: str | None = "probabilities", **overrides: Any) -> Manifest:
    x = TensorSpec("x", "float32", (None, 64))
    model = ModelSpec("onnx", "model/model.onnx", (x,), (LABEL, PROBS), scores_output=scores)
    return make_manifest(model=model, **overrides)


def test_scores_output_round_trips_and_is_written_in_the_model_section() -> None:
    m = _classifier()
    assert m.to_json()["model"]["scores_output"] == "probabilities"
    assert Manifest.from_bytes(m.to_bytes()).model.scores_output == "probabilities"


def test_a_current_manifest_without_scores_output_writes_null() -> None:
    m = _classifier(scores=None)
    assert m.to_json()["model"]["scores_output"] is None
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_a_scores_output_naming_no_output_is_refused() -> None:
    doc = _classifier().to_json()
    doc["model"]["scores_output"] = "logits"
    with pytest.raises(MalformedManifestError, match=r"model\.scores_output must name one"):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_a_schema_1_0_manifest_is_written_without_scores_output() -> None:
    # Its canonical bytes must stay what a 1.0 writer produced (the golden file checks it
    # for the full manifest); reading it gives no scores output.
    m = Manifest.from_bytes(_golden())
    assert m.schema_version == "1.0"
    assert m.model.scores_output is None
    assert "scores_output" not in m.to_json()["model"]


def test_a_schema_1_0_manifest_carrying_scores_output_is_refused() -> None:
    doc = _classifier(schema_version="1.0").to_json()  # set, so written even for 1.0
    with pytest.raises(MalformedManifestError, match=r"unknown key\(s\): manifest\.model\."):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_a_newer_minor_with_unknown_model_fields_is_accepted_with_its_scores_output() -> None:
    # What an agent that reads this schema meets when the SDK is newer than it.
    doc = _classifier().to_json()
    doc["schema_version"] = f"1.{SCHEMA_MINOR + 1}"
    doc["model"]["future_field"] = {"anything": [1, 2]}
    doc["future_section"] = True
    m = Manifest.from_bytes(json.dumps(doc).encode())
    assert m.model.scores_output == "probabilities"
    assert m.extensions == {"future_section": True}


@pytest.mark.parametrize(
    ("outputs", "found"),
    [
        ((LABEL, PROBS), "probabilities"),  # skl2onnx: the label comes first
        ((TensorSpec("logits", "float32", (1, 1000)),), "logits"),
        ((TensorSpec("q", "int8", (None, 10), QuantParams(1 / 256, -128)),), "q"),  # floats out
        ((TensorSpec("y", "float32", (None, 1)),), None),  # one value: a regression
        ((TensorSpec("ids", "int64", (None, 10)),), None),
        ((TensorSpec("p", "float32", (None, None)),), None),  # classes unknown
        ((TensorSpec("img", "float32", (None, 3, 8)),), None),
        ((TensorSpec("v", "float32", (10,)),), None),
    ],
)
def test_scores_output_is_the_first_float_output_shaped_batch_by_classes(
    outputs: tuple[TensorSpec, ...], found: str | None
) -> None:
    spec = scores_output(outputs)
    assert (spec.name if spec is not None else None) == found


# --- golden cases and request_elements (schema 1.2) -----------------------------------

CASE_PAYLOAD = {
    "health/case_expected.npz": b"expected\n",
    "health/case_inputs.npz": b"inputs\n",
    **DEFAULT_PAYLOAD,
}


def _with_cases(count: int = 3, **tolerances: Tolerance) -> Manifest:
    cases = GoldenCases(
        count, "health/case_inputs.npz", "health/case_expected.npz", tolerances=tolerances
    )
    base = make_manifest(CASE_PAYLOAD)
    return replace(
        base,
        health=replace(base.health, cases=cases),
        model=replace(base.model, request_elements=4),
    )


def test_golden_cases_and_request_elements_round_trip() -> None:
    m = _with_cases(y=Tolerance(atol=0.02))
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.health.cases is not None
    assert back.health.cases.tolerance("y", back.health.tolerance) == Tolerance(atol=0.02)


def test_a_schema_1_1_manifest_is_written_without_cases_or_request_elements() -> None:
    m = make_manifest(schema_version="1.1")
    doc = m.to_json()
    assert "cases" not in doc["health"]
    assert "request_elements" not in doc["model"]
    assert Manifest.from_bytes(m.to_bytes()).health.cases is None


def test_a_schema_1_1_manifest_carrying_cases_is_refused() -> None:
    doc = replace(_with_cases(), schema_version="1.1").to_json()
    with pytest.raises(MalformedManifestError, match=r"unknown key\(s\)"):
        Manifest.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["health"]["cases"]["tolerances"].update(z={"atol": 1, "rtol": 0}), "'z'"),
        (lambda d: d["health"]["cases"].update(count=1025), "count"),
        (lambda d: d["health"]["cases"].update(inputs="health/other.npz"), "not listed"),
    ],
)
def test_golden_cases_that_do_not_fit_the_manifest_are_refused(
    edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    doc = _with_cases().to_json()
    edit(doc)
    with pytest.raises(MalformedManifestError, match=match):
        Manifest.from_bytes(json.dumps(doc).encode())
