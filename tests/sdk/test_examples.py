"""The examples run, and what they claim holds: trained digits survive int8."""

from __future__ import annotations

import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdk.build import Gates, evaluate, load_dataset, open_model, quantize

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _function(script: str, name: str) -> Callable[..., Any]:
    namespace = runpy.run_path(str(EXAMPLES / script))
    fn = namespace[name]
    assert callable(fn)
    return fn  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build = _function("digits/train.py", "build")
    paths: dict[str, Path] = build(tmp_path_factory.mktemp("digits"))
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_digits_static_int8_loses_at_most_half_a_point(
    tmp_path: Path, digits: dict[str, Path], fmt: str
) -> None:
    validation = load_dataset(digits["validation"])
    result = quantize(
        digits[fmt],
        tmp_path / f"q.{fmt}",
        scheme="static",
        calibration=load_dataset(digits["calibration"]),
    )
    report = evaluate(
        digits[fmt], result.path, validation, gates=Gates(max_accuracy_drop=0.5), latency_runs=3
    )
    assert report.original.accuracy is not None
    assert report.original.accuracy > 0.95
    assert report.passed, report.to_json()["gates"]


@pytest.mark.slow
def test_digits_onnx_and_tflite_exports_compute_the_same_probabilities(
    digits: dict[str, Path],
) -> None:
    x = load_dataset(digits["validation"]).inputs["x"]
    with open_model(digits["onnx"]) as onnx_model, open_model(digits["tflite"]) as tflite_model:
        # skl2onnx adds a label output before the probabilities.
        assert [o.name for o in onnx_model.spec.outputs] == ["label", "probabilities"]
        onnx_probs = onnx_model.predict({"x": x})["probabilities"]
        tflite_probs = tflite_model.predict({"x": x})["probabilities"]
    np.testing.assert_allclose(onnx_probs, tflite_probs, atol=1e-5)


def test_conv_example_model_takes_one_224_image(tmp_path: Path) -> None:
    make_model = _function("conv/conv.py", "make_model")
    with open_model(make_model(tmp_path / "conv.onnx")) as model:
        logits = model.predict({"x": np.zeros((1, 3, 224, 224), np.float32)})["logits"]
    assert logits.shape == (1, 1000)
