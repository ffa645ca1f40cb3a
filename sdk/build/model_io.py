"""Model files: their format and I/O signature, read from the file itself (ONNX or .tflite),
and loading them through the agent's own runtime layer.

Everything the build measures (evaluation, golden outputs, the choice of a quantization
recipe) runs a model through :func:`open_model`: an :class:`agent.serve.runtimes.Model`,
with the device's input validation and its int8 quantize / dequantize, so what the build
measures is what a device computes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import FORMAT_RUNTIMES, ModelSpec, QuantParams, TensorSpec
from agent.errors import ConfigError, HealthCheckError
from agent.serve.runtimes import Model, RuntimeOptions, load_model_file
from sdk.build.datasets import Dataset

__all__ = [
    "ModelFormat",
    "detect_format",
    "model_spec",
    "open_model",
    "read_signature",
    "run_dataset",
]

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


def model_spec(path: Path) -> ModelSpec:
    """The model section a manifest would hold for the file ``path`` (named by its file name).

    Raises:
        ConfigError: the file cannot be parsed as a model.
    """
    fmt, inputs, outputs = read_signature(path)
    return ModelSpec(format=fmt, file=path.name, inputs=inputs, outputs=outputs)


def open_model(
    path: Path | str,
    *,
    runtime: str | None = None,
    threads: int = 1,
    reference_kernels: bool = False,
    request_elements: int | None = None,
    provider: str | None = None,
) -> Model:
    """Load a .onnx or .tflite file as a device runs it; close it when done.

    Args:
        path: the model file.
        runtime: default ``onnxruntime`` for ONNX, ``litert`` for TFLite.
        threads: intra-op threads; 0 is the agent's default (one thread for small models,
            the runtime's default otherwise: :class:`agent.serve.runtimes.RuntimeOptions`).
        reference_kernels: run the runtime's reference kernels, a second implementation of
            the same arithmetic (see :class:`~agent.serve.runtimes.RuntimeOptions`).
        request_elements: input elements of a real request, as the manifest will carry
            them: the agent's default threads depend on it where inputs are dynamic.
        provider: the execution provider (onnxruntime) or delegate (TFLite) to run on, as
            a device's ``agent.toml`` names it; default: what the runtime runs on by default.

    Raises:
        ConfigError: not a model file, or the runtime cannot load it (on ``provider``).
        RuntimeUnavailableError: the runtime (or ``provider``) is not installed.
    """
    p = Path(path)
    spec = replace(model_spec(p), request_elements=request_elements)
    chosen = () if provider is None else (provider,)
    options = RuntimeOptions(
        threads=threads or None,
        reference_kernels=reference_kernels,
        providers=chosen if spec.format == "onnx" else (),
        delegates=chosen if spec.format == "tflite" else (),
    )
    try:
        return load_model_file(spec, p, runtime or FORMAT_RUNTIMES[spec.format][0], options)
    except HealthCheckError as exc:  # for a file on the build machine, not a device's check
        raise ConfigError(str(exc)) from exc


def run_dataset(model: Model, data: Dataset, batch_size: int = 64) -> list[npt.NDArray[Any]]:
    """``model``'s outputs on every sample of ``data``, in the model's output order.

    Batches hold at most ``batch_size`` samples and stay within the model's input policy;
    a model exported for a batch of 1 runs sample by sample.

    Raises:
        ConfigError: ``data`` is empty or lacks one of the model's inputs.
        InputValidationError: the samples do not fit the model's inputs.
        InferenceError: the runtime failed.
    """
    if len(data) == 0:
        raise ConfigError(f"data set {data.source} is empty")
    bound = data.bind([s.name for s in model.spec.inputs])
    per_sample = sum(math.prod(a.shape[1:]) for a in bound.inputs.values())
    if any(s.shape[:1] == (1,) for s in model.spec.inputs):
        batch_size = 1
    batch_size = max(1, min(batch_size, model.policy.max_elements // max(per_sample, 1)))
    parts = [model.predict(batch) for batch in bound.batches(batch_size)]
    return [np.concatenate([p[o.name] for p in parts]) for o in model.spec.outputs]
