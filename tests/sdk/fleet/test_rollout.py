"""Rollouts end to end: the CLI, a real mosquitto, and simulated devices."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sdk.cli import main
from sdk.fleet.publish import bundle_ref
from sdk.fleet.rollout import wave_order
from tests.support.broker import Broker, Subscriber
from tests.support.bundles import BundleParts, make_manifest
from tests.support.fake_device import FakeDevice

pytestmark = pytest.mark.integration

URL = "http://127.0.0.1:8000/digits.edgeship"
DEVICES = [f"dev{i:02}" for i in range(10)]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "digits.edgeship"
    path.write_bytes(BundleParts(manifest=make_manifest(sequence=7)).to_bytes())
    return path


def rollout_argv(
    broker: Broker, bundle: Path, tmp_path: Path, *extra: str, rid: str = "r1"
) -> list[str]:
    groups = tmp_path / "groups.toml"
    groups.write_text(f"[groups]\nall = {json.dumps(DEVICES)}\n")
    return [
        "rollout", str(bundle), "--url", URL, "--fleet", "f",
        "--broker", f"mqtt://{broker.host}:{broker.port}",
        "--group", "all", "--groups", str(groups), "--id", rid,
        "--waves", "20%,100%", "--min-healthy-time", "0.2", "--wave-timeout", "20",
        "--state-dir", str(tmp_path / "rollouts"), "--poll", "0.05", *extra,
    ]  # fmt: skip


def start(broker: Broker, bundle: Path, failing: list[str]) -> list[FakeDevice]:
    digest = bundle_ref(bundle, URL).digest
    return [
        FakeDevice(
            broker.host, broker.port, "f", d, fail_digests=[digest] if d in failing else []
        ).start()
        for d in DEVICES
    ]


def second_wave(n_failing: int) -> list[str]:
    order = wave_order("r1", tuple(sorted(DEVICES)))
    return list(order[2 : 2 + n_failing])  # the first wave (20%) is order[:2]


def status(tmp_path: Path, capsys: pytest.CaptureFixture[str], rid: str = "r1") -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert (
        main(["rollout", "status", rid, "--state-dir", str(tmp_path / "rollouts"), "--json"]) == 0
    )
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_a_rollout_advances_wave_by_wave_to_every_device(
    broker: Broker, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = start(broker, bundle, failing=second_wave(2))
    try:
        code = main(rollout_argv(broker, bundle, tmp_path, "--max-failure-rate", "0.3"))
    finally:
        for d in devices:
            d.stop()
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("publish") < out.index("complete")
    doc = status(tmp_path, capsys)
    assert doc["status"] == "completed"
    outcomes = [p["outcome"] for p in doc["progress"].values()]
    assert (outcomes.count("succeeded"), outcomes.count("failed")) == (8, 2)
    first = [d for d, p in doc["progress"].items() if p["wave"] == 0]
    assert sorted(first) == sorted(wave_order("r1", tuple(sorted(DEVICES)))[:2])


def test_a_rollout_halts_when_failures_pass_the_threshold_and_reverts(
    broker: Broker, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = start(broker, bundle, failing=second_wave(4))
    try:
        argv = rollout_argv(
            broker, bundle, tmp_path, "--max-failure-rate", "0.3", "--revert-on-halt"
        )
        code = main(argv)
        with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
            sub.wait_for(lambda m: False, timeout_s=0.5)  # retained messages only
            retained = [m for m in sub.snapshot() if m.payload]
    finally:
        for d in devices:
            d.stop()
    assert code == 2
    doc = status(tmp_path, capsys)
    assert doc["status"] == "halted"
    assert "4 of 10" in doc["reason"]
    assert retained == []  # no device had a desired state before: reverting clears it


def test_a_halted_rollout_cannot_resume_but_its_status_survives_the_cli(
    broker: Broker, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = start(broker, bundle, failing=list(DEVICES))
    try:
        assert main(rollout_argv(broker, bundle, tmp_path)) == 2
    finally:
        for d in devices:
            d.stop()
    assert status(tmp_path, capsys)["status"] == "halted"
    state_dir = str(tmp_path / "rollouts")
    assert main(["rollout", "resume", "r1", "--state-dir", state_dir]) == 1
    assert "halted" in capsys.readouterr().err


def test_an_aborted_rollout_stops_a_resumed_run(
    broker: Broker, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = start(broker, bundle, failing=[])
    for d in devices:
        d.silent = True  # nobody answers: the rollout would wait for the wave timeout
    state_dir = str(tmp_path / "rollouts")
    try:
        argv = rollout_argv(broker, bundle, tmp_path)
        result: list[int] = []
        runner = threading.Thread(target=lambda: result.append(main(argv)))
        runner.start()
        status_path = tmp_path / "rollouts" / "r1.json"
        for _ in range(200):
            if status_path.exists() and json.loads(status_path.read_text())["progress"]:
                break
            threading.Event().wait(0.05)
        assert main(["rollout", "abort", "r1", "--state-dir", state_dir]) == 0
        runner.join(10)
    finally:
        for d in devices:
            d.stop()
    assert result == [3]
    assert status(tmp_path, capsys)["status"] == "aborted"
