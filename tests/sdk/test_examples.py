"""The examples run, and what they claim holds: trained digits survive int8."""

from __future__ import annotations

import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdk.build.datasets import load_dataset
from sdk.build.evaluate import Gates, evaluate, open_model
from sdk.build.quantize import quantize

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
    onnx_probs = open_model(digits["onnx"]).run({"x": x})
    tflite_probs = open_model(digits["tflite"]).run({"x": x})
    # skl2onnx puts the label output first; the probabilities follow.
    np.testing.assert_allclose(onnx_probs[1], tflite_probs[0], atol=1e-5)


def test_conv_example_model_takes_one_224_image(tmp_path: Path) -> None:
    make_model = _function("conv/conv.py", "make_model")
    runner = open_model(make_model(tmp_path / "conv.onnx"))
    (logits,) = runner.run({"x": np.zeros((1, 3, 224, 224), np.float32)})
    assert logits.shape == (1, 1000)
