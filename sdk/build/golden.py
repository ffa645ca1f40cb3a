"""Expected outputs for the device's health check, and tolerances that can fail.

:func:`derive_golden` replays each golden case (one request, :mod:`sdk.build._cases`)
through the bundled model as the device will run it (the agent's runtime layer, default
kernels and delegates, the agent's default threads), then measures how much equivalent
executions disagree, and sets a tolerance per output from that and from how far the
quantized model is from its float original. The bundle stores these arrays as described
in docs/bundle-format.md ("Golden cases").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import TensorSpec, Tolerance
from agent.serve.runtimes import Model
from sdk.build._cases import Case
from sdk.build.model_io import open_model
from sdk.errors import BuildError

__all__ = [
    "DEFAULT_SAFETY_FACTOR",
    "FLOAT_FLOOR_SHARE",
    "KERNEL_SHARE",
    "MAX_SHARE",
    "Golden",
    "derive_golden",
    "max_deviation",
    "output_tolerance",
    "run_cases",
]

DEFAULT_SAFETY_FACTOR = 4.0
# The tolerance never exceeds this share of an output's observed range (unless the build
# machine's own runs disagree by more): beyond it a broken model could pass.
MAX_SHARE = 0.05
# Another device's int8 kernels (other SIMD, other requantization rounding) land between
# the quantized and the float answer: half the measured fp32-vs-quantized difference.
KERNEL_SHARE = 0.5
# Another device's float kernels (SIMD width, fused multiply-add) stay within this share
# of the range, and within 64 float32 epsilons of the outputs' magnitude.
FLOAT_FLOOR_SHARE = 1e-3
_FLOAT_FLOOR_EPS = 64


@dataclass(frozen=True)
class Golden:
    """Golden cases, the outputs expected for each, and a tolerance per output.

    ``tolerance`` is the widest of ``tolerances``: what an agent that predates per-output
    tolerances applies to every output. ``details`` records how each was set.
    """

    cases: tuple[Case, ...]
    expected: tuple[dict[str, npt.NDArray[np.float32]], ...]
    tolerances: Mapping[str, Tolerance]
    tolerance: Tolerance
    details: Mapping[str, Any]


def run_cases(model: Model, cases: Sequence[Case]) -> list[dict[str, npt.NDArray[np.float64]]]:
    """``model``'s outputs for each case, each case sent as one request.

    Raises:
        InputValidationError: a case does not fit the model's inputs.
        InferenceError: the runtime failed.
    """
    return [
        {k: np.asarray(v, np.float64) for k, v in model.predict(case).items()} for case in cases
    ]


def derive_golden(
    model: Path | str,
    cases: Sequence[Case],
    *,
    runtime: str | None = None,
    reference: Sequence[Mapping[str, npt.NDArray[Any]]] | None = None,
    request_elements: int | None = None,
    repeats: int = 3,
    threads: Sequence[int] = (1, 0),
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
) -> Golden:
    """Expected outputs of ``model`` for ``cases`` and a tolerance per output.

    The expected outputs come from the model as the device loads it (``runtime``, default
    onnxruntime or LiteRT; the agent's default threads, sized with ``request_elements``).
    ``noise`` is the largest deviation from them seen when each case runs again
    ``repeats`` times with each thread count in ``threads``; ``reference`` (the float
    original's outputs on the same cases, for a quantized model) gives ``qdiff``. Per
    output (see :func:`output_tolerance`)::

        atol = max(min(max(safety * noise, KERNEL_SHARE * qdiff, floor), MAX_SHARE * range),
                   2 * noise, floor)

    Raises:
        ConfigError: the model does not load.
        BuildError: an output is not reproducible (NaN, infinity or shape changes).
        InputValidationError, InferenceError: a case does not run.
    """
    path = Path(model)
    with open_model(path, runtime=runtime, threads=0, request_elements=request_elements) as base:
        specs = base.spec.outputs
        expected = run_cases(base, cases)
        noise = _noise(
            base,
            path,
            cases,
            expected,
            runtime=runtime,
            repeats=repeats,
            threads=threads,
            request_elements=request_elements,
        )
    qdiff = max_deviation(expected, reference) if reference is not None else {}
    per_output = {
        o.name: output_tolerance(
            o,
            [e[o.name] for e in expected],
            noise=noise.get(o.name, 0.0),
            qdiff=qdiff.get(o.name, 0.0),
            safety_factor=safety_factor,
        )
        for o in specs
    }
    unstable = sorted(name for name, d in per_output.items() if not np.isfinite(d["atol"]))
    if unstable:
        raise BuildError(
            f"output(s) {unstable} of {path.name} change shape or turn NaN/infinite between"
            " identical runs: no health check can tell a healthy device from a broken one"
        )
    tolerances = {name: Tolerance(atol=d["atol"], rtol=0.0) for name, d in per_output.items()}
    return Golden(
        cases=tuple(cases),
        expected=tuple({o.name: e[o.name].astype(np.float32) for o in specs} for e in expected),
        tolerances=tolerances,
        tolerance=Tolerance(atol=max(t.atol for t in tolerances.values()), rtol=0.0),
        details={
            "method": "per output: atol = max(min(max(safety x noise, kernel_share x qdiff,"
            " floor), max_share x range), 2 x noise, floor); noise across repeats and thread"
            " counts on the device's runtime configuration, qdiff = |quantized - float|",
            "cases": len(cases),
            "safety_factor": safety_factor,
            "kernel_share": KERNEL_SHARE,
            "max_share": MAX_SHARE,
            "outputs": per_output,
        },
    )


def output_tolerance(
    spec: TensorSpec,
    expected: Sequence[npt.NDArray[np.float64]],
    *,
    noise: float,
    qdiff: float,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
) -> dict[str, float]:
    """One output's tolerance and what it came from. Pure.

    ``floor`` is one output step for int8 outputs (a requantizing kernel may round the
    other way), else float noise: ``FLOAT_FLOOR_SHARE`` of the range or 64 float32
    epsilons of the magnitude. ``range`` is the spread of the expected values over all
    cases (their magnitude when they are all equal). The tolerance admits what the build
    machine itself shows (twice the noise) and never more than ``MAX_SHARE`` of the range
    beyond that.
    """
    flat = np.concatenate([np.ravel(e) for e in expected]) if expected else np.zeros(0)
    finite = flat[np.isfinite(flat)]
    magnitude = float(np.max(np.abs(finite), initial=0.0))
    spread = float(np.ptp(finite)) if finite.size else 0.0
    value_range = spread if spread > 0 else magnitude
    eps = _FLOAT_FLOOR_EPS * float(np.finfo(np.float32).eps) * max(magnitude, 1.0)
    floor = (
        spec.quantization.scale
        if spec.quantization is not None
        else max(eps, FLOAT_FLOOR_SHARE * value_range)
    )
    allow = max(safety_factor * noise, KERNEL_SHARE * qdiff, floor)
    atol = max(min(allow, MAX_SHARE * value_range), 2 * noise, floor)
    return {
        "atol": atol,
        # Outputs that barely move over all cases: the check tests (almost) nothing.
        "constant": spread <= floor,
        "magnitude": magnitude,
        "range": value_range,
        "share_of_range": atol / value_range if value_range > 0 else 0.0,
        "noise": noise,
        "qdiff": qdiff,
        "floor": floor,
    }


def _noise(
    base: Model,
    path: Path,
    cases: Sequence[Case],
    expected: Sequence[Mapping[str, npt.NDArray[np.float64]]],
    *,
    runtime: str | None,
    repeats: int,
    threads: Sequence[int],
    request_elements: int | None,
) -> dict[str, float]:
    """The largest deviation from ``expected`` per output over repeats and thread counts."""
    noise: dict[str, float] = {}
    for t in threads:
        model = (
            base
            if t == 0
            else open_model(path, runtime=runtime, threads=t, request_elements=request_elements)
        )
        try:
            for _ in range(repeats):
                for name, dev in max_deviation(expected, run_cases(model, cases)).items():
                    noise[name] = max(noise.get(name, 0.0), dev)
        finally:
            if model is not base:
                model.close()
    return noise


def max_deviation(
    expected: Sequence[Mapping[str, npt.NDArray[Any]]],
    outputs: Sequence[Mapping[str, npt.NDArray[Any]]],
) -> dict[str, float]:
    """Per output, the largest |difference| between ``expected`` and ``outputs``; NaN or
    infinity where the other is finite counts as infinitely far."""
    out: dict[str, float] = {}
    for want, got in zip(expected, outputs, strict=True):
        for name, e in want.items():
            g = np.asarray(got[name], np.float64)
            if g.shape != e.shape:
                out[name] = float("inf")
                continue
            with np.errstate(invalid="ignore"):
                d = np.abs(g - e)
            both = np.isfinite(g) & np.isfinite(e)
            same = np.isnan(g) & np.isnan(e) | (g == e)
            dev = np.where(both, d, np.where(same, 0.0, np.inf))
            out[name] = max(out.get(name, 0.0), float(np.max(dev, initial=0.0)))
    return out
