"""Model's own logic, over an in-memory backend: what reaches the runtime, and what comes back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.bundle.manifest import ModelSpec, QuantParams, TensorSpec
from agent.errors import InferenceError, InputValidationError, MalformedManifestError
from agent.serve._model import Model


class RecordingBackend:
    """Records each feed; answers with fixed outputs or raises."""

    runtime = "fake"
    provider = "fake-cpu"
    errors: tuple[type[BaseException], ...] = (RuntimeError,)

    def __init__(self, outputs: list[np.ndarray], fail: BaseException | None = None) -> None:
        self.outputs = outputs
        self.fail = fail
        self.feeds: list[dict[str, np.ndarray]] = []
        self.closed = False

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append(feed)
        if self.fail is not None:
            raise self.fail
        return self.outputs

    def close(self) -> None:
        self.closed = True


def spec(q_in: QuantParams | None = None, q_out: QuantParams | None = None) -> ModelSpec:
    dtype_in = "uint8" if q_in else "float32"
    dtype_out = "int8" if q_out else "float32"
    return ModelSpec(
        format="onnx",
        file="m.onnx",
        inputs=(TensorSpec("x", dtype_in, (None, 3), q_in),),
        outputs=(TensorSpec("y", dtype_out, (None, 2), q_out),),
    )


def test_bad_request_never_reaches_the_runtime() -> None:
    backend = RecordingBackend([np.zeros((1, 2), np.float32)])
    model = Model(spec(), backend)
    with pytest.raises(InputValidationError):
        model.predict({"x": np.zeros((1, 4), np.float32)})
    assert backend.feeds == []
    model.predict({"x": np.zeros((1, 3), np.float32)})  # and the model keeps serving
    assert len(backend.feeds) == 1


def test_runtime_failure_becomes_an_inference_error() -> None:
    model = Model(spec(), RecordingBackend([], fail=RuntimeError("kernel exploded")))
    with pytest.raises(InferenceError, match="kernel exploded"):
        model.predict({"x": np.zeros((1, 3), np.float32)})


def test_inputs_are_quantized_with_rounding_and_saturation() -> None:
    backend = RecordingBackend([np.zeros((1, 2), np.float32)])
    model = Model(spec(q_in=QuantParams(scale=0.5, zero_point=128)), backend)
    model.predict({"x": np.array([[0.74, -100.0, 100.0]], np.float32)})
    fed = backend.feeds[0]["x"]
    assert fed.dtype == np.uint8
    # 0.74/0.5 = 1.48 -> 1, +128; -200 +128 -> 0 (saturated); 200 + 128 -> 255 (saturated)
    np.testing.assert_array_equal(fed, [[129, 0, 255]])


def test_outputs_are_dequantized_to_float32() -> None:
    raw = np.array([[-128, 127]], np.int8)
    model = Model(spec(q_out=QuantParams(scale=0.25, zero_point=-128)), RecordingBackend([raw]))
    y = model.predict({"x": np.zeros((1, 3), np.float32)})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[0.0, 63.75]])


def test_quantization_on_a_float_tensor_is_a_malformed_manifest() -> None:
    bad = ModelSpec(
        format="onnx",
        file="m.onnx",
        inputs=(TensorSpec("x", "float32", (None, 3), QuantParams(0.5, 0)),),
        outputs=(TensorSpec("y", "float32", (None, 2)),),
    )
    with pytest.raises(MalformedManifestError, match="float32"):
        Model(bad, RecordingBackend([]))


def test_close_releases_the_backend_and_stops_predictions() -> None:
    backend = RecordingBackend([np.zeros((1, 2), np.float32)])
    with Model(spec(), backend) as model:
        model.predict({"x": np.zeros((1, 3), np.float32)})
    assert backend.closed
    with pytest.raises(InferenceError, match="closed"):
        model.predict({"x": np.zeros((1, 3), np.float32)})


def test_outputs_are_keyed_by_the_manifest_names() -> None:
    outs: list[Any] = [np.ones((1, 2), np.float32)]
    result = Model(spec(), RecordingBackend(outs)).predict({"x": [[1, 2, 3]]})
    assert list(result) == ["y"]
    assert result["y"] is outs[0]
