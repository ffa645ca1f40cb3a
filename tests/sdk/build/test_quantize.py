"""Every quantization scheme on both formats, run in the real runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.errors import ConfigError
from sdk.build import QuantizationResult, quantize
from sdk.build.datasets import Dataset
from sdk.build.model_io import open_model, run_dataset
from tests.support.models import make_onnx_conv, make_onnx_mlp, make_tflite_mlp


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "onnx": make_onnx_mlp(d / "mlp.onnx"),
        "tflite": make_tflite_mlp(d / "mlp.tflite"),
        "conv": make_onnx_conv(d / "conv.onnx", size=32),
    }


@pytest.fixture(scope="module")
def calib() -> Dataset:
    return Dataset({"x": np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)})


@pytest.fixture(scope="module")
def check() -> Dataset:
    return Dataset({"x": np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)})


def _outputs(model: Path, data: Dataset) -> np.ndarray:
    with open_model(model) as m:
        return run_dataset(m, data)[0]


def _agreement(a: Path, b: Path, data: Dataset) -> tuple[float, float]:
    ref, out = _outputs(a, data), _outputs(b, data)
    return float(np.mean(ref.argmax(1) == out.argmax(1))), float(np.abs(ref - out).max())


SCHEMES = [
    ("onnx", "dynamic"),
    ("onnx", "static"),
    ("tflite", "dynamic"),
    ("tflite", "static"),
    ("tflite", "weight-only"),
]


@pytest.mark.parametrize(("fmt", "scheme"), SCHEMES)
def test_quantized_model_runs_smaller_and_close_to_the_float_model(
    tmp_path: Path,
    models: dict[str, Path],
    calib: Dataset,
    check: Dataset,
    fmt: str,
    scheme: str,
) -> None:
    src = models[fmt]
    result = quantize(src, tmp_path / f"q.{fmt}", scheme=scheme, calibration=calib)  # type: ignore[arg-type]
    assert result.scheme == scheme
    # Only static reads the calibration set, so only static records its digest.
    assert result.calibration_sha256 == (calib.sha256 if scheme == "static" else None)
    assert result.path.stat().st_size < 0.6 * src.stat().st_size
    agreement, max_abs = _agreement(src, result.path, check)
    assert agreement >= 0.9
    assert max_abs < 0.1  # softmax outputs: a tenth of the range at worst


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_scheme_none_copies_the_model_unchanged(
    tmp_path: Path, models: dict[str, Path], fmt: str
) -> None:
    result = quantize(models[fmt], tmp_path / f"m.{fmt}", scheme="none")
    assert result.path.read_bytes() == models[fmt].read_bytes()
    assert result.calibration_sha256 is None
    assert result.to_manifest().scheme == "none"


def test_static_tflite_has_int8_io_and_returns_its_quant_params(
    tmp_path: Path, models: dict[str, Path], calib: Dataset
) -> None:
    result = quantize(models["tflite"], tmp_path / "q.tflite", scheme="static", calibration=calib)
    interp = Interpreter(model_path=str(result.path))
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    assert inp["dtype"] == np.int8
    assert out["dtype"] == np.int8
    assert set(result.input_quantization) == {inp["name"]}
    assert set(result.output_quantization) == {out["name"]}
    q_in, q_out = result.input_quantization[inp["name"]], result.output_quantization[out["name"]]
    assert (q_in.scale, q_in.zero_point) == pytest.approx(inp["quantization"])
    assert (q_out.scale, q_out.zero_point) == pytest.approx(out["quantization"])
    # The calibrated input range covers the calibration data (min/max, not an average).
    lo, hi = calib.inputs["x"].min(), calib.inputs["x"].max()
    assert q_in.scale * (-128 - q_in.zero_point) <= lo + q_in.scale
    assert q_in.scale * (127 - q_in.zero_point) >= hi - q_in.scale


@pytest.mark.parametrize("scheme", ["dynamic", "weight-only"])
def test_float_io_schemes_record_no_io_quant_params(
    tmp_path: Path, models: dict[str, Path], scheme: str
) -> None:
    result = quantize(models["tflite"], tmp_path / "q.tflite", scheme=scheme)  # type: ignore[arg-type]
    assert result.input_quantization == {}
    assert result.output_quantization == {}


def _granularities(result: QuantizationResult) -> set[str]:
    return {
        entry["op_config"]["weight_tensor_config"]["granularity"]
        for entry in result.details["recipe"]
    }


def test_dynamic_tflite_uses_per_tensor_weights_when_targeting_tflite_runtime(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    result = quantize(
        models["tflite"],
        tmp_path / "q.tflite",
        scheme="dynamic",
        targets=["litert", "tflite-runtime"],
    )
    assert result.details["per_channel"] is False
    assert _granularities(result) == {"TENSORWISE"}
    assert "tflite-runtime" in result.details["recipe_reason"]


def test_dynamic_tflite_keeps_per_channel_weights_for_litert_only(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    result = quantize(models["tflite"], tmp_path / "q.tflite", scheme="dynamic", targets=["litert"])
    assert result.details["per_channel"] is True
    assert _granularities(result) == {"CHANNELWISE"}


def test_forcing_per_channel_dynamic_for_tflite_runtime_is_refused(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="wrong results on tflite-runtime"):
        quantize(
            models["tflite"],
            tmp_path / "q.tflite",
            scheme="dynamic",
            targets=["tflite-runtime"],
            per_channel=True,
        )
    assert not (tmp_path / "q.tflite").exists()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_static_per_channel_choice_is_measured_and_recorded(
    tmp_path: Path, models: dict[str, Path], calib: Dataset, fmt: str
) -> None:
    result = quantize(models[fmt], tmp_path / f"q.{fmt}", scheme="static", calibration=calib)
    errors = result.details["per_channel_mean_abs_error"]
    assert set(errors) == {"per-tensor", "per-channel"}
    assert result.details["per_channel"] == (errors["per-channel"] < 0.9 * errors["per-tensor"])


def test_static_onnx_is_qdq_with_an_opset_onnxruntime_accepts(
    tmp_path: Path, models: dict[str, Path], calib: Dataset
) -> None:
    result = quantize(models["onnx"], tmp_path / "q.onnx", scheme="static", calibration=calib)
    model = onnx.load(str(result.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert model.ir_version <= 10
    assert result.details["opset"] <= 21
    assert result.details["format"] == "QDQ"


def test_dynamic_onnx_quantizes_matmuls_but_leaves_convolutions_float(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    result = quantize(models["conv"], tmp_path / "q.onnx", scheme="dynamic")
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "MatMulInteger" in ops
    assert "ConvInteger" not in ops
    assert "Conv" in ops


def test_static_onnx_conv_model_runs_close_to_float(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    images = np.random.default_rng(2).random((12, 3, 32, 32), dtype=np.float32)
    data = Dataset({"x": images})
    result = quantize(models["conv"], tmp_path / "q.onnx", scheme="static", calibration=data)
    ref, out = _outputs(models["conv"], data), _outputs(result.path, data)
    cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cosine.min() > 0.99


def test_static_without_calibration_is_a_config_error(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        quantize(models["onnx"], tmp_path / "q.onnx", scheme="static")


def test_weight_only_onnx_is_refused_with_the_alternatives(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="dynamic"):
        quantize(models["onnx"], tmp_path / "q.onnx", scheme="weight-only")


def test_unknown_scheme_and_format_are_config_errors(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="scheme"):
        quantize(models["onnx"], tmp_path / "q.onnx", scheme="int4")  # type: ignore[arg-type]
    other = tmp_path / "model.pt"
    other.write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"\.onnx or \.tflite"):
        quantize(other, tmp_path / "q.pt", scheme="dynamic")


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_calibration_missing_a_model_input_is_a_config_error(
    tmp_path: Path, models: dict[str, Path], fmt: str
) -> None:
    wrong = Dataset({"pixels": np.zeros((4, 64), np.float32)})
    with pytest.raises(ConfigError, match="lacks model input"):
        quantize(models[fmt], tmp_path / f"q.{fmt}", scheme="static", calibration=wrong)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_calibration_reports_progress_up_to_the_sample_count(
    tmp_path: Path, models: dict[str, Path], calib: Dataset, fmt: str
) -> None:
    seen: list[tuple[str, int, int]] = []
    quantize(
        models[fmt],
        tmp_path / f"q.{fmt}",
        scheme="static",
        calibration=calib.take(20),
        per_channel=False,
        progress=lambda step, done, total: seen.append((step, done, total)),
    )
    assert seen
    assert seen[-1] == ("calibrate", 20, 20)
    assert [d for _, d, _ in seen] == list(range(1, 21))


def test_auto_per_channel_reports_both_calibration_passes_as_one_run(
    tmp_path: Path, models: dict[str, Path], calib: Dataset
) -> None:
    seen: list[tuple[str, int, int]] = []
    quantize(
        models["onnx"],
        tmp_path / "q.onnx",
        scheme="static",
        calibration=calib.take(10),
        progress=lambda step, done, total: seen.append((step, done, total)),
    )
    assert [d for _, d, _ in seen] == list(range(1, 21))
    assert {t for _, _, t in seen} == {20}


def _without_signature(src: Path, dst: Path) -> Path:
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415 - test helper

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    model.signatureDefs = []
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return dst


def test_static_tflite_calibrates_a_model_without_a_signature_def(
    models: dict[str, Path], calib: Dataset, check: Dataset, tmp_path: Path
) -> None:
    bare = _without_signature(models["tflite"], tmp_path / "bare.tflite")
    assert Interpreter(model_path=str(bare)).get_signature_list() == {}
    result = quantize(bare, tmp_path / "q.tflite", scheme="static", calibration=calib)
    assert result.details["signature_added"] == "serving_default"
    agreement = np.mean(
        _outputs(models["tflite"], check).argmax(1) == _outputs(result.path, check).argmax(1)
    )
    assert agreement >= 0.9
