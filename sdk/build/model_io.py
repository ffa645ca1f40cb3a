"""Read a model's I/O signature from the model file itself (ONNX or .tflite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import ConfigError
from agent.bundle.manifest import QuantParams, TensorSpec

__all__ = ["ModelFormat", "detect_format", "read_signature"]

ModelFormat = Literal["onnx", "tflite"]

# onnx.TensorProto element types -> manifest dtypes
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}


def detect_format(path: Path) -> ModelFormat:
    """``onnx`` or ``tflite`` from the file's content. Raises: ConfigError for anything else."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ConfigError(f"cannot read model {path}: {exc.strerror}") from None
    if head[4:8] == b"TFL3":
        return "tflite"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ConfigError(f"model {path} must be a .onnx or .tflite file (ONNX or TFLite flatbuffer)")


def read_signature(
    path: Path,
) -> tuple[ModelFormat, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's format, inputs and outputs, with dynamic dimensions as ``None``.

    Raises:
        ConfigError: the file cannot be parsed as a model.
    """
    fmt = detect_format(path)
    if fmt == "onnx":
        return fmt, *_onnx_signature(path)
    return fmt, *_tflite_signature(path)


def _onnx_signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx  # noqa: PLC0415 - build-side dependency, loaded only when needed

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises bare protobuf errors
        raise ConfigError(f"{path} is not a readable ONNX model: {exc}") from None
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            raise ConfigError(
                f"ONNX tensor {value.name!r} has unsupported element type {t.elem_type}"
            )
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in t.shape.dim
        )
        return TensorSpec(name=value.name, dtype=dtype, shape=dims)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    return inputs, outputs


def _tflite_signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - loaded only when needed

    try:
        interpreter = Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path} is not a loadable TFLite model: {exc}") from None

    def spec(d: dict[str, Any]) -> TensorSpec:
        dtype = np.dtype(d["dtype"]).name
        signature = d.get("shape_signature")
        shape_src = signature if signature is not None and len(signature) else d["shape"]
        dims = tuple(int(x) if int(x) > 0 else None for x in shape_src)
        quant = None
        scale, zero_point = d.get("quantization", (0.0, 0))
        if dtype in ("int8", "uint8", "int16") and scale:
            quant = QuantParams(scale=float(scale), zero_point=int(zero_point))
        return TensorSpec(name=d["name"], dtype=dtype, shape=dims, quantization=quant)

    inputs = tuple(spec(d) for d in interpreter.get_input_details())
    outputs = tuple(spec(d) for d in interpreter.get_output_details())
    return inputs, outputs
