"""Shadow-gated rollouts against a real agent process serving a named model under traffic.

The agent (``edgeship-agent run``, a subprocess) serves two models, ``detector`` (a1) and
``default``; an HTTP client sends live requests to the detector the whole time. A
rollout to the detector with a shadow stage waits for the device's verdict: a candidate
exact on its golden inputs and wrong on live traffic is rejected in shadow (the rollout
halts with the device's numbers, the candidate never answered a request); a candidate
that agrees is promoted by the device, and the wave completes on that verdict.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.install import Updater
from sdk.cli import main
from sdk.fleet.serve import BundleServer
from tests.agent.test_daemon import AGENT, agent_toml
from tests.sdk.fleet._rollouts import status
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.lifecycle import (
    N_IN,
    N_OUT,
    POLICY,
    LifecycleBundle,
    golden_inputs,
    make_model_bundle,
)
from tests.support.models import make_onnx_golden_impostor

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "detector"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("bundles")
    impostor = make_onnx_golden_impostor(
        d / "impostor.onnx", golden_inputs()["x"], n_in=N_IN, n_hidden=16, n_out=N_OUT,
        seed=1, other_seed=9,
    )  # fmt: skip
    made: dict[str, Any] = {
        "a1": make_model_bundle(d, seed=1, sequence=1),
        "same": make_model_bundle(d, seed=1, sequence=3),
        "impostor": make_model_bundle(d, seed=101, sequence=2, model=impostor),
    }
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    state = d / "state-a1"  # the detector's state with a1 committed, copied for each test
    updater = Updater(state, POLICY)
    updater.install(str(made["a1"].path))
    updater.commit()
    with BundleServer(d) as server:
        server.start()
        yield {**made, "trust": trust, "state": state, "server": server}


class Traffic(threading.Thread):
    """Live requests (inputs unlike the golden ones) to the detector; what answered."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1/models/{MODEL}/predict"
        self.stop = threading.Event()
        self.versions: dict[str, int] = {}
        self.failed: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.is_set():
            x = rng.standard_normal((1, N_IN)).astype(np.float32)
            body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    version = json.loads(answer.read())["model"]
                    self.versions[version] = self.versions.get(version, 0) + 1
            except (OSError, urllib.error.HTTPError) as exc:
                self.failed.append(str(exc))
            time.sleep(0.005)  # about 150 requests/s: leaves the idle CPU the shadow uses


@pytest.fixture
def traffic(tmp_path: Path, broker: Broker, bundles: dict[str, Any]) -> Iterator[Traffic]:
    """The agent as a real process, its detector on a1, under live traffic."""
    state_dir = tmp_path / "state"
    (state_dir / "models").mkdir(parents=True)
    shutil.copytree(bundles["state"], state_dir / "models" / MODEL)
    port = free_port()
    extra = (
        f"[http]\nenabled = true\nport = {port}\nrate_limit_per_s = 10000\nburst = 10000\n"
        f"[models.{MODEL}]\n[models.default]\n"
    )
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(state_dir, bundles["trust"], broker, extra))
    topic = f"edgeship/v1/f/d1/models/{MODEL}/state"
    with Subscriber(broker, topic, clean=True) as sub:
        proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def reported(_: object) -> bool:
            docs = [json.loads(m.payload) for m in sub.snapshot() if m.payload]
            return any((d.get("current") or {}).get("sequence") == 1 for d in docs)

        t = Traffic(port)
        try:
            assert sub.wait_for(reported, timeout_s=60), "the agent did not report its state"
            _wait_for_port(port)  # the HTTP endpoint starts after the state is reported
            t.start()
            yield t
        finally:
            t.stop.set()
            if t.is_alive():
                t.join(15)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def rollout(broker: Broker, bundles: dict[str, Any], db: str, bundle: LifecycleBundle) -> int:
    argv = [
        "rollout", str(bundle.path), "--url", bundles["server"].url_for(bundle.path.name),
        "--trust", str(bundles["trust"]), "--model", MODEL,
        "--fleet", "f", "--device", "d1", "--broker", f"mqtt://{broker.host}:{broker.port}",
        "--db", db, "--id", "r1", "--waves", "100%", "--max-failure-rate", "0",
        "--min-healthy-time", "0", "--wave-timeout", "120", "--poll", "0.1",
        "--shadow", "--shadow-min-samples", "60", "--shadow-min-agreement", "0.95",
        "--shadow-sample-rate", "1", "--shadow-max-latency-ratio", "100",
    ]  # fmt: skip
    return main(argv)


def test_a_shadow_rejection_on_live_traffic_halts_the_rollout_before_the_candidate_serves(
    broker: Broker,
    bundles: dict[str, Any],
    traffic: Traffic,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = str(tmp_path / "fleet.sqlite")
    assert rollout(broker, bundles, db, bundles["impostor"]) == 2
    doc = status(db, capsys)
    assert doc["status"] == "halted"
    reason = doc["progress"]["d1"]["reason"]
    assert "shadow" in reason
    assert "agreement" in reason
    traffic.stop.set()
    traffic.join(15)
    assert not traffic.failed
    assert len(traffic.versions) == 1  # a1 answered every request; the impostor none


def test_a_candidate_that_agrees_completes_its_wave_on_the_devices_shadow_verdict(
    broker: Broker,
    bundles: dict[str, Any],
    traffic: Traffic,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = str(tmp_path / "fleet.sqlite")
    started = time.monotonic()
    assert rollout(broker, bundles, db, bundles["same"]) == 0, time.monotonic() - started
    doc = status(db, capsys)
    assert doc["status"] == "completed"
    traffic.stop.set()
    traffic.join(15)
    assert not traffic.failed
    assert len(traffic.versions) == 2  # a1, then the promoted candidate
