"""The health gate: a candidate model must pass it before it serves a single request.

It replays the bundle's golden requests through the loaded candidate, compares the
answers with the expected outputs within the manifest's tolerance
(``|actual - expected| <= atol + rtol * |expected|``, per output where the manifest gives
one), and measures the p95 latency of a few runs against ``health.latency_budget_p95_ms``.
A manifest of schema 1.2 or later lists golden cases (``health.cases``), each one request
sent as it is; an older one has a single golden request (``health.golden_inputs``). From
schema 1.3 a manifest may give tolerances measured on an execution provider
(``health.provider_tolerances``): on that provider they replace the output's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.bundle.arrays import read_npz, split_cases
from agent.bundle.manifest import Manifest, Tolerance
from agent.bundle.payload import read_payload
from agent.errors import EdgeshipError, HealthCheckError
from agent.plumbing.compat import zip_strict
from agent.plumbing.stats import percentile_ms
from agent.serve._slot import ServingModel

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = [
    "DEFAULT_LATENCY_RUNS",
    "HealthReport",
    "check_health",
    "compare_outputs",
    "golden_requests",
    "load_arrays",
    "load_payload_arrays",
]

DEFAULT_LATENCY_RUNS = 20


@dataclass(frozen=True)
class HealthReport:
    worst_output: str  # the output with the largest deviation relative to its tolerance
    max_abs_deviation: float  # |actual - expected| at that element
    p95_ms: float
    runs: int


def load_arrays(path: Path) -> dict[str, npt.NDArray[Any]]:
    """The arrays of an ``.npz`` file, never unpickled, in bounded memory.

    Raises:
        HealthCheckError: the file is missing or not a plain ``.npz``
            (see :func:`agent.bundle.arrays.read_npz`).
    """
    return read_npz(path, path.name)


def load_payload_arrays(
    manifest: Manifest, model_dir: Path, member: str, key: DeviceKey | None = None
) -> dict[str, npt.NDArray[Any]]:
    """The arrays of a bundle's ``.npz`` payload file, decrypted in memory if need be.

    Raises:
        HealthCheckError: the file is missing or not a plain ``.npz``.
        NotForThisDeviceError, DecryptionError: an encrypted file this key cannot open.
    """
    try:
        data = read_payload(manifest, model_dir, member, key)
    except OSError as exc:
        raise HealthCheckError(f"cannot read {member}: {exc}") from None
    return read_npz(data, member)


Arrays = dict[str, npt.NDArray[Any]]


def golden_requests(
    manifest: Manifest, model_dir: Path, key: DeviceKey | None = None
) -> list[tuple[Arrays, Arrays]]:
    """The golden requests and the outputs expected for each, in case order.

    Raises:
        HealthCheckError: a golden file is missing, malformed, or does not hold the cases
            the manifest lists.
        NotForThisDeviceError, DecryptionError: an encrypted file this key cannot open.
    """
    health = manifest.health
    cases = health.cases
    if cases is None:
        return [
            (
                load_payload_arrays(manifest, model_dir, health.golden_inputs, key),
                load_payload_arrays(manifest, model_dir, health.expected_outputs, key),
            )
        ]
    inputs, expected = (
        split_cases(load_payload_arrays(manifest, model_dir, path, key), cases.count, path)
        for path in (cases.inputs, cases.expected)
    )
    return list(zip_strict(inputs, expected))


def compare_outputs(
    expected: Mapping[str, npt.NDArray[Any]],
    actual: Mapping[str, npt.NDArray[Any]],
    tolerance: Tolerance,
    tolerances: Mapping[str, Tolerance] | None = None,
) -> tuple[str, float]:
    """Check every expected output. Pure. Returns (worst output, its max |deviation|).

    ``tolerances`` gives an output its own tolerance; the others use ``tolerance``.

    Raises:
        HealthCheckError: an output is missing, has another shape, is not finite where the
            expectation is, or deviates beyond the tolerance; the message names the worst.
    """
    if not expected:
        raise HealthCheckError("the bundle's expected outputs are empty: nothing to check")
    worst_name, worst_ratio, worst_dev, worst_allowed = "", -1.0, 0.0, 0.0
    worst_tol = tolerance
    for name, want in sorted(expected.items()):
        tol = (tolerances or {}).get(name, tolerance)
        if name not in actual:
            raise HealthCheckError(f"the model gives no output {name!r}, which is expected")
        got = np.asarray(actual[name])
        if got.shape != want.shape:
            raise HealthCheckError(
                f"output {name!r} has shape {got.shape}; the expected output has {want.shape}"
            )
        want64 = want.astype(np.float64)
        got64 = got.astype(np.float64)
        if not np.array_equal(np.isfinite(got64), np.isfinite(want64)):
            raise HealthCheckError(f"output {name!r} has NaN or infinite values")
        finite = np.isfinite(want64)
        dev = np.where(finite, np.abs(got64 - want64), 0.0)
        allowed = tol.atol + tol.rtol * np.abs(np.where(finite, want64, 0.0))
        if dev.size == 0:
            continue
        # Ratio > 1 means outside tolerance; with atol = rtol = 0, any deviation is infinite.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(dev == 0, 0.0, dev / allowed)
        i = int(np.argmax(ratio))
        if float(ratio.flat[i]) > worst_ratio:
            worst_name, worst_ratio, worst_dev = name, float(ratio.flat[i]), float(dev.flat[i])
            worst_allowed, worst_tol = float(allowed.flat[i]), tol
    if worst_ratio > 1.0:
        raise HealthCheckError(
            f"golden outputs do not match: output {worst_name!r} deviates by {worst_dev:.6g}"
            f" where {worst_allowed:.6g} is allowed (atol {worst_tol.atol:g}, rtol"
            f" {worst_tol.rtol:g}); the model or its runtime behaves differently on this device"
        )
    return worst_name, worst_dev


def check_health(
    model: ServingModel,
    manifest: Manifest,
    model_dir: Path,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    clocks: Sequence[Callable[[], float]] = (time.perf_counter,),
    key: DeviceKey | None = None,
    provider: str | None = None,
) -> HealthReport:
    """Run the health gate on a loaded candidate.

    A latency run is timed by the smallest interval among ``clocks`` (see
    :func:`agent.plumbing.sched.model_clocks`). ``key`` opens the golden files of an
    encrypted bundle. ``provider`` is the execution provider or delegate the model runs
    on (default: the model's ``provider`` attribute, if it has one): an output the
    manifest gives a tolerance for on that provider is held to that tolerance.

    Raises:
        HealthCheckError: golden outputs outside tolerance, p95 latency over budget, or the
            model failed while answering.
    """
    health = manifest.health
    requests = golden_requests(manifest, model_dir, key)
    if provider is None:
        found = getattr(model, "provider", None)  # when the loaded model names it
        provider = found if isinstance(found, str) else None
    tolerances = health.tolerances_on(provider)
    measured = provider in health.provider_tolerances
    worst, deviation = "", -1.0
    for n, (inputs, expected) in enumerate(requests):
        where = f"golden case {n}" if health.cases is not None else "its golden inputs"
        try:
            actual = model.predict(inputs)
        except EdgeshipError as exc:
            raise HealthCheckError(f"the model fails on {where}: {exc}") from None
        try:
            name, dev = compare_outputs(expected, actual, health.tolerance, tolerances)
        except HealthCheckError as exc:
            if health.cases is None and not measured:
                raise
            prefix = f"{where}: " if health.cases is not None else ""
            suffix = f" (with the tolerances measured for {provider})" if measured else ""
            raise HealthCheckError(f"{prefix}{exc}{suffix}") from None
        if dev > deviation:
            worst, deviation = name, dev
    latencies = []
    for run in range(runs):
        inputs = requests[run % len(requests)][0]
        starts = [c() for c in clocks]
        try:
            model.predict(inputs)
        except EdgeshipError as exc:
            raise HealthCheckError(f"the model fails on a repeated run: {exc}") from None
        latencies.append(max(0.0, min(c() - t for c, t in zip_strict(clocks, starts))))
    observed = percentile_ms(latencies, 0.95)
    budget = health.latency_budget_p95_ms
    if budget is not None and observed > budget:
        raise HealthCheckError(
            f"p95 latency {observed:.3g} ms over {runs} runs of the golden inputs exceeds the"
            f" budget of {budget:.3g} ms; the device is too slow for this model"
        )
    return HealthReport(worst_output=worst, max_abs_deviation=deviation, p95_ms=observed, runs=runs)
