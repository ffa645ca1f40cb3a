"""TFLite quantization with litert-quantizer (see :mod:`sdk.build.quantize`)."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.manifest import QuantParams
from agent.errors import ConfigError
from agent.plumbing.files import atomic_write
from sdk.build._quantize_common import (
    CHOICE_SAMPLES,
    KNOWN_BAD_RECIPES,
    Scheme,
    check_inputs,
    check_loads,
    choose_per_channel,
    part,
    samples,
    tool_version,
)
from sdk.build._tflite_prep import SIGNATURE_KEY, float32_weights, with_signature
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import read_signature
from sdk.errors import QuantizationError

# One quantized flatbuffer and the recipe that made it.
Candidate = tuple[bytes, list[Any]]


def quantize_tflite(
    src: Path,
    dst: Path,
    *,
    scheme: Scheme,
    calib: Dataset | None,
    targets: Sequence[str],
    per_channel: bool | None,
    progress: Progress | None,
) -> tuple[dict[str, Any], dict[str, QuantParams], dict[str, QuantParams]]:
    """Write the quantized ``src`` to ``dst``: the details for the manifest, and the scale
    and zero point of each model input and output that became an integer tensor.

    Raises:
        ConfigError: a recipe known to be wrong on one of ``targets``, or calibration data
            that does not fit the model.
        QuantizationError: the quantizer failed, or its output does not load.
    """
    bad_pc = KNOWN_BAD_RECIPES.get(("tflite", scheme, "per-channel"), frozenset())
    bad_targets = sorted(bad_pc & set(targets))
    if per_channel is True and bad_targets:
        raise ConfigError(
            f"per-channel {scheme} TFLite quantization computes wrong results on"
            f" {', '.join(bad_targets)}; drop that target or let edgeship pick per-tensor"
            " weights (omit the per-channel option)"
        )
    version = tool_version("litert-quantizer")
    details: dict[str, Any] = {
        "tool": "litert-quantizer",
        "tool_version": version,
        "targets": sorted(targets),
    }
    with tempfile.TemporaryDirectory(prefix="edgeship-prep-") as tmp:
        src = _prepared(src, Path(tmp), scheme, details)
        if scheme == "static":
            assert calib is not None  # checked by quantize()
            chosen, (model, recipe) = _static(src, calib, per_channel, progress, details)
        else:
            # Per-channel is the quantizer's default and the better one where it is right.
            chosen = per_channel if per_channel is not None else not bad_targets
            model, recipe = _run_quantizer(src, scheme, chosen, None, progress)
            if bad_targets and not chosen:
                details["recipe_reason"] = (
                    f"per-tensor weights: per-channel {scheme} is wrong on {', '.join(bad_targets)}"
                )
    details.update(per_channel=chosen, recipe=recipe)
    atomic_write(dst, model)
    check_loads(dst, "litert", tool_version("ai-edge-litert"))
    _, inputs, outputs = read_signature(dst)
    return (
        details,
        {s.name: s.quantization for s in inputs if s.quantization is not None},
        {s.name: s.quantization for s in outputs if s.quantization is not None},
    )


def _prepared(src: Path, work: Path, scheme: Scheme, details: dict[str, Any]) -> Path:
    """``src`` made quantizable (:mod:`sdk.build._tflite_prep`): float16 weights as float32,
    and for static a signature to calibrate through; what was done goes in ``details``.

    Raises:
        QuantizationError: the flatbuffer cannot be read.
    """
    try:
        widened = float32_weights(src, work / "float32.tflite")
        if widened:
            details["float16_weights_converted"] = widened
            src = work / "float32.tflite"
        if scheme == "static" and with_signature(src, work / "signed.tflite"):
            details["signature_added"] = SIGNATURE_KEY
            src = work / "signed.tflite"
    except (ValueError, IndexError, AttributeError) as exc:
        raise QuantizationError(f"cannot read {src.name} as a TFLite model: {exc}") from None
    return src


def _static(
    src: Path,
    calib: Dataset,
    per_channel: bool | None,
    progress: Progress | None,
    details: dict[str, Any],
) -> tuple[bool, Candidate]:
    """Static int8 I/O; with ``per_channel`` None both variants, and the better one is kept."""
    choices = [per_channel] if per_channel is not None else [False, True]
    models = {
        pc: _run_quantizer(src, "static", pc, calib, part(progress, n, len(choices)))
        for n, pc in enumerate(choices)
    }
    chosen = choices[0]
    if len(models) == 2:
        with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as tmp:
            paths = {pc: Path(tmp) / f"{pc}.tflite" for pc in models}
            for pc, (model, _) in models.items():
                paths[pc].write_bytes(model)
            chosen = choose_per_channel(src, paths, calib.take(CHOICE_SAMPLES), details)
    details.update(calibration_samples=len(calib), io_type="int8")
    return chosen, models[chosen]


def _run_quantizer(
    src: Path,
    scheme: Scheme,
    per_channel: bool,
    calib: Dataset | None,
    progress: Progress | None,
) -> Candidate:
    from litert_quantizer import qtyping, quantizer  # noqa: PLC0415 - loaded when used

    gran = (
        qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    )
    qt = quantizer.Quantizer(str(src))
    ops = qtyping.TFLOperationName.ALL_SUPPORTED
    if scheme == "dynamic":
        qt.add_dynamic_config(".*", ops, num_bits=8, granularity=gran)
    elif scheme == "weight-only":
        qt.add_weight_only_config(".*", ops, num_bits=8, granularity=gran)
    else:
        qt.add_static_config(
            ".*", ops, activation_num_bits=8, weight_num_bits=8, weight_granularity=gran
        )
    try:
        # The quantizer builds interpreters that preserve all tensors (it warns about
        # memory) and draws tqdm bars on stderr; our caller shows its own progress.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)
            calibration_result = None
            if qt.need_calibration:
                assert calib is not None
                calibration_result = _calibrate(qt, src, calib, progress)
            result = qt.quantize(calibration_result, enable_progress_report=False)
    except (ValueError, RuntimeError, KeyError, TypeError, NotImplementedError) as exc:
        raise QuantizationError(f"litert-quantizer failed on {src}: {exc}") from exc
    if result.quantized_model is None:
        raise QuantizationError(f"litert-quantizer produced no model for {src}")
    # The recipe holds str-valued enums: a JSON round trip makes it plain data.
    recipe = json.loads(json.dumps(result.recipe))
    return bytes(result.quantized_model), recipe


def _calibrate(qt: Any, src: Path, calib: Dataset, progress: Progress | None) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - loaded when used
    from litert_quantizer import calibrator, recipe_manager  # noqa: PLC0415 - loaded when used
    from litert_quantizer.utils import qsv_utils  # noqa: PLC0415 - loaded when used

    # The calibrator feeds the model through its signature: this interpreter only reads
    # the signature's argument names, it never runs the model.
    interp = Interpreter(model_path=str(src))
    signatures = interp.get_signature_list()
    key = next(iter(signatures))
    runner_inputs = interp.get_signature_runner(key).get_input_details()
    # Data sets are keyed by tensor name; the calibrator wants signature argument names.
    by_tensor = {d["name"]: arg for arg, d in runner_inputs.items()}
    dtypes = {arg: np.dtype(d["dtype"]) for arg, d in runner_inputs.items()}
    check_inputs(calib, list(by_tensor))
    renamed = Dataset({by_tensor[k]: calib.inputs[k] for k in by_tensor}, None, calib.source)
    calibration_samples = list(samples(renamed, dtypes, progress))
    # Quantizer.calibrate() merges per-sample ranges with a moving average, which on
    # one-sample steps tracks a typical sample's range, not the set's: outputs then
    # saturate (measured: top-1 agreement 0.92 vs 0.99 on a test MLP). Use the set's
    # true min/max, as onnxruntime's MinMax calibration does.
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(qt.get_quantization_recipe())
    cal = calibrator.Calibrator(src.read_bytes(), qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({key: calibration_samples}, rm)
    result: dict[str, Any] = cal.get_model_qsvs()
    return result
