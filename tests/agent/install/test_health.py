"""The health check on a loaded candidate, with real onnxruntime, and its pure comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import Tolerance
from agent.errors import HealthCheckError
from agent.install import (
    check_health,
)
from agent.install._health import compare_outputs, load_arrays
from tests.agent.install._staged import staged


def test_candidate_matching_its_golden_outputs_passes(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    with model:
        report = check_health(model, manifest, target, runs=5)
    assert report.worst_output == "probs"
    assert report.max_abs_deviation <= 1e-5
    assert report.p95_ms > 0
    assert report.runs == 5


def test_candidate_with_wrong_golden_outputs_fails_naming_the_deviation(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path, expected_shift=0.01)
    with model, pytest.raises(HealthCheckError, match=r"'probs' deviates by 0\.01"):
        check_health(model, manifest, target, runs=1)


def test_candidate_over_its_latency_budget_fails_naming_the_p95(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path, latency_budget_p95_ms=1e-6)
    with model, pytest.raises(HealthCheckError, match=r"p95 latency .* exceeds the budget"):
        check_health(model, manifest, target, runs=3)


def test_closed_candidate_fails_the_gate(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    model.close()
    with pytest.raises(HealthCheckError, match="fails on its golden inputs"):
        check_health(model, manifest, target, runs=1)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([object()], dtype=object))
    with pytest.raises(HealthCheckError, match="cannot read"):
        load_arrays(path)


EXPECTED = {"y": np.array([[1.0, -2.0, 100.0]], dtype=np.float32)}


def test_outputs_within_atol_plus_rtol_times_expected_match() -> None:
    actual = {"y": EXPECTED["y"] + np.array([[0.05, -0.05, 1.0]], dtype=np.float32)}
    name, deviation = compare_outputs(EXPECTED, actual, Tolerance(atol=0.1, rtol=0.01))
    assert name == "y"
    assert deviation == pytest.approx(1.0)


def test_outputs_just_beyond_tolerance_fail() -> None:
    actual = {"y": EXPECTED["y"] + np.array([[0.0, 0.0, 1.5]], dtype=np.float32)}
    with pytest.raises(HealthCheckError, match=r"deviates by 1\.5"):
        compare_outputs(EXPECTED, actual, Tolerance(atol=0.1, rtol=0.01))


def test_exact_tolerance_requires_identical_outputs() -> None:
    compare_outputs(EXPECTED, dict(EXPECTED), Tolerance(atol=0.0))
    with pytest.raises(HealthCheckError):
        compare_outputs(EXPECTED, {"y": EXPECTED["y"] * 1.0001}, Tolerance(atol=0.0))


@pytest.mark.parametrize(
    ("actual", "message"),
    [
        ({}, "no output 'y'"),
        ({"y": np.zeros((1, 2), np.float32)}, "shape"),
        ({"y": np.array([[1.0, np.nan, 100.0]], np.float32)}, "NaN"),
    ],
)
def test_missing_misshapen_or_nan_outputs_fail(actual: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(HealthCheckError, match=message):
        compare_outputs(EXPECTED, actual, Tolerance(atol=1.0))


def test_empty_expected_outputs_fail() -> None:
    with pytest.raises(HealthCheckError, match="empty"):
        compare_outputs({}, {"y": np.zeros(1)}, Tolerance(atol=1.0))


def test_a_schema_1_1_bundle_gates_on_its_single_golden_request(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path, schema_version="1.1")
    assert manifest.schema_version == "1.1"
    assert manifest.health.cases is None
    with model:
        assert check_health(model, manifest, target, runs=2).worst_output == "probs"
