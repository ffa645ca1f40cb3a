"""Quantize a float model: ONNX with onnxruntime.quantization, TFLite with litert-quantizer.

Schemes (the manifest's ``quantization.scheme``):

* ``none``: the model is copied unchanged.
* ``dynamic``: int8 weights, activations quantized on the fly at run time. ONNX: only
  MatMul/Gemm-like ops (onnxruntime's dynamic ``ConvInteger`` is several times *slower*
  than float convolution on x86, measured); TFLite: every supported op.
* ``weight-only``: int8 weights dequantized to float before the op (TFLite only; ONNX has
  no weight-only int8 format that onnxruntime executes faster or smaller than dynamic).
* ``static``: int8 weights and activations, ranges from the calibration set's min/max.
  ONNX: S8S8 QDQ after ``quant_pre_process``; TFLite: the model's inputs and outputs
  become int8 and their scale / zero point are returned so the manifest can record them.

Per-channel weights: with ``per_channel=None`` (the default) static quantization is done
both per tensor and per channel, and per channel is kept only if its outputs are at
least 10% closer to the float model's (mean abs error on up to 64 calibration samples,
both models run through the agent's runtime layer as a device runs them): it costs size
and, on x86, speed. Both errors are recorded in the details.

The formats' quantizers live in :mod:`sdk.build._quantize_onnx` and
:mod:`sdk.build._quantize_tflite`.

Recipes per target runtime: litert-quantizer's per-channel dynamic recipe computes wrong
results on tflite-runtime 2.14, so when ``targets`` include ``tflite-runtime`` dynamic
TFLite quantization uses per-tensor weights, and asking for per-channel is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle.manifest import Quantization, QuantParams
from agent.errors import ConfigError
from sdk.build._quantize_common import KNOWN_BAD_RECIPES, SCHEMES, Scheme
from sdk.build._quantize_onnx import Recipe, quantize_onnx
from sdk.build._quantize_tflite import quantize_tflite
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import ModelFormat, detect_format

__all__ = [
    "DEFAULT_MAX_CALIBRATION_SAMPLES",
    "KNOWN_BAD_RECIPES",
    "SCHEMES",
    "QuantizationResult",
    "Scheme",
    "quantize",
]

# Calibration cost grows linearly; min/max ranges stop moving long before this.
DEFAULT_MAX_CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class QuantizationResult:
    """What :func:`quantize` wrote and how; ``details`` is JSON-ready for the manifest."""

    scheme: Scheme
    format: ModelFormat
    path: Path
    calibration_sha256: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    # Model inputs / outputs that became int8 (static TFLite): real = scale * (q - zp).
    input_quantization: Mapping[str, QuantParams] = field(default_factory=dict)
    output_quantization: Mapping[str, QuantParams] = field(default_factory=dict)

    def to_manifest(self) -> Quantization:
        """The manifest's ``quantization`` section."""
        return Quantization(
            scheme=self.scheme, calibration_sha256=self.calibration_sha256, details=self.details
        )


def quantize(
    model_path: Path | str,
    out_path: Path | str,
    *,
    scheme: Scheme,
    calibration: Dataset | None = None,
    targets: Sequence[str] = (),
    per_channel: bool | None = None,
    max_calibration_samples: int = DEFAULT_MAX_CALIBRATION_SAMPLES,
    progress: Progress | None = None,
    recipe: Recipe | None = None,
) -> QuantizationResult:
    """Write a quantized copy of ``model_path`` to ``out_path``.

    ``calibration`` is required for ``static`` (and ignored otherwise); it must be keyed
    by the model's input names (see :meth:`Dataset.bind`) and its digest (of the samples
    used, at most ``max_calibration_samples``) is recorded. ``targets`` are the runtimes
    the bundle declares (``onnxruntime``, ``litert``, ``tflite-runtime``).
    ``per_channel=None`` chooses by measurement. ``recipe`` fixes the static ONNX recipe
    (:class:`sdk.build._quantize_onnx.Recipe`; ignored for TFLite).

    Raises:
        ConfigError: unknown scheme, a scheme the format does not support, missing
            calibration data, or a recipe known to be wrong on a declared target.
        QuantizationError: the quantizer failed or its output does not load.
    """
    src, dst = Path(model_path), Path(out_path)
    if not src.is_file():
        raise ConfigError(f"model {src} does not exist")
    fmt = detect_format(src)
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {list(SCHEMES)}")
    if scheme == "static" and calibration is None:
        raise ConfigError("static quantization needs a calibration data set (--calibration)")
    if calibration is not None and len(calibration) == 0:
        raise ConfigError(f"calibration data set {calibration.source} is empty")
    calib = None if calibration is None else calibration.take(max_calibration_samples)
    # Only static quantization reads the data: recording it for others would mislead.
    digest = calib.sha256 if calib is not None and scheme == "static" else None
    dst.parent.mkdir(parents=True, exist_ok=True)

    if scheme == "none":
        shutil.copyfile(src, dst)
        return QuantizationResult("none", fmt, dst, None, {"tool": None})
    if fmt == "onnx":
        details = quantize_onnx(
            src,
            dst,
            scheme=scheme,
            calib=calib,
            per_channel=per_channel,
            progress=progress,
            recipe=recipe,
        )
        return QuantizationResult(scheme, fmt, dst, digest, details)
    details, in_q, out_q = quantize_tflite(
        src,
        dst,
        scheme=scheme,
        calib=calib,
        targets=targets,
        per_channel=per_channel,
        progress=progress,
    )
    return QuantizationResult(scheme, fmt, dst, digest, details, in_q, out_q)
