"""ONNX quantization with onnxruntime.quantization (see :mod:`sdk.build.quantize`)."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError
from sdk.build._coverage import MIN_WEIGHT_ELEMENTS
from sdk.build._quantize_common import (
    CHOICE_SAMPLES,
    Scheme,
    check_inputs,
    check_loads,
    choose_per_channel,
    part,
    samples,
    tool_version,
)
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import read_signature
from sdk.errors import QuantizationError

# onnxruntime opset / IR ceilings: newer files are refused by the runtimes we support.
_MAX_ONNX_OPSET = 21
_MAX_ONNX_IR = 10
_ONNX_DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM")
# The ops whose int8 kernels carry the speed-up; the rest (Add, Mul, Concat, Resize...)
# cost a quantize/dequantize pair each in QDQ form and often run slower than in float.
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class Recipe:
    """One point of onnxruntime's static recipe space."""

    format: str = "QDQ"  # or "QOperator"
    activation: str = "int8"  # or "uint8"
    per_channel: bool = False
    op_types: tuple[str, ...] | None = None  # None: every op onnxruntime quantizes

    @property
    def name(self) -> str:
        ops = "all ops" if self.op_types is None else "+".join(self.op_types)
        grain = "per-channel" if self.per_channel else "per-tensor"
        return f"{self.format} {self.activation} activations, {grain}, {ops}"


def alternate_recipes(per_channel: bool) -> list[Recipe]:
    """What to try, in order, when the default recipe (QDQ, int8 activations, every op)
    does not pay: fewer quantized ops first (no quantize/dequantize pairs around cheap
    ops), then the QOperator format (fused integer kernels), then uint8 activations."""
    compute = _COMPUTE_OPS
    return [
        Recipe(per_channel=per_channel, op_types=compute),
        Recipe(per_channel=not per_channel, op_types=compute),
        Recipe("QOperator", "uint8", per_channel, compute),
        Recipe("QOperator", "uint8", per_channel),
        Recipe("QDQ", "uint8", per_channel),
    ]


