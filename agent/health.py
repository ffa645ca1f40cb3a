"""The health gate: a candidate model must pass it before it serves a single request.

It runs the bundle's golden inputs through the loaded candidate, compares the answers
with the expected outputs within the manifest's tolerance
(``|actual - expected| <= atol + rtol * |expected|``), and measures the p95 latency of a
few runs against ``health.latency_budget_p95_ms``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from agent.errors import EdgeshipError, HealthCheckError
from agent.manifest import Manifest, Tolerance
from agent.serving import ServingModel, p95_ms

__all__ = ["HealthReport", "check_health", "compare_outputs", "load_and_check", "load_arrays"]

DEFAULT_LATENCY_RUNS = 20
T = TypeVar("T")


@dataclass(frozen=True)
class HealthReport:
    worst_output: str  # the output with the largest deviation relative to its tolerance
    max_abs_deviation: float  # |actual - expected| at that element
    p95_ms: float
    runs: int


def load_arrays(path: Path) -> dict[str, npt.NDArray[Any]]:
    """The arrays of an ``.npz`` file, without ever unpickling.

    Raises:
        HealthCheckError: the file is missing or not a plain ``.npz``.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise HealthCheckError(f"cannot read {path.name}: {exc}") from None


def compare_outputs(
    expected: Mapping[str, npt.NDArray[Any]],
    actual: Mapping[str, npt.NDArray[Any]],
    tolerance: Tolerance,
) -> tuple[str, float]:
    """Check every expected output. Pure. Returns (worst output, its max |deviation|).

    Raises:
        HealthCheckError: an output is missing, has another shape, is not finite where the
            expectation is, or deviates beyond the tolerance; the message names the worst.
    """
    if not expected:
        raise HealthCheckError("the bundle's expected outputs are empty: nothing to check")
    worst_name, worst_ratio, worst_dev, worst_allowed = "", -1.0, 0.0, 0.0
    for name, want in sorted(expected.items()):
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
        allowed = tolerance.atol + tolerance.rtol * np.abs(np.where(finite, want64, 0.0))
        if dev.size == 0:
            continue
        # Ratio > 1 means outside tolerance; with atol = rtol = 0, any deviation is infinite.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(dev == 0, 0.0, dev / allowed)
        i = int(np.argmax(ratio))
        if float(ratio.flat[i]) > worst_ratio:
            worst_name, worst_ratio, worst_dev = name, float(ratio.flat[i]), float(dev.flat[i])
            worst_allowed = float(allowed.flat[i])
    if worst_ratio > 1.0:
        raise HealthCheckError(
            f"golden outputs do not match: output {worst_name!r} deviates by {worst_dev:.6g}"
            f" where {worst_allowed:.6g} is allowed (atol {tolerance.atol:g}, rtol"
            f" {tolerance.rtol:g}); the model or its runtime behaves differently on this device"
        )
    return worst_name, worst_dev


def check_health(
    model: ServingModel,
    manifest: Manifest,
    model_dir: Path,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    clock: Callable[[], float] = time.perf_counter,
) -> HealthReport:
    """Run the health gate on a loaded candidate.

    Raises:
        HealthCheckError: golden outputs outside tolerance, p95 latency over budget, or the
            model failed while answering.
    """
    health = manifest.health
    inputs = load_arrays(model_dir / health.golden_inputs)
    expected = load_arrays(model_dir / health.expected_outputs)
    try:
        actual = model.predict(inputs)
    except EdgeshipError as exc:
        raise HealthCheckError(f"the model fails on its golden inputs: {exc}") from None
    worst, deviation = compare_outputs(expected, actual, health.tolerance)
    latencies = []
    for _ in range(runs):
        start = clock()
        try:
            model.predict(inputs)
        except EdgeshipError as exc:
            raise HealthCheckError(f"the model fails on a repeated run: {exc}") from None
        latencies.append(clock() - start)
    observed = p95_ms(latencies)
    budget = health.latency_budget_p95_ms
    if budget is not None and observed > budget:
        raise HealthCheckError(
            f"p95 latency {observed:.3g} ms over {runs} runs of the golden inputs exceeds the"
            f" budget of {budget:.3g} ms; the device is too slow for this model"
        )
    return HealthReport(worst_output=worst, max_abs_deviation=deviation, p95_ms=observed, runs=runs)


def load_and_check(
    load: Callable[[], ServingModel],
    manifest: Manifest,
    model_dir: Path,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    nice: int | None = 10,
) -> tuple[ServingModel, HealthReport]:
    """Load a candidate and run the health gate on it, off the serving path.

    The work runs in a short-lived thread whose CPU priority is lowered by ``nice``
    (Linux schedules threads individually), so the current model keeps answering at its
    usual latency while the candidate is loaded and measured; ``None`` runs it here.

    Raises:
        HealthCheckError: the candidate does not load or fails the gate (it is closed).
    """

    def work() -> tuple[ServingModel, HealthReport]:
        try:
            model = load()
        except EdgeshipError as exc:
            raise HealthCheckError(f"the candidate cannot be loaded: {exc}") from None
        try:
            return model, check_health(model, manifest, model_dir, runs=runs)
        except BaseException:
            model.close()
            raise

    if nice is None:
        return work()
    return _in_niced_thread(work, nice)


def _in_niced_thread(fn: Callable[[], T], nice: int) -> T:
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):  # not permitted here: run at normal priority
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            errors.append(exc)

    # Raising a thread's nice value is always allowed; lowering it back is not (without
    # CAP_SYS_NICE), hence a fresh thread for each use instead of re-nicing this one.
    worker = threading.Thread(target=run, name="edgeship-health-gate")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]
