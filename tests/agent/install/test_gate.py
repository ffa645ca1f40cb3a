"""Running the gate off the serving path: in a child process, or in a thread at lowered priority."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from agent.errors import HealthCheckError, InferenceError, RuntimeUnavailableError
from agent.install import (
    ChildGate,
    GatePriority,
    check_in_child,
    load_and_check,
)
from agent.install._gate import _why_late
from agent.install.faults import GATE_FAULT_ENV as FAULT_ENV
from agent.serve.runtimes import Model, RuntimeOptions, load_model
from tests.agent.install._staged import staged, staged_files


def test_load_and_check_runs_the_gate_at_a_lower_nice_value(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    seen: list[tuple[int, int]] = []

    def load() -> Model:
        tid = threading.get_native_id()
        seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid)))
        return model

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    loaded, report = load_and_check(load, manifest, target, runs=2, priority=5)
    with loaded:
        assert report.runs == 2
    assert seen[0][0] != threading.get_native_id()
    assert seen[0][1] == min(base + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_load_and_check_runs_the_gate_as_an_idle_thread_by_default(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    policies: list[int] = []

    def load() -> Model:
        policies.append(os.sched_getscheduler(0))
        return model

    loaded, _ = load_and_check(load, manifest, target, runs=2)
    loaded.close()
    assert policies == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_normal_priority_runs_the_gate_in_the_calling_thread(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    threads: list[int] = []

    def load() -> Model:
        threads.append(threading.get_native_id())
        return model

    loaded, _ = load_and_check(load, manifest, target, runs=1, priority="normal")
    loaded.close()
    assert threads == [threading.get_native_id()]


def _lowered_threads() -> list[int]:
    me = threading.get_native_id()
    return [
        tid
        for tid in (int(t) for t in os.listdir("/proc/self/task"))
        if tid != me
        and (
            os.sched_getscheduler(tid) == os.SCHED_IDLE
            or os.getpriority(os.PRIO_PROCESS, tid) > os.getpriority(os.PRIO_PROCESS, me)
        )
    ]


@pytest.mark.parametrize("priority", ["idle", 7])
def test_a_runtime_starting_threads_is_loaded_again_at_normal_priority(
    tmp_path: Path, priority: GatePriority
) -> None:
    # A two-thread onnxruntime session starts a worker thread while it loads; loaded at a
    # lowered priority, that thread would serve at it for the model's whole life.
    _, manifest, target = staged(tmp_path)
    loads: list[int] = []

    def load() -> Model:
        loads.append(threading.get_native_id())
        return load_model(manifest, target, "onnxruntime", RuntimeOptions(threads=2))

    before = set(os.listdir("/proc/self/task"))
    model, report = load_and_check(load, manifest, target, runs=2, priority=priority)
    with model:
        assert len(loads) == 2
        assert loads[1] == threading.get_native_id()  # the second load: here, at normal
        assert report.runs == 2
        assert set(os.listdir("/proc/self/task")) - before  # the serving session's worker
        # The gate's own thread (and the first session's workers, closed) may take a moment
        # to exit at idle priority when other processes keep the CPUs busy; a thread that
        # serves the model at a lowered priority stays.
        deadline = time.monotonic() + 10
        while _lowered_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lowered_threads() == []
        model.predict({"x": np.zeros((1, 8), np.float32)})


def test_a_single_threaded_runtime_is_loaded_once_at_the_lowered_priority(
    tmp_path: Path,
) -> None:
    _, manifest, target = staged(tmp_path)
    loads: list[int] = []

    def load() -> Model:
        loads.append(os.sched_getscheduler(0))
        return load_model(manifest, target, "onnxruntime", RuntimeOptions(threads=1))

    model, _ = load_and_check(load, manifest, target, runs=2)
    model.close()
    assert loads == [os.SCHED_IDLE]


# --- the gate in a child process ------------------------------------------------------


def test_child_gate_passes_a_good_candidate(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path)
    report = check_in_child(manifest, target, ChildGate("onnxruntime"), runs=3)
    assert report.worst_output == "probs"
    assert report.max_abs_deviation <= 1e-5
    assert report.runs == 3
    assert 0 < report.p95_ms < 1000


def test_child_gate_names_the_deviation_of_a_wrong_candidate(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path, expected_shift=0.01)
    with pytest.raises(HealthCheckError, match=r"'probs' deviates by 0\.01"):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=1)


def test_child_gate_checks_the_latency_budget(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path, latency_budget_p95_ms=1e-6)
    with pytest.raises(HealthCheckError, match=r"p95 latency .* exceeds the budget"):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=2)


def test_child_gate_reports_a_candidate_that_cannot_load(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path)
    (target / manifest.model.file).chmod(0o600)
    (target / manifest.model.file).write_bytes(b"not an onnx model")
    with pytest.raises(HealthCheckError, match="cannot be loaded: onnxruntime cannot load"):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=1)


def test_a_crash_in_the_child_fails_the_gate_and_spares_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, target = staged_files(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "crash")
    with pytest.raises(HealthCheckError, match="process was killed by SIGABRT"):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=1)


def test_a_frozen_application_is_told_to_use_the_thread_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, target = staged_files(tmp_path)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(HealthCheckError, match='health_gate = "thread"'):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=1)


@pytest.mark.parametrize(
    ("fault", "why"),
    [("hang", "was blocked the rest of the time"), ("spin", "hangs or is far too slow")],
)
def test_a_hanging_child_fails_the_gate_after_its_timeout_saying_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, why: str
) -> None:
    manifest, target = staged_files(tmp_path)
    monkeypatch.setenv(FAULT_ENV, fault)
    start = time.monotonic()
    with pytest.raises(HealthCheckError, match=rf"did not finish within 2 s; .*{why}"):
        check_in_child(
            manifest, target, ChildGate("onnxruntime", timeout_s=2), runs=1, priority="normal"
        )
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("cpu_s", "wait_s", "why"),
    [
        (0.1, 1.5, "waited 2 s for a CPU and ran 0.1 s: the device is too busy"),
        # A spinning candidate on a busy device waits too, but runs more than it waits.
        (1.5, 1.0, "it ran 2 s: the candidate hangs or is far too slow"),
        (0.1, 0.1, "it ran 0.1 s and was blocked the rest of the time"),
    ],
)
def test_a_late_child_is_explained_by_how_it_ran_and_waited(
    cpu_s: float, wait_s: float, why: str
) -> None:
    assert why in _why_late((cpu_s, wait_s), 2.0)


def test_a_gate_starved_of_cpu_says_the_device_is_too_busy(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path)
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.2)
        with pytest.raises(HealthCheckError, match="too busy to check the candidate"):
            check_in_child(manifest, target, ChildGate("onnxruntime", timeout_s=3), runs=1)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_the_child_exits_when_the_agent_dies(tmp_path: Path) -> None:
    _, target = staged_files(tmp_path)
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})\n"
        "from pathlib import Path\n"
        "from agent.install import ChildGate, check_in_child\n"
        "from agent.bundle.manifest import Manifest\n"
        f"m = Manifest.from_bytes(Path({str(target / 'manifest.json')!r}).read_bytes())\n"
        f"check_in_child(m, Path({str(target)!r}), ChildGate('onnxruntime'), runs=1)\n"
    )
    env = {**os.environ, FAULT_ENV: "hang"}
    agent = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            children = psutil.Process(agent.pid).children()
            time.sleep(0.05)
        assert children, "the gate's child process never started"
        agent.kill()
        agent.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        agent.kill()
        agent.wait()


def test_load_and_check_with_a_child_gate_loads_the_candidate_here_once(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path)
    loads = 0

    def load() -> Model:
        nonlocal loads
        loads += 1
        return model

    loaded, report = load_and_check(load, manifest, target, runs=2, child=ChildGate("onnxruntime"))
    with loaded:
        assert loaded is model
        assert report.runs == 2
    assert loads == 1


def test_load_and_check_does_not_load_a_candidate_that_failed_in_the_child(
    tmp_path: Path,
) -> None:
    manifest, target = staged_files(tmp_path, expected_shift=0.5)

    def load() -> Model:
        raise AssertionError("a failed candidate must not be loaded for serving")

    with pytest.raises(HealthCheckError, match="deviates"):
        load_and_check(load, manifest, target, runs=1, child=ChildGate("onnxruntime"))


def test_load_and_check_turns_a_load_failure_into_a_health_check_error(tmp_path: Path) -> None:
    _, manifest, target = staged(tmp_path)

    def load() -> Model:
        raise RuntimeUnavailableError("no such runtime here")

    with pytest.raises(HealthCheckError, match="cannot be loaded: no such runtime"):
        load_and_check(load, manifest, target, runs=1)


def test_load_and_check_closes_a_candidate_that_fails_the_gate(tmp_path: Path) -> None:
    model, manifest, target = staged(tmp_path, expected_shift=0.5)
    with pytest.raises(HealthCheckError):
        load_and_check(lambda: model, manifest, target, runs=1, priority="normal")
    with pytest.raises(InferenceError, match="closed"):
        model.predict({"x": np.zeros((1, 8), np.float32)})
