"""The health gate: a candidate model must pass it before it serves a single request.

It runs the bundle's golden inputs through the loaded candidate, compares the answers
with the expected outputs within the manifest's tolerance
(``|actual - expected| <= atol + rtol * |expected|``), and measures the p95 latency of a
few runs against ``health.latency_budget_p95_ms``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from agent.bundle.crypto import DeviceKey, read_payload
from agent.bundle.manifest import Manifest, Tolerance
from agent.errors import EdgeshipError, HealthCheckError
from agent.install._priority import lower_this_thread
from agent.plumbing.stats import percentile_ms
from agent.serve._slot import ServingModel
from agent.serve.runtimes import RuntimeOptions

__all__ = [
    "ChildGate",
    "GatePriority",
    "HealthReport",
    "check_health",
    "check_in_child",
    "check_priority",
    "compare_outputs",
    "cpu_wait_s",
    "load_and_check",
    "load_arrays",
    "load_payload_arrays",
    "model_clocks",
    "spawned_lowered",
]

DEFAULT_LATENCY_RUNS = 20
T = TypeVar("T")
_log = logging.getLogger(__name__)

GatePriority = Literal["idle", "normal"] | int
"""CPU priority of the health gate: Linux ``SCHED_IDLE``, unchanged, or a nice increment."""

# Lowering one thread's priority needs Linux's per-thread scheduling and /proc to see
# which threads a runtime started; elsewhere the gate runs at normal priority.
_CAN_LOWER = sys.platform.startswith("linux") and hasattr(os, "sched_setscheduler")


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
    return _parse_npz(path, path.name)


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
    return _parse_npz(io.BytesIO(data), member)


def _parse_npz(source: Path | io.BytesIO, name: str) -> dict[str, npt.NDArray[Any]]:
    try:
        with np.load(source, allow_pickle=False) as data:
            return {n: np.asarray(data[n]) for n in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise HealthCheckError(f"cannot read {name}: {exc}") from None


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


def _schedstat(path: str) -> tuple[int, int] | None:
    """(nanoseconds on a CPU, nanoseconds runnable but waiting) of one thread, if known."""
    try:
        with open(path, "rb") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_wait_s() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU, if known.

    Linux reports it in ``/proc/thread-self/schedstat``; elsewhere this is 0.0.
    """
    stat = _schedstat("/proc/thread-self/schedstat")
    return 0.0 if stat is None else stat[1] / 1e9


def _wall_minus_wait() -> float:
    return time.perf_counter() - cpu_wait_s()


def model_clocks() -> tuple[Callable[[], float], ...]:
    """Clocks for timing a model in a process of its own that may wait for CPUs.

    A run takes the smaller of two measures that can each only overstate what the model
    needs on its own: wall time minus the calling thread's wait for a CPU (the runtime's
    worker threads may still have waited), and the CPU time of the whole process (work
    spread over several threads is summed).
    """
    return (_wall_minus_wait, time.process_time)


def check_health(
    model: ServingModel,
    manifest: Manifest,
    model_dir: Path,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    clocks: Sequence[Callable[[], float]] = (time.perf_counter,),
    key: DeviceKey | None = None,
) -> HealthReport:
    """Run the health gate on a loaded candidate.

    A latency run is timed by the smallest interval among ``clocks`` (see
    :func:`model_clocks`). ``key`` opens the golden files of an encrypted bundle.

    Raises:
        HealthCheckError: golden outputs outside tolerance, p95 latency over budget, or the
            model failed while answering.
    """
    health = manifest.health
    inputs = load_payload_arrays(manifest, model_dir, health.golden_inputs, key)
    expected = load_payload_arrays(manifest, model_dir, health.expected_outputs, key)
    try:
        actual = model.predict(inputs)
    except EdgeshipError as exc:
        raise HealthCheckError(f"the model fails on its golden inputs: {exc}") from None
    worst, deviation = compare_outputs(expected, actual, health.tolerance)
    latencies = []
    for _ in range(runs):
        starts = [c() for c in clocks]
        try:
            model.predict(inputs)
        except EdgeshipError as exc:
            raise HealthCheckError(f"the model fails on a repeated run: {exc}") from None
        latencies.append(max(0.0, min(c() - t for c, t in zip(clocks, starts, strict=True))))
    observed = percentile_ms(latencies, 0.95)
    budget = health.latency_budget_p95_ms
    if budget is not None and observed > budget:
        raise HealthCheckError(
            f"p95 latency {observed:.3g} ms over {runs} runs of the golden inputs exceeds the"
            f" budget of {budget:.3g} ms; the device is too slow for this model"
        )
    return HealthReport(worst_output=worst, max_abs_deviation=deviation, p95_ms=observed, runs=runs)


