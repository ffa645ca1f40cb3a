"""The golden tolerance: measured on the device's runtime configuration, bounded by each
output's range and by how far the quantized model is from its float original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import QuantParams, TensorSpec
from sdk.build import quantize
from sdk.build.datasets import Dataset
from sdk.build.golden import MAX_SHARE, derive_golden, output_tolerance, run_cases
from sdk.build.model_io import open_model
from tests.support.models import make_onnx_mlp, make_tflite_mlp

FLOAT = TensorSpec("y", "float32", (None, 4))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("golden")
    calib = Dataset({"x": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)})
    onnx = make_onnx_mlp(d / "mlp.onnx")
    tflite = make_tflite_mlp(d / "mlp.tflite")
    return {
        "onnx": onnx,
        "tflite": tflite,
        "tflite_q": quantize(tflite, d / "q.tflite", scheme="static", calibration=calib).path,
    }


def _cases(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(n)]


def test_expected_outputs_are_the_models_answer_to_each_case_as_one_request(
    models: dict[str, Path],
) -> None:
    cases = _cases(3)
    golden = derive_golden(models["onnx"], cases)
    with open_model(models["onnx"], threads=0) as model:
        direct = run_cases(model, cases)
    assert len(golden.expected) == 3
    for got, want in zip(golden.expected, direct, strict=True):
        np.testing.assert_array_equal(got["probs"], want["probs"].astype(np.float32))


def test_a_measured_quantization_difference_widens_the_tolerance_to_half_of_it(
    models: dict[str, Path],
) -> None:
    cases = _cases(4)
    base = derive_golden(models["onnx"], cases)
    reference = [{"probs": e["probs"] + np.float32(4e-3)} for e in base.expected]
    wider = derive_golden(models["onnx"], cases, reference=reference)
    how = wider.details["outputs"]["probs"]
    assert how["qdiff"] == pytest.approx(4e-3, rel=1e-3)
    assert wider.tolerances["probs"].atol == pytest.approx(2e-3, rel=1e-3)
    assert base.tolerances["probs"].atol < wider.tolerances["probs"].atol


def test_int8_outputs_get_at_least_one_output_step(models: dict[str, Path]) -> None:
    golden = derive_golden(models["tflite_q"], _cases(4))
    with open_model(models["tflite_q"]) as model:
        q = model.spec.outputs[0].quantization
    assert q is not None
    assert golden.tolerance.atol >= q.scale
    assert golden.details["outputs"][model.spec.outputs[0].name]["floor"] == pytest.approx(q.scale)


def test_the_tolerance_never_exceeds_the_stated_share_of_the_range() -> None:
    expected = [np.array([0.0, 1.0]), np.array([0.5, 0.25])]
    # A quantized model 0.6 off its float original on a range of 1: capped at 5%.
    how = output_tolerance(FLOAT, expected, noise=0.0, qdiff=0.6)
    assert how["atol"] == pytest.approx(MAX_SHARE * 1.0)
    assert how["share_of_range"] == pytest.approx(MAX_SHARE)


def test_the_build_machines_own_noise_is_always_admitted() -> None:
    expected = [np.array([0.0, 1.0])]
    how = output_tolerance(FLOAT, expected, noise=0.1, qdiff=0.0)
    assert how["atol"] == pytest.approx(0.2)  # 2 x noise, even beyond the cap


def test_a_constant_output_is_measured_against_its_magnitude() -> None:
    how = output_tolerance(FLOAT, [np.full(4, 3.0)], noise=0.0, qdiff=1.0)
    assert how["range"] == 3.0
    assert how["atol"] == pytest.approx(MAX_SHARE * 3.0)


def test_an_int8_output_step_is_the_floor_even_past_the_cap() -> None:
    spec = TensorSpec("y", "int8", (None, 4), QuantParams(scale=0.1, zero_point=0))
    how = output_tolerance(spec, [np.array([0.0, 1.0])], noise=0.0, qdiff=0.0)
    assert how["atol"] == pytest.approx(0.1)
