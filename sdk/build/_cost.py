"""Does quantization pay on this build machine? Size and latency of the quantized model
against its float original, measured, and the default gates that it is neither larger nor
slower.

Static int8 is not faster everywhere: on a CPU without VNNI (or for a model whose int8
kernels onnxruntime does not fuse) it can be slower and, with QDQ overhead on small
weights, larger than fp32. So the build measures instead of assuming, on a golden case
(one real request) through the agent's runtime layer, both models timed alternately so
that background load hits them alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from sdk.build._evaluate import interleaved_latency
from sdk.build.model_io import open_model

__all__ = ["DEFAULT_MAX_LATENCY_RATIO", "DEFAULT_MAX_SIZE_RATIO", "cost_failures", "fp32_cost"]

DEFAULT_MAX_SIZE_RATIO = 1.0
DEFAULT_MAX_LATENCY_RATIO = 1.0
_RUNS = 40


def fp32_cost(
    original: Path,
    quantized: Path,
    case: Mapping[str, npt.NDArray[Any]],
    *,
    runtime: str,
    request_elements: int,
    threads: Sequence[int] = (1, 0),
    runs: int = _RUNS,
) -> dict[str, Any]:
    """Size and p50 latency ratios (quantized / original) on ``case``, per thread count
    (0: the agent's default); ``latency_ratio`` is the worst of them. JSON-ready.

    Raises:
        ConfigError: a model does not load. InferenceError: the case does not run.
    """
    latency: dict[str, dict[str, float]] = {}
    for t in threads:
        with contextlib.ExitStack() as stack:
            pair = tuple(
                stack.enter_context(
                    open_model(p, runtime=runtime, threads=t, request_elements=request_elements)
                )
                for p in (original, quantized)
            )
            (o50, _), (q50, _) = interleaved_latency(pair, case, runs)
        latency[str(t) if t else "default"] = {
            "fp32_p50_ms": o50,
            "quantized_p50_ms": q50,
            "ratio": q50 / o50 if o50 > 0 else 1.0,
        }
    size = {"fp32_bytes": original.stat().st_size, "quantized_bytes": quantized.stat().st_size}
    return {
        "size_ratio": size["quantized_bytes"] / max(1, size["fp32_bytes"]),
        "latency_ratio": max(v["ratio"] for v in latency.values()),
        "size": size,
        "latency_by_threads": latency,
        "runs": runs,
    }


def cost_failures(
    cost: Mapping[str, Any], max_size_ratio: float | None, max_latency_ratio: float | None
) -> list[str]:
    """The gates ``cost`` misses, each as a phrase for a one-line error. Pure."""
    failed = []
    if max_size_ratio is not None and cost["size_ratio"] > max_size_ratio:
        failed.append(f"size {cost['size_ratio']:.2f}x fp32 (limit {max_size_ratio:g}x)")
    if max_latency_ratio is not None and cost["latency_ratio"] > max_latency_ratio:
        failed.append(
            f"p50 latency {cost['latency_ratio']:.2f}x fp32 (limit {max_latency_ratio:g}x)"
        )
    return failed