@dataclass(frozen=True)
class ChildGate:
    """Run the health gate in a child process that loads the candidate like the agent.

    The child loads the model with :func:`agent.serve.runtimes.load_model` (``runtime``,
    ``options``), so only the default way of loading can be checked this way.
    ``timeout_s`` bounds the whole check: a candidate that hangs its runtime fails.
    """

    runtime: str
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    timeout_s: float = 300.0
    key_file: Path | None = None  # the device key, for an encrypted bundle


def check_in_child(
    manifest: Manifest,
    model_dir: Path,
    gate: ChildGate,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    priority: GatePriority = "idle",
) -> HealthReport:
    """Run the health gate on the candidate in a child Python process.

    Nothing of the check then runs in this process: no interpreter lock shared with the
    serving threads, no CPU taken at their priority (the child lowers its own, ``priority``),
    and a candidate that crashes or hangs its runtime fails the gate instead of taking the
    agent down.

    Raises:
        HealthCheckError: the candidate fails the gate, or the child crashed, hung (past
            ``gate.timeout_s``) or could not start.
    """
    if not sys.executable or getattr(sys, "frozen", False):
        raise HealthCheckError(
            "no Python interpreter to run the health check process in (a frozen or embedded"
            ' application); set update.health_gate = "thread"'
        )
    root = str(Path(__file__).resolve().parents[2])  # the directory holding `agent`
    request = {
        "parent": os.getpid(),
        "priority": priority,
        "manifest": manifest.to_json(),
        "model_dir": str(model_dir),
        "runtime": gate.runtime,
        "options": dataclasses.asdict(gate.options),
        "runs": runs,
        "key_file": None if gate.key_file is None else str(gate.key_file),
    }
    bootstrap = (
        f"import sys; sys.path.insert(0, {root!r});"
        " from agent.install._gate_child import main; main()"
    )
    try:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-c", bootstrap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise HealthCheckError(f"cannot start the health check process: {exc}") from exc
    try:
        out, err = proc.communicate(json.dumps(request) + "\n", timeout=gate.timeout_s)
    except subprocess.TimeoutExpired:
        used = _cpu_and_wait_s(proc.pid)
        proc.kill()
        proc.communicate()
        why = "the candidate hangs, or the device is too busy to check it"
        if used is not None:
            cpu_s, wait_s = used
            if wait_s > 0.25 * gate.timeout_s:
                why = (
                    f"it waited {wait_s:.0f} s for a CPU and ran {cpu_s:.1f} s: the device is"
                    " too busy to check the candidate at this priority (raise"
                    " update.health_gate_timeout_s, or set update.health_gate_priority to a"
                    " nice increment such as 10)"
                )
            elif cpu_s > 0.25 * gate.timeout_s:
                why = f"it ran {cpu_s:.0f} s: the candidate hangs or is far too slow"
            else:
                why = (
                    f"it ran {cpu_s:.1f} s and was blocked the rest of the time: the"
                    " candidate (or its runtime) hangs"
                )
        raise HealthCheckError(
            f"the health check did not finish within {gate.timeout_s:g} s; {why}"
        ) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        doc = json.loads(out.splitlines()[-1])
    except (IndexError, ValueError):
        doc = None
    if not isinstance(doc, dict) or proc.returncode != 0:
        how = f"exited with status {proc.returncode}"
        if proc.returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-proc.returncode}"
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise HealthCheckError(
            f"the health check process {how} while loading or running the candidate"
            + (f": {tail[-400:]}" if tail else "")
        )
    if "error" in doc:
        raise HealthCheckError(str(doc["error"]))
    return HealthReport(
        worst_output=str(doc["worst_output"]),
        max_abs_deviation=float(doc["max_abs_deviation"]),
        p95_ms=float(doc["p95_ms"]),
        runs=int(doc["runs"]),
    )


