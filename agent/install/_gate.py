"""Running the health gate on a candidate, off the serving path.

By default the gate runs in a child process (:mod:`agent.install._gate_child`): it lowers
its own CPU priority, loads the candidate exactly as the agent will, runs the check
(:func:`agent.install._health.check_health`) and answers one JSON line. It shares no
interpreter lock with the serving threads, and a candidate that crashes or hangs its
runtime fails the gate instead of taking the agent down. Such a worker process can be
started ahead of the check, with its runtime already imported
(:class:`agent.install._gate_worker.GateWorkers`). Only a candidate that passed is then
loaded here, in a thread at the gate's lowered priority (:func:`load_and_check`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle.manifest import Manifest
from agent.errors import EdgeshipError, HealthCheckError
from agent.install._gate_worker import GateWorkers, start_worker
from agent.install._health import DEFAULT_LATENCY_RUNS, HealthReport, check_health
from agent.install.faults import gate_fault
from agent.plumbing.sched import (
    CAN_LOWER,
    GatePriority,
    cpu_and_wait_s,
    in_lowered_thread,
    spawned_lowered,
    thread_ids,
)
from agent.serve._slot import ServingModel
from agent.serve.runtimes import RuntimeOptions

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = ["ChildGate", "check_in_child", "load_and_check"]

_log = logging.getLogger("agent.install._health")


@dataclass(frozen=True)
class ChildGate:
    """Run the health gate in a child process that loads the candidate like the agent.

    The child loads the model with :func:`agent.serve.runtimes.load_model` (``runtime``,
    ``options``), so only the default way of loading can be checked this way.
    ``timeout_s`` bounds the whole check: a candidate that hangs its runtime fails.
    ``priority``: the child's CPU priority (None: the one :func:`load_and_check` loads at).
    With ``workers``, the check takes the worker they started ahead, if any, and then
    starts the next one; without, it starts its own.
    """

    runtime: str
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    timeout_s: float = 300.0
    key_file: Path | None = None  # the device key, for an encrypted bundle
    priority: GatePriority | None = None
    workers: GateWorkers | None = field(default=None, compare=False, repr=False)


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
    request = {
        "manifest": manifest.to_json(),
        "model_dir": str(model_dir),
        "runtime": gate.runtime,
        "options": dataclasses.asdict(gate.options),
        "runs": runs,
        "key_file": None if gate.key_file is None else str(gate.key_file),
        # Read here, at the check: a worker started ahead has an older environment.
        "fault": gate_fault(),
    }
    workers = gate.workers
    proc = (
        start_worker(gate.runtime, priority)
        if workers is None
        else workers.take(gate.runtime, priority)
    )
    try:
        return _report(_answer(*_ask(proc, request, gate.timeout_s)))
    finally:
        if workers is not None:
            workers.warm_up(gate.runtime, priority)


def _ask(
    proc: subprocess.Popen[str], request: dict[str, Any], timeout_s: float
) -> tuple[str, str, int]:
    """Send ``request`` to a worker; its stdout, stderr and exit status, once it ended."""
    # A worker started ahead has run (and waited) before: only this check's share counts.
    before = cpu_and_wait_s(proc.pid)
    try:
        out, err = proc.communicate(json.dumps(request) + "\n", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        used = _since(before, cpu_and_wait_s(proc.pid))
        proc.kill()
        proc.communicate()
        raise HealthCheckError(
            f"the health check did not finish within {timeout_s:g} s; {_why_late(used, timeout_s)}"
        ) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return out, err, proc.returncode


def _since(
    before: tuple[float, float] | None, now: tuple[float, float] | None
) -> tuple[float, float] | None:
    if before is None or now is None:
        return now
    # A thread that ended meanwhile takes its share out of the sum: never below zero.
    return max(0.0, now[0] - before[0]), max(0.0, now[1] - before[1])


def _why_late(used: tuple[float, float] | None, timeout_s: float) -> str:
    """Why a child ran out of time, from how long it ran and waited for a CPU."""
    if used is None:
        return "the candidate hangs, or the device is too busy to check it"
    cpu_s, wait_s = used
    # Waiting longer than it ran: starved (a spinning candidate on a busy device runs
    # more than it waits).
    if wait_s > 0.25 * timeout_s and wait_s > cpu_s:
        return (
            f"it waited {wait_s:.0f} s for a CPU and ran {cpu_s:.1f} s: the device is"
            " too busy to check the candidate at this priority (raise"
            " update.health_gate_timeout_s, or set update.health_gate_priority to a"
            " nice increment such as 10)"
        )
    if cpu_s > 0.25 * timeout_s:
        return f"it ran {cpu_s:.0f} s: the candidate hangs or is far too slow"
    return (
        f"it ran {cpu_s:.1f} s and was blocked the rest of the time: the"
        " candidate (or its runtime) hangs"
    )


def _answer(out: str, err: str, returncode: int) -> dict[str, Any]:
    """The child's JSON answer, or the error that says how it ended without one."""
    try:
        doc = json.loads(out.splitlines()[-1])
    except (IndexError, ValueError):
        doc = None
    if isinstance(doc, dict) and returncode == 0:
        return doc
    how = f"exited with status {returncode}"
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    tail = " | ".join(err.strip().splitlines()[-3:])
    raise HealthCheckError(
        f"the health check process {how} while loading or running the candidate"
        + (f": {tail[-400:]}" if tail else "")
    )


def _report(doc: dict[str, Any]) -> HealthReport:
    if "error" in doc:
        raise HealthCheckError(str(doc["error"]))
    return HealthReport(
        worst_output=str(doc["worst_output"]),
        max_abs_deviation=float(doc["max_abs_deviation"]),
        p95_ms=float(doc["p95_ms"]),
        runs=int(doc["runs"]),
    )


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
        report = check_in_child(
            manifest,
            model_dir,
            child,
            runs=runs,
            priority=priority if child.priority is None else child.priority,
        )
    if priority == "normal" or not CAN_LOWER:
        return work(time.perf_counter)
    me = threading.get_native_id()
    before = set(thread_ids())
    try:
        model, checked = in_lowered_thread(lambda: work(time.thread_time), priority, known=before)
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
