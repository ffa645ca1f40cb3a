"""ONNX quantization with onnxruntime.quantization (see :mod:`sdk.build.quantize`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError
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


def quantize_onnx(
    src: Path,
    dst: Path,
    *,
    scheme: Scheme,
    calib: Dataset | None,
    per_channel: bool | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """Write the quantized ``src`` to ``dst``; the details for the manifest.

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
    if scheme == "dynamic":
        _dynamic(src, dst, bool(per_channel), details)
    else:
        assert calib is not None  # checked by quantize()
        _static(src, dst, calib, per_channel=per_channel, progress=progress, details=details)
    details.update(_check_opset(dst))
    check_loads(dst, "onnxruntime", version)
    return details


def _call(fn: Callable[[], object]) -> None:
    try:
        fn()
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise QuantizationError(f"onnxruntime quantization failed: {exc}") from exc


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
    per_channel: bool | None,
    progress: Progress | None,
    details: dict[str, Any],
) -> None:
    """Static QDQ; with ``per_channel`` None both variants, and the better one is kept."""
    with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as tmp:
        work = Path(tmp)
        model_in = _pre_process(src, work / "pre.onnx", details)
        dtypes = {s.name: np.dtype(s.dtype) for s in read_signature(model_in)[1]}
        check_inputs(calib, list(dtypes))
        choices = [per_channel] if per_channel is not None else [False, True]
        candidates: dict[bool, Path] = {}
        for n, pc in enumerate(choices):
            out = work / f"static-{'pc' if pc else 'pt'}.onnx"
            try:
                _quantize_static(
                    model_in,
                    out,
                    calib,
                    dtypes=dtypes,
                    per_channel=pc,
                    progress=part(progress, n, len(choices)),
                )
            except QuantizationError as exc:
                if per_channel is not None or not pc:
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
        format="QDQ",
        activation_type="int8",
        per_channel=chosen,
        calibration_method="minmax",
        calibration_samples=len(calib),
    )


def _pre_process(src: Path, out: Path, details: dict[str, Any]) -> Path:
    """Shape inference + graph optimisation that onnxruntime recommends before static."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415 - loaded when used

    try:
        quant_pre_process(str(src), str(out))
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
    per_channel: bool,
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
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # S8S8 QDQ: onnxruntime's recommended default; U8S8 can saturate on AVX2.
            activation_type=QuantType.QInt8,
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
