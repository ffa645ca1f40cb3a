"""The static ONNX recipe search: when the default recipe does not pay on this machine,
try others within a time budget and keep the first that does.

The default (QDQ, int8 activations, every op onnxruntime quantizes, per-channel chosen by
measurement) is onnxruntime's recommendation and pays on most CPUs with int8 dot-product
instructions. Where it does not (QDQ pairs around many cheap ops, kernels the CPU has no
fast path for), the alternates of :func:`sdk.build._quantize_onnx.alternate_recipes` are
quantized and measured one by one, each on the build's own terms: the cost gates (size and
latency against fp32, :mod:`sdk.build._cost`) on golden case 0, and the error against the
float model on every golden case. An alternate is kept only when it meets the cost gates
and its error is no worse than the default's by more than :data:`ERROR_SLACK` (relative to
each output's range): a faster recipe must not buy its speed with accuracy. Everything
tried is recorded in the manifest (``quantization.details.recipe_search``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdk.build._cases import request_elements
from sdk.build._cost import cost_failures, fp32_cost
from sdk.build._quantize import QuantizationResult
from sdk.build._quantize_onnx import Recipe, alternate_recipes
from sdk.build.golden import run_cases
from sdk.build.model_io import open_model
from sdk.errors import QuantizationError

__all__ = ["ERROR_SLACK", "search_recipes"]

Arrays = Mapping[str, npt.NDArray[Any]]
# An alternate may be less faithful than the default by this much (error / output range)
# or by half the default's own error, whichever is larger.
ERROR_SLACK = 0.01
_RUNS = 20  # latency runs per candidate: enough to rank, the final gate measures again


def search_recipes(
    original: Path,
    first: QuantizationResult,
    *,
    quantize_with: Callable[[Recipe, Path], QuantizationResult],
    work: Path,
    cases: Sequence[Arrays],
    reference: Sequence[Arrays],
    runtime: str,
    limits: tuple[float | None, float | None],
    budget_s: float,
) -> tuple[QuantizationResult, dict[str, Any]]:
    """The recipe to ship, and what the search did (JSON-ready).

    ``first`` is the default recipe's result; ``limits`` the size and latency ratio
    limits of the cost gates; ``quantize_with(recipe, path)`` writes one alternate.
    """
    start = time.monotonic()
    default = _measure(
        original, first, cases=cases, reference=reference, runtime=runtime, limits=limits
    )
    tried = [{"recipe": "default", **default}]
    record: dict[str, Any] = {"budget_s": budget_s, "tried": tried, "chosen": "default"}
    if default["pays"] or budget_s <= 0:
        return first, _done(record, start)
    allowed = max(1.5 * default["error"], default["error"] + ERROR_SLACK)
    for n, recipe in enumerate(alternate_recipes(bool(first.details.get("per_channel")))):
        if time.monotonic() - start > budget_s:
            record["stopped"] = "time budget"
            break
        try:
            result = quantize_with(recipe, work / f"recipe-{n}.onnx")
        except QuantizationError as exc:
            tried.append({"recipe": recipe.name, "failed": str(exc)[:200]})
            continue
        measured = _measure(
            original, result, cases=cases, reference=reference, runtime=runtime, limits=limits
        )
        tried.append({"recipe": recipe.name, **measured})
        if measured["pays"] and measured["error"] <= allowed:
            record["chosen"] = recipe.name
            return result, _done(record, start)
    return first, _done(record, start)


def _done(record: dict[str, Any], start: float) -> dict[str, Any]:
    record["seconds"] = round(time.monotonic() - start, 2)
    return record


def _measure(
    original: Path,
    result: QuantizationResult,
    *,
    cases: Sequence[Arrays],
    reference: Sequence[Arrays],
    runtime: str,
    limits: tuple[float | None, float | None],
) -> dict[str, Any]:
    cost = fp32_cost(
        original,
        result.path,
        cases[0],
        runtime=runtime,
        request_elements=request_elements(cases[0]),
        runs=_RUNS,
    )
    with open_model(result.path, runtime=runtime, threads=0) as model:
        outputs = run_cases(model, [dict(c) for c in cases])
    failed = cost_failures(cost, *limits)
    return {
        "size_ratio": round(cost["size_ratio"], 3),
        "latency_ratio": round(cost["latency_ratio"], 3),
        "error": round(relative_error(reference, outputs), 5),
        "pays": not failed,
    }


def relative_error(reference: Sequence[Arrays], candidate: Sequence[Arrays]) -> float:
    """Mean absolute difference over every case and output, each output's difference
    divided by its range over the reference cases (1 where the range is 0). Pure."""
    errors = []
    for name in reference[0]:
        ref = [np.asarray(r[name], np.float64) for r in reference]
        span = max(float(np.ptp(np.concatenate([r.ravel() for r in ref]))), 0.0) or 1.0
        for r, c in zip(ref, candidate, strict=True):
            errors.append(float(np.abs(r - np.asarray(c[name], np.float64)).mean()) / span)
    return float(np.mean(errors)) if errors else 0.0
