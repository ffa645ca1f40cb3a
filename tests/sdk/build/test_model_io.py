"""Model files on the build side: their spec read from the file, run as a device runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.errors import ConfigError
from agent.serve.runtimes import InputPolicy, load_model_file
from sdk.build.datasets import Dataset
from sdk.build.model_io import model_spec, open_model, run_dataset
from tests.support.models import make_onnx_mlp, make_tflite_int8_mlp, mlp_reference, mlp_weights


def _batch_of_one(path: Path) -> Path:
    """The test MLP exported with a fixed batch of 1, as some converters do."""
    model = onnx.load(str(make_onnx_mlp(path)))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    return path


def test_the_spec_comes_from_the_file_with_its_int8_quantization(tmp_path: Path) -> None:
    spec = model_spec(make_tflite_int8_mlp(tmp_path / "int8.tflite"))
    assert spec.format == "tflite"
    assert spec.file == "int8.tflite"
    ((x,), (probs,)) = spec.inputs, spec.outputs
    assert (x.name, x.dtype, x.shape) == ("x", "int8", (None, 64))
    assert x.quantization is not None
    assert (x.quantization.scale, x.quantization.zero_point) == pytest.approx((0.05, 0))
    assert probs.quantization is not None


def test_a_model_exported_for_a_batch_of_one_runs_sample_by_sample(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    with open_model(_batch_of_one(tmp_path / "one.onnx")) as model:
        assert model.spec.inputs[0].shape == (1, 64)
        (probs,) = run_dataset(model, Dataset({"x": x}))
    assert probs.shape == (7, 10)
    np.testing.assert_allclose(probs, mlp_reference(x, mlp_weights(64, 32, 10, 0)), atol=1e-5)


def test_batches_stay_within_the_models_input_policy(tmp_path: Path) -> None:
    path = make_onnx_mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
    small = InputPolicy(max_elements=3 * 64)  # a request may carry 3 samples at most
    with load_model_file(model_spec(path), path, "onnxruntime", policy=small) as model:
        (probs,) = run_dataset(model, Dataset({"x": x}), batch_size=64)
    np.testing.assert_allclose(probs, mlp_reference(x, mlp_weights(64, 32, 10, 0)), atol=1e-5)


def test_a_file_the_runtime_cannot_load_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        open_model(path)


def test_an_empty_data_set_is_a_config_error(tmp_path: Path) -> None:
    with (
        open_model(make_onnx_mlp(tmp_path / "mlp.onnx")) as model,
        pytest.raises(ConfigError, match="empty"),
    ):
        run_dataset(model, Dataset({"x": np.zeros((0, 64), np.float32)}))