def _cpu_and_wait_s(pid: int) -> tuple[float, float] | None:
    """Seconds a live process's threads have run, and waited runnable for a CPU."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    stats = [_schedstat(f"/proc/{pid}/task/{tid}/schedstat") for tid in tids]
    known = [st for st in stats if st is not None]
    if not known:
        return None
    return sum(st[0] for st in known) / 1e9, sum(st[1] for st in known) / 1e9


def load_and_check(
    load: Callable[[], ServingModel],
    manifest: Manifest,
    model_dir: Path,
    *,
    runs: int = DEFAULT_LATENCY_RUNS,
    priority: GatePriority = "idle",
    child: ChildGate | None = None,
    key: DeviceKey | None = None,
) -> tuple[ServingModel, HealthReport]:
    """Load a candidate and run the health gate on it, off the serving path.

    With ``child``, the gate runs in a child process (:func:`check_in_child`) and, once it
    passed, ``load`` loads the candidate here; without, ``load`` and the gate both run here.

    With ``priority`` "idle" (Linux ``SCHED_IDLE``) or a nice increment (1-19) the work
    done here runs in a short-lived thread at that lower CPU priority (Linux schedules
    threads individually), so the current model keeps answering at its usual latency;
    "normal" runs it in the calling thread.

    Threads inherit their creator's priority, and an unprivileged process can never raise
    it again. A runtime that starts worker threads while loading (a multi-threaded
    onnxruntime session, a LiteRT thread pool) would serve at the lowered priority for the
    model's whole life, so a candidate whose load or check started such threads is
    closed and loaded (and checked) again at normal priority (see :func:`spawned_lowered`).

    The latency runs are timed by the wall clock at normal priority and by the thread's
    CPU time at a lowered one: there the model runs in that thread alone (it started no
    threads), and the time spent waiting for a CPU or for the interpreter lock behind the
    serving model says nothing about how fast the candidate is.

    Raises:
        HealthCheckError: the candidate does not load or fails the gate (it is closed).
    """

    def load_here() -> ServingModel:
        try:
            return load()
        except EdgeshipError as exc:
            raise HealthCheckError(f"the candidate cannot be loaded: {exc}") from None

    def work(clock: Callable[[], float]) -> tuple[ServingModel, HealthReport]:
        model = load_here()
        if report is not None:
            return model, report
        try:
            return model, check_health(
                model, manifest, model_dir, runs=runs, clocks=(clock,), key=key
            )
        except BaseException:
            model.close()
            raise

    report = None
    if child is not None:
        report = check_in_child(manifest, model_dir, child, runs=runs, priority=priority)
    if priority == "normal" or not _CAN_LOWER:
        return work(time.perf_counter)
    me = threading.get_native_id()
    before = set(_thread_ids())
    try:
        model, checked = _in_lowered_thread(lambda: work(time.thread_time), priority, known=before)
    except HealthCheckError:
        if not spawned_lowered(before, me):
            raise
        # Judged with another clock and started threads: judge it again, as below.
    else:
        if not spawned_lowered(before, me):
            return model, checked
        model.close()
    _log.info(
        "the runtime started worker threads while the candidate loaded at %s priority;"
        " loading it again at normal priority so that they serve at full speed",
        priority,
    )
    return work(time.perf_counter)


def check_priority(value: object) -> GatePriority:
    """Validate a configured gate priority. Raises ValueError."""
    if value in ("idle", "normal"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 19:
        return value
    raise ValueError(f'must be "idle", "normal" or a nice increment 1-19, not {value!r}')


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _lowered(tid: int, reference: int) -> bool:
    """Whether thread ``tid`` runs at a lower priority than thread ``reference``."""
    try:
        if os.sched_getscheduler(tid) == os.SCHED_IDLE != os.sched_getscheduler(reference):
            return True
        return os.getpriority(os.PRIO_PROCESS, tid) > os.getpriority(os.PRIO_PROCESS, reference)
    except OSError:  # the thread has ended: it serves nothing
        return False


def spawned_lowered(before: set[int], reference: int) -> bool:
    """Whether a thread started after ``before`` was listed runs below ``reference``'s priority.

    Such a thread inherited the gate's lowered priority: any other thread of the process
    is started by a thread at normal priority.
    """
    return any(_lowered(tid, reference) for tid in _thread_ids() if tid not in before)


def _in_lowered_thread(
    fn: Callable[[], T], priority: Literal["idle"] | int, *, known: set[int] | None = None
) -> T:
    """Run ``fn`` in a fresh thread at ``priority``; its id is added to ``known``."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        lower_this_thread(priority)
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            errors.append(exc)

    # Lowering a thread's priority is always allowed; raising it back is not (without
    # CAP_SYS_NICE), hence a fresh thread for each use instead of re-prioritising this one.
    worker = threading.Thread(target=run, name="edgeship-health-gate")
    worker.start()
    if known is not None and worker.native_id is not None:
        known.add(worker.native_id)  # its OS thread may linger a moment after join()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]
