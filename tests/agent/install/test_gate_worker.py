"""The health gate's worker started ahead: reused once, replaced, stopped, never leaked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bundle import DeviceInfo
from agent.errors import HealthCheckError
from agent.install import ChildGate, UpdateConfig, UpdaterConfig, check_in_child, load_and_check
from agent.install._gate_worker import GateWorkers
from agent.install._loading import ModelLoading
from agent.install.faults import GATE_FAULT_ENV as FAULT_ENV
from agent.serve.runtimes import Model, installed_runtimes, load_model
from tests.agent.install._staged import staged_files

pytestmark = pytest.mark.integration

ROOT = str(Path(__file__).resolve().parents[3])
READY_S = 120.0  # generous: a worker at idle priority on a busy test machine


@pytest.fixture
def workers() -> Iterator[GateWorkers]:
    pool = GateWorkers()
    yield pool
    pool.close()


def _children() -> set[int]:
    """Live (or zombie) child processes of this process, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry))
    return found


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited and was reaped (no process, not even a zombie)."""
    return not Path(f"/proc/{pid}").exists()


def _ready(pool: GateWorkers) -> int:
    pid = pool.wait_ready(READY_S)
    assert pid is not None, "the worker started ahead never became ready"
    return pid


def test_no_worker_is_started_until_a_gate_asks(workers: GateWorkers) -> None:
    assert workers.wait_ready(0) is None
    assert (workers.warm_served, workers.started_on_demand) == (0, 0)


def test_the_worker_started_ahead_is_lowered_and_has_its_runtime_imported(
    workers: GateWorkers,
) -> None:
    workers.warm_up("onnxruntime", "idle")
    pid = _ready(workers)
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text()
    proc = workers.take("onnxruntime", "idle")
    assert proc.pid == pid
    proc.communicate("")  # no request: it exits
    assert proc.returncode == 0


def test_the_second_gate_is_served_by_the_worker_started_after_the_first(
    tmp_path: Path, workers: GateWorkers
) -> None:
    manifest, target = staged_files(tmp_path)
    gate = ChildGate("onnxruntime", workers=workers)
    assert check_in_child(manifest, target, gate, runs=2).runs == 2
    ahead = _ready(workers)
    report = check_in_child(manifest, target, gate, runs=3)
    assert report.runs == 3
    assert (workers.warm_served, workers.started_on_demand) == (1, 1)
    assert _gone(ahead)  # it checked one candidate, exited, and was reaped
    assert _ready(workers) not in (ahead, None)


def test_a_failed_candidate_is_reported_from_a_worker_started_ahead(
    tmp_path: Path, workers: GateWorkers
) -> None:
    manifest, target = staged_files(tmp_path, expected_shift=0.01)
    workers.warm_up("onnxruntime", "idle")
    _ready(workers)
    with pytest.raises(HealthCheckError, match=r"'probs' deviates by 0\.01"):
        check_in_child(manifest, target, ChildGate("onnxruntime", workers=workers), runs=1)
    assert workers.warm_served == 1


def test_a_crash_in_a_worker_started_ahead_fails_the_gate_and_a_replacement_starts(
    tmp_path: Path, workers: GateWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, target = staged_files(tmp_path)
    gate = ChildGate("onnxruntime", workers=workers)
    workers.warm_up("onnxruntime", "idle")
    crashed = _ready(workers)
    # Set after the worker started: the fault travels with the request.
    monkeypatch.setenv(FAULT_ENV, "crash")
    with pytest.raises(HealthCheckError, match="process was killed by SIGABRT"):
        check_in_child(manifest, target, gate, runs=1)
    assert _gone(crashed)
    replacement = _ready(workers)
    assert replacement != crashed
    monkeypatch.delenv(FAULT_ENV)
    assert check_in_child(manifest, target, gate, runs=1).runs == 1
    assert (workers.warm_served, workers.started_on_demand) == (2, 0)


@pytest.mark.parametrize(
    ("fault", "why"),
    [("hang", "was blocked the rest of the time"), ("spin", "hangs or is far too slow")],
)
def test_a_hanging_worker_started_ahead_fails_after_its_timeout_saying_how(
    tmp_path: Path,
    workers: GateWorkers,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    why: str,
) -> None:
    # Its start-up (the interpreter, the runtime's import) is not counted as the check's.
    manifest, target = staged_files(tmp_path)
    workers.warm_up("onnxruntime", "normal")
    hung = _ready(workers)
    monkeypatch.setenv(FAULT_ENV, fault)
    gate = ChildGate("onnxruntime", timeout_s=2, workers=workers)
    with pytest.raises(HealthCheckError, match=rf"did not finish within 2 s; .*{why}"):
        check_in_child(manifest, target, gate, runs=1, priority="normal")
    assert _gone(hung)
    assert _ready(workers) != hung


def test_a_worker_at_another_priority_is_stopped_not_used(workers: GateWorkers) -> None:
    workers.warm_up("onnxruntime", "normal")
    normal = _ready(workers)
    proc = workers.take("onnxruntime", "idle")
    try:
        assert proc.pid != normal
        assert _gone(normal)
        assert workers.started_on_demand == 1
    finally:
        proc.communicate("")


def test_a_worker_that_imported_another_runtime_still_checks(
    tmp_path: Path, workers: GateWorkers
) -> None:
    manifest, target = staged_files(tmp_path)
    workers.warm_up("litert", "idle")
    _ready(workers)
    report = check_in_child(manifest, target, ChildGate("onnxruntime", workers=workers), runs=1)
    assert report.runs == 1
    assert workers.warm_served == 1


def test_close_stops_the_worker_started_ahead_and_reaps_it(workers: GateWorkers) -> None:
    before = _children()
    workers.warm_up("onnxruntime", "idle")
    pid = _ready(workers)
    workers.close()
    assert _gone(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert _children() <= before


def test_after_close_a_gate_starts_its_own_worker_and_none_ahead(
    tmp_path: Path, workers: GateWorkers
) -> None:
    manifest, target = staged_files(tmp_path)
    before = _children()
    workers.close()
    assert check_in_child(manifest, target, ChildGate("onnxruntime", workers=workers)).runs > 0
    assert workers.started_on_demand == 1
    assert workers.wait_ready(0) is None
    assert _children() <= before


def test_the_child_runs_at_the_gate_priority_whatever_the_load_here_runs_at(
    tmp_path: Path, workers: GateWorkers
) -> None:
    manifest, target = staged_files(tmp_path)

    def load() -> Model:
        return load_model(manifest, target, "onnxruntime")

    gate = ChildGate("onnxruntime", priority="idle", workers=workers)
    model, _ = load_and_check(load, manifest, target, runs=1, priority="normal", child=gate)
    model.close()
    # The next check's worker is started at the child's priority.
    assert os.sched_getscheduler(_ready(workers)) == os.SCHED_IDLE


def test_model_loading_reuses_its_worker_and_close_stops_it(tmp_path: Path) -> None:
    manifest, target = staged_files(tmp_path)
    before = _children()
    config = UpdaterConfig(update=UpdateConfig(health_runs=2))
    loading = ModelLoading(config, lambda: DeviceInfo(runtimes=installed_runtimes()))
    try:
        for _ in range(2):
            result = loading.gate(manifest, target)
            result.model.close()
            assert result.gate == "process"
        ahead = loading.gate_workers.wait_ready(READY_S)
        assert ahead is not None
        assert loading.gate_workers.warm_served == 1
    finally:
        loading.close()
    assert _gone(ahead)
    assert _children() <= before


def test_a_worker_started_ahead_exits_when_the_agent_dies(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from agent.install._gate_worker import GateWorkers\n"
        "workers = GateWorkers()\n"
        "workers.warm_up('onnxruntime', 'idle')\n"
        f"print(workers.wait_ready({READY_S}), flush=True)\n"
        "time.sleep(3600)\n"
    )
    agent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        worker = int(agent.stdout.readline())
        assert not _gone(worker)
    finally:
        agent.kill()
        agent.communicate()
    deadline = time.monotonic() + 30
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(worker)
