"""The checks before a rollout publishes: a real served bundle, a real broker, simulated
devices with the state they report. A failed check publishes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.cli import main
from tests.sdk.fleet._rollouts import (
    Served,
    desired_counts,
    devices,
    rollout_argv,
    serve_bundle,
    spawn,
    wait_record,
)
from tests.sdk.fleet.test_rollout_crash import RUNNER_TIMEOUT_S, run_until_killed
from tests.support.broker import Broker, Subscriber
from tests.support.bundles import BundleParts, make_key, make_manifest, make_policy

pytestmark = pytest.mark.integration

NAMES = ["d1", "d2", "d3"]
RUNS_9 = {"digest": "e" * 64, "name": "digits", "version": "0.9", "sequence": 9}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite")


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as s:
        yield s


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], sub: Subscriber) -> str:
    """Run the rollout; it must fail before publishing. Its error text."""
    capsys.readouterr()
    assert main(argv) == 1
    time.sleep(0.3)
    assert desired_counts(sub) == {}
    return capsys.readouterr().err


def test_a_device_running_a_higher_sequence_stops_the_rollout_naming_it(
    broker: Broker, served: Served, db: str, sub: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = devices(broker, ["d1", "d2"]) + devices(broker, ["d3"], state=RUNS_9)
    try:
        err = refused(rollout_argv(broker, served, db, NAMES), capsys, sub)
    finally:
        for d in fleet:
            d.stop()
    assert "preflight failed, nothing was published" in err
    assert "d3: runs sequence 9; the bundle's 7 must be higher" in err
    assert "d1:" not in err
    assert main(["rollout", "list", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # not even recorded


def test_a_url_serving_another_file_stops_the_rollout(
    broker: Broker, served: Served, db: str, sub: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    other = BundleParts(manifest=make_manifest(sequence=8)).to_bytes()
    (served.root / "digits.edgeship").write_bytes(other)  # the server's copy changed
    local = served.bundle.with_name("local.edgeship")
    local.write_bytes(BundleParts(manifest=make_manifest(sequence=7)).to_bytes())
    fleet = devices(broker, NAMES)
    argv = rollout_argv(broker, Served(local, served.url, served.trust, served.root), db, NAMES)
    try:
        err = refused(argv, capsys, sub)
    finally:
        for d in fleet:
            d.stop()
    assert "url: it does not serve this bundle" in err
    assert "serves another file" in err


def test_devices_reporting_no_state_stop_the_rollout_unless_allowed(
    broker: Broker, served: Served, db: str, sub: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = devices(broker, ["d1", "d2"])  # d3 has never reported anything
    try:
        err = refused(rollout_argv(broker, served, db, NAMES), capsys, sub)
        assert "d3: reports no state" in err
        argv = rollout_argv(broker, served, db, NAMES, "--allow-unknown-devices")
        argv[argv.index("--wave-timeout") + 1] = "1"  # d3 stays silent: time it out
        assert main(argv) == 2
    finally:
        for d in fleet:
            d.stop()
    assert "1 device(s) report no state: d3" in capsys.readouterr().out


def test_a_rollout_without_a_trust_policy_is_refused_before_connecting(
    broker: Broker, served: Served, db: str, sub: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = rollout_argv(broker, served, db, NAMES)
    i = argv.index("--trust")
    del argv[i : i + 2]
    assert "a rollout needs --trust POLICY" in refused(argv, capsys, sub)


def crashed_after_the_first_wave(broker: Broker, served: Served, db: str) -> list[str]:
    """A rollout whose runner died once its first wave was published; that wave's devices."""
    run_until_killed(rollout_argv(broker, served, db, NAMES), "rollout-wave-0-published")
    return sorted(wait_record(db, lambda r: True, timeout_s=1).progress)


def resume_with(broker: Broker, db: str, trust: Path) -> tuple[int, str]:
    time.sleep(RUNNER_TIMEOUT_S + 0.2)  # the killed runner's lease runs out
    argv = [
        "rollout", "resume", "r1", "--db", db, "--trust", str(trust),
        "--broker", f"mqtt://{broker.host}:{broker.port}", "--poll", "0.05",
    ]  # fmt: skip
    proc = spawn(argv)
    out, _ = proc.communicate(timeout=90)
    return proc.returncode, out


def test_resume_stops_when_the_url_serves_another_file_now(
    broker: Broker, served: Served, db: str, sub: Subscriber
) -> None:
    fleet = devices(broker, NAMES, silent=True)
    try:
        first = crashed_after_the_first_wave(broker, served, db)
        other = BundleParts(manifest=make_manifest(sequence=8)).to_bytes()
        (served.root / "digits.edgeship").write_bytes(other)
        code, out = resume_with(broker, db, served.trust)
    finally:
        for d in fleet:
            d.stop()
    assert code == 1, out
    assert "url: it does not serve this bundle" in out
    assert desired_counts(sub) == dict.fromkeys(first, 1)  # nothing more


def test_resume_stops_when_the_bundle_does_not_verify_against_the_given_trust(
    broker: Broker, served: Served, db: str, sub: Subscriber, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.toml"
    stranger.write_bytes(make_policy(make_key("stranger")).to_toml())
    fleet = devices(broker, NAMES, silent=True)
    try:
        first = crashed_after_the_first_wave(broker, served, db)
        code, out = resume_with(broker, db, stranger)
    finally:
        for d in fleet:
            d.stop()
    assert code == 1, out
    assert "trust: the bundle at" in out
    assert desired_counts(sub) == dict.fromkeys(first, 1)
