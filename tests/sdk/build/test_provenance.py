"""The provenance statement on its own: standard shape, canonical bytes, digests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement

from sdk.build.oms import UpstreamSignature
from sdk.build.provenance import (
    BUILD_TYPE,
    BuildInputs,
    builder_id,
    digest_path,
    parse_statement,
    statement_bytes,
)

CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SIGNED = UpstreamSignature("key", "ab" * 32, "cd" * 32, ((".", "ef" * 32),))


@pytest.fixture
def inputs(tmp_path: Path) -> BuildInputs:
    (tmp_path / "model.onnx").write_bytes(b"model bytes")
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.npy").write_bytes(b"a")
    (tmp_path / "calib" / "b.npy").write_bytes(b"b")
    return BuildInputs(
        model=tmp_path / "model.onnx",
        model_source="models/model.onnx",
        data={"calibration": tmp_path / "calib"},
        parameters={"quantization": {"scheme": "static"}, "gates": {"min_agreement": 0.99}},
        training={"data_version": "2026-02", "hyperparameters": {"lr": 0.001}},
        model_signature=SIGNED,
        builder="ci:https://ci.example/job/7",
    )


def _statement(inputs: BuildInputs, tmp_path: Path) -> bytes:
    (tmp_path / "payload.bin").write_bytes(b"bundled model")
    return statement_bytes(
        inputs,
        subjects={"model/model.onnx": tmp_path / "payload.bin"},
        created=CREATED,
        results={"gates": [{"name": "min_agreement", "passed": True}]},
    )


def test_it_is_an_in_toto_v1_statement_with_slsa_v1_provenance(
    inputs: BuildInputs, tmp_path: Path
) -> None:
    # Read by the in-toto attestation framework's own protobuf bindings: unknown or
    # misspelled fields would fail the parse.
    raw = json.loads(_statement(inputs, tmp_path))
    statement = json_format.ParseDict(raw, statement_pb2.Statement())
    Statement.copy_from_pb(statement).validate()
    provenance = json_format.ParseDict(raw["predicate"], provenance_pb2.Provenance())
    assert provenance.build_definition.build_type == BUILD_TYPE
    assert provenance.run_details.builder.id == "ci:https://ci.example/job/7"
    assert statement.subject[0].digest["sha256"] == hashlib.sha256(b"bundled model").hexdigest()


def test_it_names_the_source_model_its_signature_and_the_data(
    inputs: BuildInputs, tmp_path: Path
) -> None:
    definition = parse_statement(_statement(inputs, tmp_path))["predicate"]["buildDefinition"]
    model, calibration = definition["resolvedDependencies"]
    assert model["uri"] == "file:models/model.onnx"
    assert model["digest"]["sha256"] == hashlib.sha256(b"model bytes").hexdigest()
    assert model["annotations"]["signature"]["signer"] == "ab" * 32
    assert calibration["name"] == "calibration"
    assert definition["externalParameters"]["training"]["data_version"] == "2026-02"


def test_the_bytes_are_canonical_and_repeatable(inputs: BuildInputs, tmp_path: Path) -> None:
    first = _statement(inputs, tmp_path)
    assert first == _statement(inputs, tmp_path)
    canonical = json.dumps(json.loads(first), sort_keys=True, separators=(",", ":"))
    assert first == canonical.encode() + b"\n"


def test_a_folder_digest_changes_with_any_file_name_or_content(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.npy").write_bytes(b"1")
    (folder / "sub").mkdir()
    (folder / "sub" / "y.npy").write_bytes(b"2")
    before = digest_path(folder)
    (folder / "sub" / "y.npy").rename(folder / "sub" / "z.npy")
    renamed = digest_path(folder)
    (folder / "x.npy").write_bytes(b"3")
    assert len({before, renamed, digest_path(folder)}) == 3


def test_a_uri_stays_a_uri(inputs: BuildInputs, tmp_path: Path) -> None:
    uri = "https://models.example/net/v3/model.onnx"
    statement = parse_statement(_statement(replace(inputs, model_source=uri), tmp_path))
    assert statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]["uri"] == uri


def test_the_builder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_BUILDER_ID", "https://ci.example/runner/3")
    assert builder_id() == "https://ci.example/runner/3"
    monkeypatch.delenv("EDGESHIP_BUILDER_ID")
    assert builder_id().startswith("local:")
