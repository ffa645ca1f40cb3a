"""Crash safety: the agent, as a real subprocess, is SIGKILLed during an install.

At every named crash point (``EDGESHIP_CRASH_AT``) and at random moments; after each
crash the state file must parse, ``current`` must name a whole, verified version, and a
restarted agent must finish the install or roll it back.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.install._store import Store
from agent.install._updater import Updater
from agent.install.faults import CRASH_ENV, CRASH_POINTS
from tests.support.lifecycle import POLICY, LifecycleBundle, make_model_bundle

pytestmark = pytest.mark.integration

AGENT = [sys.executable, "-c", "from agent.cli import main; raise SystemExit(main())"]


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, LifecycleBundle, LifecycleBundle]:
    d = tmp_path_factory.mktemp("crash")
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    v1 = make_model_bundle(d, seed=1, sequence=1)
    v2 = make_model_bundle(d, seed=2, sequence=2)
    return trust, v1, v2


def _agent(
    *args: str, crash_at: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [*AGENT, *args], env=env, capture_output=True, text=True, check=check, timeout=60
    )


def _assert_whole_current(state_dir: Path) -> str:
    """The state parses and ``current`` is a complete, verified version in the store."""
    store = Store(state_dir)
    state = store.load()
    assert state.current is not None
    manifest = store.manifest(state.current)
    root = store.version_dir(state.current)
    assert hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest() == state.current
    for entry in manifest.files:
        data = (root / entry.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
    return state.current


def _first_install(state_dir: Path, v1: LifecycleBundle) -> str:
    updater = Updater(state_dir, POLICY)
    digest = updater.install(str(v1.path)).digest
    updater.commit()
    return digest


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_install_killed_at_a_crash_point_recovers_to_a_verified_version(
    tmp_path: Path, setup: tuple[Path, LifecycleBundle, LifecycleBundle], point: str
) -> None:
    trust, v1, v2 = setup
    d1 = _first_install(tmp_path, v1)
    common = ["--state-dir", str(tmp_path), "--trust", str(trust)]

    crashed = _agent("install", str(v2.path), *common, crash_at=point, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    assert _assert_whole_current(tmp_path) in (d1, Store(tmp_path).load().floor_digest)
    _agent("resume", *common)
    after_resume = _assert_whole_current(tmp_path)
    state = Store(tmp_path).load()
    assert state.pending is None
    if point == "probation":
        # A restart in probation rolls back: the candidate may have caused it.
        assert after_resume == d1
        assert state.last_failure is not None
        assert "restarted during probation" in state.last_failure.reason
        _agent("install", str(v2.path), *common)
    d2 = _assert_whole_current(tmp_path)
    assert d2 != d1
    assert Store(tmp_path).load().floor == 2
    assert sorted(Store(tmp_path).versions()) == sorted([d1, d2])
    assert list((tmp_path / "staging").iterdir()) == []


def test_install_killed_at_random_moments_always_leaves_a_verified_version(
    tmp_path: Path, setup: tuple[Path, LifecycleBundle, LifecycleBundle]
) -> None:
    trust, v1, v2 = setup
    rng = random.Random(4)
    common = ["--trust", str(trust)]
    for i in range(4):
        state_dir = tmp_path / str(i)
        d1 = _first_install(state_dir, v1)
        proc = subprocess.Popen(
            [*AGENT, "install", str(v2.path), "--state-dir", str(state_dir), *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill somewhere inside the install proper, not while Python is still importing.
        while proc.poll() is None and Store(state_dir).load().pending is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _assert_whole_current(state_dir) in (d1, Store(state_dir).load().floor_digest)
        _agent("resume", "--state-dir", str(state_dir), *common)
        _assert_whole_current(state_dir)
        _agent("install", str(v2.path), "--state-dir", str(state_dir), *common)
        assert _assert_whole_current(state_dir) != d1
