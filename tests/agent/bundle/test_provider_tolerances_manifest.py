"""Manifest schema 1.3: tolerances per execution provider (``health.provider_tolerances``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from agent.bundle.manifest import (
    SCHEMA_MINOR,
    Compatibility,
    GoldenCases,
    Manifest,
    ModelSpec,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.errors import MalformedManifestError
from tests.support.bundles import DEFAULT_PAYLOAD, make_manifest

NEWER = f"1.{SCHEMA_MINOR + 1}"  # a minor this reader does not know yet
CASE_PAYLOAD = {
    "health/case_expected.npz": b"expected\n",
    "health/case_inputs.npz": b"inputs\n",
    **DEFAULT_PAYLOAD,
}


def _with_cases(**tolerances: Tolerance) -> Manifest:
    cases = GoldenCases(
        3, "health/case_inputs.npz", "health/case_expected.npz", tolerances=tolerances
    )
    base = make_manifest(CASE_PAYLOAD)
    return replace(base, health=replace(base.health, cases=cases))


OPENVINO = "OpenVINOExecutionProvider"


def _with_provider_tolerances(**tables: dict[str, Tolerance]) -> Manifest:
    base = _with_cases(y=Tolerance(atol=0.02))
    return replace(base, health=replace(base.health, provider_tolerances=tables))


def test_provider_tolerances_round_trip_and_apply_on_their_provider_only() -> None:
    m = _with_provider_tolerances(**{OPENVINO: {"y": Tolerance(atol=0.05, rtol=0.001)}})
    raw = m.to_bytes()
    assert b'"provider_tolerances":{"OpenVINOExecutionProvider":{"y":{"atol":0.05' in raw
    back = Manifest.from_bytes(raw)
    assert back == m
    assert back.health.tolerances_on(OPENVINO) == {"y": Tolerance(atol=0.05, rtol=0.001)}
    assert back.health.tolerances_on("CPUExecutionProvider") == {"y": Tolerance(atol=0.02)}
    assert back.health.tolerances_on(None) == {"y": Tolerance(atol=0.02)}


def test_a_manifest_without_provider_tolerances_writes_an_empty_table_from_1_3() -> None:
    assert make_manifest().to_json()["health"]["provider_tolerances"] == {}
    doc = make_manifest().to_json()
    del doc["health"]["provider_tolerances"]
    with pytest.raises(MalformedManifestError, match=r"provider_tolerances is required"):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_a_schema_1_2_manifest_is_written_without_provider_tolerances() -> None:
    m = replace(_with_cases(), schema_version="1.2")
    assert "provider_tolerances" not in m.to_json()["health"]
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_a_schema_1_2_manifest_carrying_provider_tolerances_is_refused() -> None:
    m = _with_provider_tolerances(**{OPENVINO: {"y": Tolerance(atol=0.05)}})
    doc = replace(m, schema_version="1.2").to_json()  # set, so written even for 1.2
    with pytest.raises(MalformedManifestError, match=r"unknown key\(s\): manifest\.health\."):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_an_agent_of_an_older_minor_ignores_provider_tolerances_it_cannot_know() -> None:
    # What a 1.2 agent meets: this reader, given a manifest one minor newer than itself
    # that carries a health field it does not know, reads the rest and ignores it.
    doc = _with_cases(y=Tolerance(atol=0.02)).to_json()
    doc["schema_version"] = NEWER
    doc["health"]["tolerance_tables_of_the_future"] = {OPENVINO: {"y": {"atol": 1}}}
    m = Manifest.from_bytes(json.dumps(doc).encode())
    assert m.health.cases is not None
    assert m.health.cases.tolerances == {"y": Tolerance(atol=0.02)}


def _provider_table(edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = _with_provider_tolerances(**{OPENVINO: {"y": Tolerance(atol=0.05)}}).to_json()
    edit(doc["health"]["provider_tolerances"])
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[OPENVINO].update(z={"atol": 1, "rtol": 0}), r"names \['z'\], which are not"),
        (lambda t: t.update(xnnpack={"y": {"atol": 1, "rtol": 0}}), "'xnnpack', which is not an"),
        (lambda t: t.update({"Open VINO": {"y": {"atol": 1, "rtol": 0}}}), "not a provider"),
        (lambda t: t.update(ExecutionProvider={"y": {"atol": 1, "rtol": 0}}), "not a provider"),
        (lambda t: t.update({"\x1b[2JExecutionProvider": {"y": 1}}), r"'\\x1b\[2J.*not a provider"),
        (lambda t: t.update({"cpu\n": {"y": {"atol": 1, "rtol": 0}}}), "not a provider"),
        (lambda t: t[OPENVINO]["y"].update(atol=-0.1), r"atol must be a number >= 0"),
        (lambda t: t[OPENVINO]["y"].update(rtol="0.1"), r"rtol must be a finite number"),
        (lambda t: t[OPENVINO]["y"].update(atol=10**400), r"atol must be a finite number"),
        (lambda t: t[OPENVINO]["y"].update(extra=1), r"unknown key\(s\)"),
        (lambda t: t[OPENVINO].clear(), "must name at least one output"),
        (lambda t: t.update({OPENVINO: []}), "must be an object"),
        (
            lambda t: t.update(
                {f"P{i}ExecutionProvider": {"y": {"atol": 1, "rtol": 0}} for i in range(16)}
            ),
            "at most 16 providers",
        ),
    ],
)
def test_provider_tolerances_that_do_not_fit_the_manifest_are_refused(
    edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    with pytest.raises(MalformedManifestError, match=match):
        Manifest.from_bytes(_provider_table(edit))


def test_a_tflite_manifest_takes_delegate_names() -> None:
    base = make_manifest(
        compatibility=Compatibility(runtimes=(RuntimeRequirement("litert"),)),
        model=ModelSpec(
            format="tflite",
            file="model/model.onnx",  # the default payload's path; only the format matters
            inputs=(TensorSpec("x", "float32", (None, 4)),),
            outputs=(TensorSpec("y", "float32", (None, 2)),),
        ),
    )
    tables = {
        name: {"y": Tolerance(atol=0.01)}
        for name in ("xnnpack", "cpu", "/usr/lib/libvx_delegate.so")
    }
    m = replace(base, health=replace(base.health, provider_tolerances=tables))
    assert Manifest.from_bytes(m.to_bytes()) == m
    doc = m.to_json()
    doc["health"]["provider_tolerances"][OPENVINO] = {"y": {"atol": 1, "rtol": 0}}
    with pytest.raises(MalformedManifestError, match="not xnnpack, cpu or the absolute path"):
        Manifest.from_bytes(json.dumps(doc).encode())
