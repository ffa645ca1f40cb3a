"""Golden inputs and expected outputs for the device's health check, and their tolerance.

:func:`pick_golden` takes the golden inputs from a data set (:func:`synthesize_inputs`
makes them up when there is none); :func:`derive_golden` runs the model on them through
the agent's own runtime layer and measures how much equivalent executions disagree, from
which the health check's tolerance follows. The bundle stores these arrays as described
in docs/bundle-format.md ("Health files").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import ModelSpec, TensorSpec, Tolerance
from agent.serve.runtimes import Model
from sdk.build.datasets import Dataset
from sdk.build.model_io import open_model, run_dataset

__all__ = [
    "DEFAULT_SAFETY_FACTOR",
    "Golden",
    "derive_golden",
    "pick_golden",
    "synthesize_inputs",
]

Arrays = dict[str, npt.NDArray[Any]]

DEFAULT_SAFETY_FACTOR = 4.0
# Float noise floor, in units of float32 epsilon times the outputs' magnitude.
_FLOAT_FLOOR_EPS = 64


@dataclass(frozen=True)
class Golden:
    """Golden inputs and expected outputs for the health check, with their tolerance.

    ``spread`` is the largest deviation measured between equivalent executions of the
    model (see :func:`derive_golden`); ``details`` records how the tolerance was set.
    """

    inputs: Mapping[str, npt.NDArray[Any]]
    expected: Mapping[str, npt.NDArray[np.float32]]
    tolerance: Tolerance
    spread: float
    details: Mapping[str, Any]


def pick_golden(dataset: Dataset, count: int) -> Arrays:
    """``count`` samples spread evenly over the data set (first and last included)."""
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return {k: np.asarray(v)[idx] for k, v in dataset.inputs.items()}


def synthesize_inputs(inputs: Sequence[TensorSpec], count: int, seed: int = 0) -> Arrays:
    """Deterministic pseudo-random inputs matching the signature (when none are given)."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for spec in inputs:
        shape = tuple(count if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.shape))
        if spec.dtype.startswith("float") or spec.quantization is not None:
            out[spec.name] = rng.standard_normal(shape).astype(np.float32)
        elif spec.dtype == "bool":
            out[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            info = np.iinfo(np.dtype(spec.dtype))
            out[spec.name] = rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(
                spec.dtype
            )
    return out


def derive_golden(
    model: Path | str,
    inputs: Dataset,
    *,
    runtime: str | None = None,
    count: int = 8,
    repeats: int = 3,
    threads: Sequence[int] = (1, 0),
    reference_outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
) -> Golden:
    """Golden inputs (the first ``count`` samples), expected outputs and a tolerance.

    The model runs through the agent's runtime layer (``runtime``, default onnxruntime
    or LiteRT), exactly as a device runs it. The expected outputs are its single-threaded,
    one-sample-at-a-time outputs (float; int8 outputs dequantized as the agent does). The
    tolerance is measured, not picked: the same inputs are run again ``repeats`` times
    with each thread count in ``threads`` (0: the agent's default), sample by sample and
    as one batch (kernels may pick a different blocking or accumulation order for each),
    once with the runtime's reference kernels (a second implementation, standing in for a
    device's), and, when given, ``reference_outputs`` from another runtime are compared
    too. ``spread`` is the largest absolute deviation from the expected outputs seen in
    all of that. Then

        atol = max(safety_factor * spread, floor)

    where ``floor`` is one output quantization step for int8 outputs (a requantizing
    kernel may round the other way) and otherwise ``64 * eps(float32) * max|expected|``,
    so that bit-identical runs on the build machine still leave room for a device's
    different SIMD width. ``rtol`` is 0: ``atol`` already scales with the outputs.

    Raises:
        ConfigError: the data set does not fit the model, or the model does not load.
        InputValidationError: the samples break the model's input rules.
    """
    path = Path(model)
    with open_model(path, runtime=runtime, threads=1) as base:
        spec = base.spec
        data = inputs.bind([s.name for s in spec.inputs]).take(count)
        expected = _widened(run_dataset(base, data, batch_size=1))
        deviations = _deviations(
            base, path, data, expected, runtime=runtime, repeats=repeats, threads=threads
        )
    if reference_outputs is not None:
        deviations["reference runtime"] = _deviation(
            expected, [reference_outputs[o.name] for o in spec.outputs]
        )
    spread = max(deviations.values(), default=0.0)
    floor = _floor(spec, expected)
    return Golden(
        inputs=dict(data.inputs),
        expected={
            o.name: e.astype(np.float32) for o, e in zip(spec.outputs, expected, strict=True)
        },
        tolerance=Tolerance(atol=max(safety_factor * spread, floor), rtol=0.0),
        spread=spread,
        details={
            "method": "max abs deviation across repeats, thread counts, batching,"
            " reference kernels"
            + (", reference runtime" if reference_outputs is not None else "")
            + f"; atol = max({safety_factor:g} x spread, floor)",
            "deviations": deviations,
            "safety_factor": safety_factor,
            "floor": floor,
            "samples": len(data),
        },
    )


def _deviations(
    base: Model,
    path: Path,
    data: Dataset,
    expected: list[npt.NDArray[np.float64]],
    *,
    runtime: str | None,
    repeats: int,
    threads: Sequence[int],
) -> dict[str, float]:
    """The largest deviation from ``expected`` of each way of running the model."""
    deviations: dict[str, float] = {}

    def note(label: str, outputs: Sequence[npt.NDArray[Any]]) -> None:
        deviations[label] = max(_deviation(expected, outputs), deviations.get(label, 0.0))

    for t in threads:
        with contextlib.ExitStack() as stack:
            model = (
                base
                if t == 1
                else stack.enter_context(open_model(path, runtime=runtime, threads=t))
            )
            for _ in range(repeats):
                note(f"threads={t} per-sample", run_dataset(model, data, batch_size=1))
                note(f"threads={t} batched", run_dataset(model, data, batch_size=len(data)))
    # Another kernel implementation stands in for the device's (other SIMD width,
    # other rounding of int8 requantization).
    with open_model(path, runtime=runtime, reference_kernels=True) as reference:
        note("reference kernels", run_dataset(reference, data, batch_size=1))
    return deviations


def _widened(outputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[np.float64]]:
    return [np.asarray(o, np.float64) for o in outputs]


def _deviation(
    expected: Sequence[npt.NDArray[np.float64]], outputs: Sequence[npt.NDArray[Any]]
) -> float:
    return max(
        float(np.max(np.abs(o - e), initial=0.0))
        for o, e in zip(_widened(outputs), expected, strict=True)
    )


def _floor(spec: ModelSpec, expected: Sequence[npt.NDArray[np.float64]]) -> float:
    """The least tolerance: one output step of int8 outputs, else float noise."""
    steps = [o.quantization.scale for o in spec.outputs if o.quantization is not None]
    magnitude = max(float(np.max(np.abs(e), initial=0.0)) for e in expected)
    float_floor = _FLOAT_FLOOR_EPS * float(np.finfo(np.float32).eps) * max(magnitude, 1.0)
    return max([*steps, float_floor])