def quantize_onnx(
    src: Path,
    dst: Path,
    *,
    scheme: Scheme,
    calib: Dataset | None,
    per_channel: bool | None,
    progress: Progress | None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Write the quantized ``src`` to ``dst``; the details for the manifest. A static
    ``recipe`` is used as it is; without one, the default recipe with per-channel
    chosen by measurement (or as ``per_channel`` says).

    Raises:
        ConfigError: weight-only (no ONNX format for it), or calibration data that does
            not fit the model.
        QuantizationError: the quantizer failed, or its output is too new or does not load.
    """
    if scheme == "weight-only":
        raise ConfigError(
            "weight-only quantization is available for .tflite models only; for ONNX use"
            " --quantize dynamic (int8 weights, float activations) or static"
        )
    version = tool_version("onnxruntime")
    details: dict[str, Any] = {
        "tool": "onnxruntime.quantization",
        "tool_version": version,
        "weight_type": "int8",
    }
    with tempfile.TemporaryDirectory(prefix="edgeship-fold-") as tmp, _tool_log(details):
        model_in = _fold_constants(src, Path(tmp) / "folded.onnx", details)
        if scheme == "dynamic":
            _dynamic(model_in, dst, bool(per_channel), details)
        else:
            assert calib is not None  # checked by quantize()
            _static(
                model_in,
                dst,
                calib,
                recipe=recipe or Recipe(per_channel=bool(per_channel)),
                choose=recipe is None and per_channel is None,
                progress=progress,
                details=details,
            )
    details.update(_check_opset(dst))
    check_loads(dst, "onnxruntime", version)
    return details


@contextlib.contextmanager
def _tool_log(details: dict[str, Any]) -> Iterator[None]:
    """Keep what onnxruntime.quantization logs in ``details`` instead of on stderr.

    It gives advice through the root logger ("WARNING:root:Please consider to run
    pre-processing..."), which is noise in a build's output and, since ``logging.warning``
    configures the root logger when it has no handler, in everything the process logs
    after. A guard handler stops that; a filter takes the tool's records.
    """
    root = logging.getLogger()
    kept: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        kept.append(record.getMessage()[:200])
        return False

    guard = logging.NullHandler()
    root.addFilter(keep)
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeFilter(keep)
        root.removeHandler(guard)
        if kept:
            details["tool_log"] = sorted(set(kept))


def _fold_constants(src: Path, out: Path, details: dict[str, Any]) -> Path:
    """``src`` with the weights of its Constant nodes moved into initializers, written to
    ``out`` (``src`` itself when it has none): onnxruntime's quantizers only quantize
    initializers, and some exporters put every weight in a Constant node."""
    import onnx  # noqa: PLC0415 - loaded when used

    model = onnx.load(str(src))
    keep, folded = [], 0
    for node in model.graph.node:
        value = (
            node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        )
        if (
            value is not None
            and value.name == "value"
            and value.type == onnx.AttributeProto.TENSOR
            and math.prod(value.t.dims) >= MIN_WEIGHT_ELEMENTS
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            folded += 1
        else:
            keep.append(node)
    if not folded:
        return src
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(out))
    details["folded_constants"] = folded
    return out


def _runtime_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exceptions (Fail, InvalidArgument...): they derive from
    Exception only, and calibration runs the model, so a wrong input shape raises one."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # noqa: PLC0415

    return tuple(
        v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
    )


def _call(fn: Callable[[], object]) -> None:
    caught: tuple[type[Exception], ...] = (
        *(ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError),
        *_runtime_errors(),
    )
    try:
        fn()
    except caught as exc:
        # AttributeError / IndexError: its graph walks on exports it does not expect
        # (QOperator on PaddleOCR's detector: "'NoneType' object has no attribute ...").
        what = " ".join(str(exc).split())[:400]
        raise QuantizationError(
            f"onnxruntime quantization failed: {type(exc).__name__}: {what}; if it ran the"
            " model, check that the calibration data fits its inputs"
        ) from exc
    except AssertionError as exc:
        # Its internal checks: "scale issue" is a calibration range that is not finite.
        raise QuantizationError(
            f"onnxruntime quantization failed its own check ({exc or 'assertion'}); a"
            " calibration range may be NaN or infinite: check the calibration data, or try"
            " another scheme"
        ) from exc


def _dynamic(src: Path, dst: Path, per_channel: bool, details: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415 - loaded when used

    _call(
        lambda: quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(_ONNX_DYNAMIC_OPS),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
    )
    details.update(op_types=list(_ONNX_DYNAMIC_OPS), per_channel=per_channel)


def _static(
    src: Path,
    dst: Path,
    calib: Dataset,
    *,
    recipe: Recipe,
    choose: bool,
    progress: Progress | None,
    details: dict[str, Any],
) -> None:
    """Static quantization with ``recipe``; with ``choose``, per-tensor and per-channel
    both, and the more faithful one is kept."""
    with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as tmp:
        work = Path(tmp)
        model_in = _pre_process(src, work / "pre.onnx", details)
        dtypes = {s.name: np.dtype(s.dtype) for s in read_signature(model_in)[1]}
        check_inputs(calib, list(dtypes))
        choices = [False, True] if choose else [recipe.per_channel]
        candidates: dict[bool, Path] = {}
        for n, pc in enumerate(choices):
            out = work / f"static-{'pc' if pc else 'pt'}.onnx"
            try:
                _quantize_static(
                    model_in,
                    out,
                    calib,
                    dtypes=dtypes,
                    recipe=replace(recipe, per_channel=pc),
                    progress=part(progress, n, len(choices)),
                )
                # Per-channel QDQ on an opset-12 export (PaddlePaddle's) writes a
                # DequantizeLinear with an axis, which needs opset 13: it does not load.
                check_loads(out, "onnxruntime", tool_version("onnxruntime"))
            except QuantizationError as exc:
                if not choose or not pc:
                    raise
                # onnxruntime 1.32's per-channel bias adjustment fails on 2-D biases
                # (skl2onnx MatMul+Add): keep the per-tensor model, say why.
                details["per_channel_skipped"] = str(exc)[:200]
                continue
            candidates[pc] = out
        chosen = choices[0]
        if len(candidates) == 2:
            chosen = choose_per_channel(src, candidates, calib.take(CHOICE_SAMPLES), details)
        shutil.copyfile(candidates[chosen], dst)
    details.update(
        format=recipe.format,
        activation_type=recipe.activation,
        per_channel=chosen,
        op_types="all" if recipe.op_types is None else list(recipe.op_types),
        calibration_method="minmax",
        calibration_samples=len(calib),
    )


def _pre_process(src: Path, out: Path, details: dict[str, Any]) -> Path:
    """Shape inference + graph optimisation that onnxruntime recommends before static."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415 - loaded when used

    try:
        # When its symbolic shape inference gives up, it saves sym_shape_infer_temp.onnx
        # and a uuid-named .data file into the working directory: make that a scratch one.
        with contextlib.chdir(out.parent):
            quant_pre_process(str(src.resolve()), str(out.resolve()))
    except Exception as exc:  # noqa: BLE001 - an optional optimisation: fall back, and say so
        details["pre_process"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
        return src
    details["pre_process"] = "quant_pre_process"
    return out


def _quantize_static(
    src: Path,
    dst: Path,
    calib: Dataset,
    *,
    dtypes: Mapping[str, np.dtype[Any]],
    recipe: Recipe,
    progress: Progress | None,
) -> None:
    from onnxruntime.quantization import (  # noqa: PLC0415 - loaded when used
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = samples(calib, dtypes, progress)

        def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
            return next(self._it, None)

    _call(
        lambda: quantize_static(
            src,
            dst,
            _Reader(),
            quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=None if recipe.op_types is None else list(recipe.op_types),
            per_channel=recipe.per_channel,
            # S8S8 QDQ is onnxruntime's recommended default (U8S8 can saturate on AVX2);
            # the others are alternates the recipe search measures.
            activation_type=QuantType.QInt8 if recipe.activation == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    )


def _check_opset(path: Path) -> dict[str, int]:
    """The quantized model's opset and IR version, refused when onnxruntime cannot load them.

    Raises:
        QuantizationError: newer than :data:`_MAX_ONNX_OPSET` / :data:`_MAX_ONNX_IR`.
    """
    import onnx  # noqa: PLC0415 - loaded when used

    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > _MAX_ONNX_OPSET or model.ir_version > _MAX_ONNX_IR:
        raise QuantizationError(
            f"quantized model has opset {opset} / IR {model.ir_version}, newer than"
            f" onnxruntime accepts ({_MAX_ONNX_OPSET} / {_MAX_ONNX_IR}); export the float"
            " model with a lower opset"
        )
    return {"opset": opset, "ir_version": int(model.ir_version)}
