"""The health gate, on real models with real onnxruntime, and its pure comparison."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.errors import HealthCheckError, InferenceError, RuntimeUnavailableError
from agent.health import check_health, compare_outputs, load_and_check, load_arrays
from agent.manifest import Manifest, Tolerance
from agent.runtimes import Model, load_model
from tests.agent._lifecycle import POLICY, make_model_bundle
from tests.support.bundles import NOW


def _staged(tmp_path: Path, **kwargs: object) -> tuple[Model, Manifest, Path]:
    bundle = make_model_bundle(tmp_path / "src", seed=1, sequence=1, **kwargs)  # type: ignore[arg-type]
    target = tmp_path / "v"
    with bundle.path.open("rb") as f:
        verified = verify_bundle(f, POLICY, now=NOW, extract_to=target)
    return load_model(verified.manifest, target, "onnxruntime"), verified.manifest, target


def test_candidate_matching_its_golden_outputs_passes(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path)
    with model:
        report = check_health(model, manifest, target, runs=5)
    assert report.worst_output == "probs"
    assert report.max_abs_deviation <= 1e-5
    assert report.p95_ms > 0
    assert report.runs == 5


def test_candidate_with_wrong_golden_outputs_fails_naming_the_deviation(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path, expected_shift=0.01)
    with model, pytest.raises(HealthCheckError, match=r"'probs' deviates by 0\.01"):
        check_health(model, manifest, target, runs=1)


def test_candidate_over_its_latency_budget_fails_naming_the_p95(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path, latency_budget_p95_ms=1e-6)
    with model, pytest.raises(HealthCheckError, match=r"p95 latency .* exceeds the budget"):
        check_health(model, manifest, target, runs=3)


def test_closed_candidate_fails_the_gate(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path)
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


def test_load_and_check_runs_the_gate_at_lower_cpu_priority(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path)
    seen: list[tuple[int, int]] = []

    def load() -> Model:
        tid = threading.get_native_id()
        seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid)))
        return model

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    loaded, report = load_and_check(load, manifest, target, runs=2, nice=5)
    with loaded:
        assert report.runs == 2
    assert seen[0][0] != threading.get_native_id()
    assert seen[0][1] == min(base + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_load_and_check_turns_a_load_failure_into_a_health_check_error(tmp_path: Path) -> None:
    _, manifest, target = _staged(tmp_path)

    def load() -> Model:
        raise RuntimeUnavailableError("no such runtime here")

    with pytest.raises(HealthCheckError, match="cannot be loaded: no such runtime"):
        load_and_check(load, manifest, target, runs=1)


def test_load_and_check_closes_a_candidate_that_fails_the_gate(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path, expected_shift=0.5)
    with pytest.raises(HealthCheckError):
        load_and_check(lambda: model, manifest, target, runs=1, nice=None)
    with pytest.raises(InferenceError, match="closed"):
        model.predict({"x": np.zeros((1, 8), np.float32)})
