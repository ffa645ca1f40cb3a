"""The build's quantization step: the model file a bundle carries, what quantizing it
changed (refused when it changed (almost) nothing), and whether it pays against fp32 on
this machine (the default gates: not larger, not slower).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy.typing as npt

from agent.bundle.manifest import Quantization
from sdk.build._cases import request_elements
from sdk.build._cost import (
    DEFAULT_MAX_LATENCY_RATIO,
    DEFAULT_MAX_SIZE_RATIO,
    cost_failures,
    fp32_cost,
)
from sdk.build._coverage import MIN_QUANTIZED_SHARE, weight_coverage
from sdk.build._evaluate import Gates
from sdk.build._quantize import QuantizationResult, Scheme
from sdk.build._quantize import quantize as run_quantizer
from sdk.build._quantize_onnx import Recipe
from sdk.build._recipe_search import search_recipes
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import ModelFormat
from sdk.errors import GateError, QuantizationError

__all__ = ["QuantizeOptions", "bundled_model", "cost_gates"]

Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class QuantizeOptions:
    """How to turn the float model into the bundled one, and how to prove it still works."""

    scheme: str = "none"  # none, dynamic, static, weight-only
    calibration: Path | None = None  # .npy / .npz / folder, see sdk.build.datasets
    validation: Path | None = None  # inputs (+ optional "labels") for evaluation and gates
    gates: Gates = field(default_factory=Gates)
    per_channel: bool | None = None  # None: chosen by measurement
    # A "quantized" model that holds (almost) no int8 weights is refused unless accepted.
    accept_unquantized: bool = False
    # quantized / fp32 on this machine; None: not gated. A change is recorded as such.
    max_size_ratio: float | None = DEFAULT_MAX_SIZE_RATIO
    max_latency_ratio: float | None = DEFAULT_MAX_LATENCY_RATIO
    # Static ONNX whose default recipe does not pay: seconds to try others (0: do not).
    recipe_budget_s: float = 120.0


def bundled_model(
    model_path: Path,
    stage: Path,
    fmt: ModelFormat,
    options: QuantizeOptions,
    *,
    calibration: Dataset | None,
    targets: Sequence[str],
    report: Progress,
    golden: tuple[Sequence[Arrays], Sequence[Arrays], str] | None = None,
) -> tuple[Path, Quantization]:
    """The model file the bundle carries (``stage/model/model.FORMAT``) and how it was made.

    ``golden`` (the cases, the float model's outputs for them, the runtime that runs
    them) lets a static ONNX build search other recipes when the default one does not
    pay (:mod:`sdk.build._recipe_search`).

    Raises:
        ConfigError, QuantizationError: as :func:`sdk.build.quantize`.
    """
    bundled = stage / "model" / f"model.{fmt}"
    bundled.parent.mkdir()
    if options.scheme == "none":
        shutil.copyfile(model_path, bundled)
        return bundled, Quantization()

    def quantize(recipe: Recipe | None, out: Path) -> QuantizationResult:
        return run_quantizer(
            model_path,
            out,
            scheme=cast(Scheme, options.scheme),
            calibration=calibration,
            targets=targets,
            per_channel=options.per_channel,
            progress=report,
            recipe=recipe,
        )

    result = quantize(None, stage / f"quantized.{fmt}")
    search = None
    if golden is not None and fmt == "onnx" and options.scheme == "static":
        cases, reference, runtime = golden
        result, search = search_recipes(
            model_path,
            result,
            quantize_with=quantize,
            work=stage,
            cases=cases,
            reference=reference,
            runtime=runtime,
            limits=(options.max_size_ratio, options.max_latency_ratio),
            budget_s=options.recipe_budget_s,
        )
    shutil.copyfile(result.path, bundled)
    details = {**result.details, "coverage": _coverage(model_path, bundled, options)}
    if search is not None:
        details["recipe_search"] = search
    return bundled, replace(result.to_manifest(), details=details)


def _coverage(model_path: Path, bundled: Path, options: QuantizeOptions) -> dict[str, Any]:
    """What the quantizer turned into int8 (:func:`sdk.build._coverage.weight_coverage`).

    Raises:
        QuantizationError: (almost) nothing, and ``options.accept_unquantized`` is not set.
    """
    coverage = weight_coverage(model_path, bundled)
    share = coverage["quantized_share"]
    if share >= MIN_QUANTIZED_SHARE:
        return coverage
    if options.accept_unquantized:
        return {**coverage, "accepted_unquantized": True}
    why = (
        f"; {coverage['float16_weight_bytes']} bytes of its weights are float16"
        if coverage["float16_weight_bytes"]
        else ""
    )
    raise QuantizationError(
        f"{options.scheme} quantization turned {share:.0%} of {model_path.name}'s"
        f" {coverage['float_weight_bytes']} bytes of float weights into int8 (quantized ops:"
        f" {', '.join(coverage['quantized_ops']) or 'none'}){why}; build with --quantize"
        " none, try another scheme, or pass --accept-unquantized to ship it as it is"
    )


def cost_gates(
    model_path: Path,
    bundled: Path,
    case: Mapping[str, npt.NDArray[Any]],
    runtime: str,
    options: QuantizeOptions,
) -> dict[str, Any]:
    """The quantized model against fp32 on this machine, and the default gates that it is
    not larger and not slower (:mod:`sdk.build._cost`).

    Raises:
        GateError: it is larger or slower than the limits allow.
    """
    cost = fp32_cost(
        model_path,
        bundled,
        case,
        runtime=runtime,
        request_elements=request_elements(case),
    )
    limits = {
        "max_size_ratio": options.max_size_ratio,
        "max_latency_ratio": options.max_latency_ratio,
    }
    cost["limits"] = limits
    cost["overridden"] = limits != {
        "max_size_ratio": DEFAULT_MAX_SIZE_RATIO,
        "max_latency_ratio": DEFAULT_MAX_LATENCY_RATIO,
    }
    failed = cost_failures(cost, options.max_size_ratio, options.max_latency_ratio)
    if failed:
        raise GateError(
            f"{options.scheme} quantization does not pay on this machine: {'; '.join(failed)};"
            " keep fp32 (--quantize none), try another scheme, or relax the gate with"
            " --max-size-ratio / --max-latency-ratio (recorded in the bundle)"
        )
    return cost
