"""The install state machine end to end, with real bundles and real onnxruntime."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import DeviceInfo
from agent.bundle.manifest import Manifest, Probation
from agent.errors import (
    CompatibilityError,
    DownloadError,
    ExpiredError,
    HealthCheckError,
    RollbackError,
    StateError,
    UntrustedSignerError,
)
from agent.install import FetchConfig, UpdateConfig, Updater, UpdaterConfig
from agent.install._store import Store
from agent.install.faults import GATE_FAULT_ENV as FAULT_ENV
from agent.serve._slot import ModelSlot, ServingModel
from agent.serve.runtimes import load_model
from tests.agent.install.test_fetch import BundleServer, server  # noqa: F401 - fixture
from tests.agent.install.test_store import tiny_tmpfs
from tests.support.bundles import CREATED, make_key
from tests.support.lifecycle import (
    POLICY,
    LifecycleBundle,
    golden_inputs,
    make_model_bundle,
)


@dataclass
class Events:
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, kind: str, fields: Mapping[str, Any], /) -> None:
        self.seen.append((kind, dict(fields)))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.seen]


@dataclass
class CountingLoader:
    loads: int = 0

    def __call__(self, manifest: Manifest, model_dir: Path, runtime: str) -> ServingModel:
        self.loads += 1
        return load_model(manifest, model_dir, runtime)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LifecycleBundle]:
    d = tmp_path_factory.mktemp("bundles")
    watch = Probation(requests=20, seconds=600.0, max_error_rate=0.0)
    return {
        "v1": make_model_bundle(d, seed=1, sequence=1),
        "v2": make_model_bundle(d, seed=2, sequence=2),
        "v3": make_model_bundle(d, seed=3, sequence=3),
        "v2-other": make_model_bundle(d, seed=4, sequence=2),
        "bad-golden": make_model_bundle(d, seed=5, sequence=10, expected_shift=0.5),
        "watched": make_model_bundle(d, seed=6, sequence=11, probation=watch),
        "slow": make_model_bundle(
            d,
            seed=7,
            sequence=12,
            probation=Probation(requests=20, seconds=600.0, max_p95_ms=1e-6),
        ),
        "expiring": make_model_bundle(d, seed=8, sequence=13, expires=CREATED + timedelta(days=2)),
        "foreign": make_model_bundle(d, seed=9, sequence=14, key=make_key("stranger")),
    }


def _updater(state_dir: Path, **kw: Any) -> Updater:
    return Updater(state_dir, POLICY, **kw)


def _install_and_commit(u: Updater, b: LifecycleBundle) -> str:
    result = u.install(str(b.path))
    assert result.outcome == "probation"
    u.commit()
    return result.digest


def _answer(slot: ModelSlot) -> np.ndarray:
    return slot.predict(golden_inputs())["probs"]


def test_install_then_commit_makes_the_version_current(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    events = Events()
    u = _updater(tmp_path, events=events)
    result = u.install(str(bundles["v1"].path))
    state = u.status()
    assert state.pending is not None
    assert (state.pending.phase, state.pending.digest) == ("probation", result.digest)
    assert state.current is None
    assert result.health is not None
    assert result.health.max_abs_deviation <= 1e-5

    u.commit()
    state = u.status()
    assert (state.current, state.pending, state.floor) == (result.digest, None, 1)
    assert Store(tmp_path).versions() == [result.digest]
    assert list((tmp_path / "staging").iterdir()) == []
    assert events.kinds() == [
        "install-started",
        "downloaded",
        "verified",
        "staged",
        "health-check-passed",
        "activated",
        "committed",
    ]
    passed = dict(events.seen)["health-check-passed"]
    assert passed["gate"] == "process"
    assert 0 < passed["seconds"] < 120
    assert passed["p95_ms"] == result.health.p95_ms


def test_store_keeps_current_and_previous_only(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    _install_and_commit(u, bundles["v1"])
    d2 = _install_and_commit(u, bundles["v2"])
    d3 = _install_and_commit(u, bundles["v3"])
    state = u.status()
    assert (state.current, state.previous, state.floor) == (d3, d2, 3)
    assert Store(tmp_path).versions() == sorted([d2, d3])


def test_installing_the_current_version_again_changes_nothing(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    digest = _install_and_commit(u, bundles["v1"])
    before = u.status()
    assert u.install(str(bundles["v1"].path)).outcome == "already-current"
    assert u.status() == before
    assert Store(tmp_path).versions() == [digest]


def test_lower_sequence_is_refused_and_current_stays(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    d2 = _install_and_commit(u, bundles["v2"])
    d3 = _install_and_commit(u, bundles["v3"])
    with pytest.raises(RollbackError, match="below this device's floor 3"):
        u.install(str(bundles["v1"].path))
    state = u.status()
    assert (state.current, state.previous, state.floor) == (d3, d2, 3)
    assert state.last_failure is not None
    assert state.last_failure.phase == "verifying"
    assert Store(tmp_path).versions() == sorted([d2, d3])
    assert list((tmp_path / "staging").iterdir()) == []


def test_rolled_back_version_stays_below_the_floor(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    _install_and_commit(u, bundles["v1"])
    d2 = _install_and_commit(u, bundles["v2"])
    u.rollback()
    assert u.status().floor == 2
    # The version rolled away from may come back (it set the floor) ...
    assert u.install(str(bundles["v2"].path)).digest == d2
    u.commit()
    # ... but other content at that sequence may not.
    with pytest.raises(RollbackError):
        u.install(str(bundles["v2-other"].path))


def test_equal_sequence_with_other_content_is_refused(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    d2 = _install_and_commit(u, bundles["v2"])
    with pytest.raises(RollbackError, match="already committed with other content"):
        u.install(str(bundles["v2-other"].path))
    assert u.status().current == d2


def test_candidate_failing_its_health_check_never_becomes_current(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    events = Events()
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot, events=events)
    d1 = _install_and_commit(u, bundles["v1"])
    with pytest.raises(HealthCheckError, match="golden outputs do not match"):
        u.install(str(bundles["bad-golden"].path))
    state = u.status()
    assert (state.current, state.pending) == (d1, None)
    assert state.last_failure is not None
    assert state.last_failure.phase == "health-check"
    assert sum(state.attempts.values()) == 1
    assert Store(tmp_path).versions() == [d1]
    assert slot.digest == d1
    np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)
    assert events.kinds()[-1] == "failed"


def test_candidate_crashing_its_runtime_fails_the_gate_and_the_agent_keeps_serving(
    tmp_path: Path, bundles: dict[str, LifecycleBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default gate runs in a child process: a runtime that aborts there is a failed
    # health check, not a dead agent.
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    d1 = _install_and_commit(u, bundles["v1"])
    monkeypatch.setenv(FAULT_ENV, "crash")
    with pytest.raises(HealthCheckError, match="killed by SIGABRT"):
        u.install(str(bundles["v2"].path))
    state = u.status()
    assert (state.current, state.pending) == (d1, None)
    assert state.last_failure is not None
    assert state.last_failure.phase == "health-check"
    assert slot.digest == d1
    np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)


def test_thread_gate_checks_in_this_process(
    tmp_path: Path, bundles: dict[str, LifecycleBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "crash")  # would abort a child process, if one ran
    u = _updater(
        tmp_path, config=UpdaterConfig(update=UpdateConfig(health_gate="thread", health_runs=2))
    )
    with pytest.raises(HealthCheckError, match="golden outputs do not match"):
        u.install(str(bundles["bad-golden"].path))
    result = u.install(str(bundles["v1"].path))
    assert result.health is not None
    assert result.health.runs == 2


def test_bundle_that_keeps_failing_stops_at_the_loop_budget(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    loader = CountingLoader()
    u = _updater(
        tmp_path,
        loader=loader,
        config=UpdaterConfig(update=UpdateConfig(max_attempts=2, health_runs=1)),
    )
    for _ in range(2):
        with pytest.raises(HealthCheckError):
            u.install(str(bundles["bad-golden"].path))
    with pytest.raises(StateError, match="loop budget is 2"):
        u.install(str(bundles["bad-golden"].path))
    assert loader.loads == 2
    assert list(u.status().attempts.values()) == [2]


def test_bundle_from_an_untrusted_signer_is_refused(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    with pytest.raises(UntrustedSignerError):
        u.install(str(bundles["foreign"].path))
    state = u.status()
    assert state.last_failure is not None
    assert "trust policy" in state.last_failure.reason
    assert Store(tmp_path).versions() == []


def test_bundle_needing_a_runtime_the_device_lacks_is_refused(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path, device=DeviceInfo(runtimes={"litert": "2.3"}))
    with pytest.raises(CompatibilityError, match="no usable runtime"):
        u.install(str(bundles["v1"].path))


def test_expired_bundle_is_refused_beyond_the_clock_slack(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    expires = CREATED + timedelta(days=2)
    config = UpdaterConfig(update=UpdateConfig(clock_slack_s=300))
    late = _updater(tmp_path / "a", config=config, wall_clock=lambda: expires + timedelta(hours=1))
    with pytest.raises(ExpiredError):
        late.install(str(bundles["expiring"].path))
    within = _updater(
        tmp_path / "b", config=config, wall_clock=lambda: expires + timedelta(seconds=200)
    )
    assert within.install(str(bundles["expiring"].path)).outcome == "probation"


def test_interrupted_download_stays_pending_and_resumes(
    tmp_path: Path,
    server: BundleServer,  # noqa: F811 - fixture
    bundles: dict[str, LifecycleBundle],
) -> None:
    data = bundles["v1"].path.read_bytes()
    server.behaviour.content = data
    server.behaviour.cuts = 1
    server.behaviour.cut_at = len(data) // 2
    config = UpdaterConfig(fetch=FetchConfig(max_resumes=0, min_free_bytes=0))
    u = _updater(tmp_path, config=config)
    with pytest.raises(DownloadError):
        u.install(server.url())
    state = u.status()
    assert state.pending is not None
    assert state.pending.phase == "downloading"
    assert state.last_failure is not None

    result = u.install(server.url())
    assert result.outcome == "probation"
    assert server.behaviour.seen_ranges == [None, f"bytes={len(data) // 2}-"]


def test_disk_full_while_staging_fails_cleanly_and_keeps_serving(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    size = bundles["v2"].path.stat().st_size
    config = UpdaterConfig(fetch=FetchConfig(min_free_bytes=0))
    slot = ModelSlot()
    with tiny_tmpfs(tmp_path / "fs", "64k") as fs:
        u = _updater(fs, slot=slot, config=config)
        d1 = _install_and_commit(u, bundles["v1"])
        # Room for the downloaded bundle, not for a second, extracted copy of it.
        spare = shutil.disk_usage(fs).free - size - 8192
        (fs / "filler").write_bytes(b"\0" * max(spare, 0))
        with pytest.raises(StateError, match="cannot stage the bundle"):
            u.install(str(bundles["v2"].path))
        state = u.status()
        assert (state.current, state.pending) == (d1, None)
        assert state.last_failure is not None
        assert Store(fs).versions() == [d1]
        assert list((fs / "staging").iterdir()) == []
        assert slot.digest == d1
        np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)


def test_probation_commits_after_its_window_of_good_requests(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    d1 = _install_and_commit(u, bundles["v1"])
    candidate = u.install(str(bundles["watched"].path)).digest
    assert slot.digest == candidate
    assert u.check_probation() is not None
    assert u.status().current == d1
    for _ in range(20):
        np.testing.assert_allclose(_answer(slot), bundles["watched"].outputs, atol=1e-6)
    verdict = u.check_probation()
    assert verdict is not None
    assert verdict.state == "passed"
    state = u.status()
    assert (state.current, state.previous, state.floor) == (candidate, d1, 11)
    assert u.check_probation() is None


def test_probation_breach_rolls_back_to_the_previous_version_automatically(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    events = Events()
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot, events=events)
    d1 = _install_and_commit(u, bundles["v1"])
    u.install(str(bundles["slow"].path))
    for _ in range(20):
        slot.predict(golden_inputs())
    verdict = u.check_probation()
    assert verdict is not None
    assert verdict.state == "breached"
    state = u.status()
    assert (state.current, state.pending, state.floor) == (d1, None, 1)
    assert state.last_failure is not None
    assert state.last_failure.outcome == "rolled-back"
    assert "p95 latency" in state.last_failure.reason
    assert slot.digest == d1
    np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)
    kind, fields = events.seen[-1]
    assert kind == "rolled-back"
    assert "p95 latency" in fields["reason"]


def test_rollback_by_hand_serves_the_previous_version_at_once(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    d1 = _install_and_commit(u, bundles["v1"])
    _install_and_commit(u, bundles["v2"])
    np.testing.assert_allclose(_answer(slot), bundles["v2"].outputs, atol=1e-6)
    u.rollback()
    state = u.status()
    assert (state.current, state.previous, state.floor) == (d1, None, 2)
    assert slot.digest == d1
    np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)
    with pytest.raises(StateError, match="no previous version"):
        u.rollback()


def test_restart_during_probation_rolls_back(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    d1 = _install_and_commit(_updater(tmp_path), bundles["v1"])
    _updater(tmp_path).install(str(bundles["v2"].path))
    slot = ModelSlot()
    restarted = _updater(tmp_path, slot=slot)
    assert restarted.resume() is None
    restarted.start_serving()
    state = restarted.status()
    assert (state.current, state.pending) == (d1, None)
    assert state.last_failure is not None
    assert "restarted during probation" in state.last_failure.reason
    np.testing.assert_allclose(_answer(slot), bundles["v1"].outputs, atol=1e-6)


def test_install_during_probation_is_refused(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    u = _updater(tmp_path)
    u.install(str(bundles["v1"].path))
    with pytest.raises(StateError, match="in probation"):
        u.install(str(bundles["v2"].path))


def test_probation_watcher_thread_commits_once_the_window_is_served(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    _install_and_commit(u, bundles["v1"])
    candidate = u.install(str(bundles["watched"].path)).digest
    stop = threading.Event()
    watcher = threading.Thread(target=u.watch_probation, args=(stop, 0.01))
    watcher.start()
    try:
        for _ in range(20):
            slot.predict(golden_inputs())
        watcher.join(timeout=30)
    finally:
        stop.set()
    assert not watcher.is_alive()
    assert u.status().current == candidate


def test_rollback_by_hand_during_probation_drops_the_candidate(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    d1 = _install_and_commit(u, bundles["v1"])
    candidate = u.install(str(bundles["watched"].path)).digest
    state = u.rollback("operator saw bad answers")
    assert (state.current, state.pending) == (d1, None)
    assert state.last_failure is not None
    assert (state.last_failure.digest, state.last_failure.reason) == (
        candidate,
        "operator saw bad answers",
    )
    assert slot.digest == d1
    assert Store(tmp_path).versions() == [d1]


def test_restart_during_health_check_resumes_into_probation_and_keeps_serving_it(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    d1 = _install_and_commit(_updater(tmp_path), bundles["v1"])

    def dies(manifest: Manifest, model_dir: Path, runtime: str) -> ServingModel:
        raise KeyboardInterrupt  # stands in for the process dying while loading

    with pytest.raises(KeyboardInterrupt):
        _updater(tmp_path, loader=dies).install(str(bundles["v2"].path))
    pending = Store(tmp_path).load().pending
    assert pending is not None
    assert pending.phase == "health-check"

    slot = ModelSlot()
    restarted = _updater(tmp_path, slot=slot)
    result = restarted.resume()
    assert result is not None
    assert restarted.start_serving() == result.digest  # the candidate, not d1
    np.testing.assert_allclose(_answer(slot), bundles["v2"].outputs, atol=1e-6)
    verdict = restarted.check_probation()
    assert verdict is not None
    assert verdict.state == "passed"
    state = restarted.status()
    assert (state.current, state.previous) == (result.digest, d1)


def test_an_unforeseen_failure_abandons_the_install_and_the_next_start_serves(
    tmp_path: Path, bundles: dict[str, LifecycleBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = ModelSlot()
    u = _updater(tmp_path, slot=slot)
    digest = _install_and_commit(u, bundles["v1"])

    def broken(*_args: object, **_kwargs: object) -> None:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr("agent.install._updater.verify_bundle", broken)
    with pytest.raises(StateError, match="abandoned after an internal error"):
        u.install(str(bundles["v2"].path))
    state = u.status()
    assert state.pending is None
    assert state.last_failure is not None
    assert "internal error: UnicodeEncodeError" in state.last_failure.reason
    assert state.current == digest
    # A restart meets nothing pending: it serves the committed version.
    restarted = _updater(tmp_path, slot=ModelSlot())
    assert restarted.resume() is None
    assert restarted.start_serving() == digest


def test_a_relative_source_path_is_stored_absolute(
    tmp_path: Path, bundles: dict[str, LifecycleBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(bundles["v1"].path.parent)
    u = _updater(tmp_path / "state", config=UpdaterConfig(fetch=FetchConfig(max_bundle_bytes=1024)))
    with pytest.raises(DownloadError):  # too large: the install stays pending, to resume
        u.install(bundles["v1"].path.name)
    pending = u.status().pending
    assert pending is not None
    assert pending.source == str(bundles["v1"].path.resolve())
