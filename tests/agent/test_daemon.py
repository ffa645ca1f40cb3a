"""The long-running agent with a real mosquitto, real bundles over HTTP, real onnxruntime.

In-process: desired state over MQTT installs, reports and serves a bundle; a new desired
bundle hot-swaps under load; a bundle failing its health gate is refused while the
current one keeps serving. As a real subprocess (``edgeship-agent run``): it starts,
connects, reloads on SIGHUP, and on SIGTERM finishes the request in flight, says it is
offline and exits 0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.bundle import verify_bundle
from agent.bundle.manifest import Health, ModelSpec, Probation, TensorSpec, Tolerance
from agent.config import parse_config
from agent.daemon import Agent
from agent.install._updater import Updater
from agent.messages.topics import Topics
from tests.support.broker import Broker, Pki, Subscriber, free_port
from tests.support.bundles import (
    EXPECTED_PATH,
    GOLDEN_PATH,
    MODEL_PATH,
    BundleParts,
    make_manifest,
)
from tests.support.lifecycle import (
    KEY,
    N_IN,
    NO_WAIT,
    POLICY,
    LifecycleBundle,
    golden_inputs,
    make_model_bundle,
    reference_outputs,
)
from tests.support.models import make_onnx_mlp

pytestmark = pytest.mark.integration

FLEET, DEVICE = "f", "d1"
TOPICS = Topics(FLEET, DEVICE)
AGENT = [sys.executable, "-c", "from agent.cli import main; raise SystemExit(main())"]


# --- fixtures: bundles served over HTTP ----------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("bundles")
    made = {
        "v1": make_model_bundle(d, seed=1, sequence=1),
        "v2": make_model_bundle(d, seed=2, sequence=2),
        # Signed properly, but its expected outputs are wrong: the health gate refuses it.
        "bad": make_model_bundle(d, seed=3, sequence=3, expected_shift=1.0),
        # Passes its health gate, then breaches probation: no p95 is under 1 ns.
        "slow": make_model_bundle(
            d,
            seed=4,
            sequence=4,
            probation=Probation(requests=3, seconds=0.0, max_error_rate=0.0, max_p95_ms=1e-6),
        ),
    }
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(d))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    yield {**made, "url": f"http://127.0.0.1:{server.server_address[1]}", "trust": trust}
    server.shutdown()
    server.server_close()


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return verify_bundle(f, POLICY, now=datetime.now(UTC)).digest


def desired_payload(bundle: LifecycleBundle, base_url: str, ts: float = 1.0) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "fleet": FLEET,
            "device": DEVICE,
            "ts": ts,
            "bundle": {
                "url": f"{base_url}/{bundle.path.name}",
                "sha256": hashlib.sha256(bundle.path.read_bytes()).hexdigest(),
                "digest": _digest(bundle.path),
                "sequence": bundle.sequence,
                "name": "mlp",
                "version": f"1.{bundle.sequence}",
            },
            "rollout": "r1",
        }
    ).encode()


def publish_retained(broker: Broker, topic: str, payload: bytes, *, retain: bool = True) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def latest(sub: Subscriber, topic: str) -> dict[str, Any] | None:
    for m in reversed(sub.snapshot()):
        if m.topic == topic and m.payload:
            doc: dict[str, Any] = json.loads(m.payload)
            return doc
    return None


def wait_state(sub: Subscriber, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def ok(_: object) -> bool:
        doc = latest(sub, TOPICS.state)
        return doc is not None and predicate(doc)

    assert sub.wait_for(ok, timeout_s=30), latest(sub, TOPICS.state)
    doc = latest(sub, TOPICS.state)
    assert doc is not None
    return doc


def events(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.snapshot() if m.topic == TOPICS.events]


def agent_toml(state_dir: Path, trust: Path, broker: Broker, extra: str = "") -> str:
    return (
        f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nstate_dir = "{state_dir}"\n'
        f'trust_policy = "{trust}"\ndrain_timeout_s = 20\n'
        f'[broker]\nurl = "mqtt://{broker.host}:{broker.port}"\n'
        "connect_timeout_s = 5\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n"
        "[telemetry]\ninterval_s = 3600\n"
        "[fetch]\nretry_initial_s = 0.2\n"
        "[update]\nhealth_runs = 3\n"
        f"{extra}"
    )


@pytest.fixture
def agent_factory(
    tmp_path: Path, broker: Broker, bundles: dict[str, Any]
) -> Iterator[Callable[[], Agent]]:
    started: list[Agent] = []

    def make() -> Agent:
        config = parse_config(agent_toml(tmp_path / "state", bundles["trust"], broker))
        agent = Agent(config)
        agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture
def watch(broker: Broker) -> Iterator[Subscriber]:
    with Subscriber(broker, f"{TOPICS.base}/#", clean=True) as sub:
        yield sub


def _install(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], name: str, ts: float = 1.0
) -> dict[str, Any]:
    bundle = bundles[name]
    publish_retained(broker, TOPICS.desired, desired_payload(bundle, bundles["url"], ts))
    digest = _digest(bundle.path)
    return wait_state(
        watch,
        lambda s: (s["current"] or {}).get("digest") == digest and s["pending"] is None,
    )


# --- in-process --------------------------------------------------------------------------


def test_desired_bundle_is_installed_reported_and_served(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent = agent_factory()
    assert agent.digest is None
    state = _install(broker, watch, bundles, "v1")

    d1 = _digest(bundles["v1"].path)
    assert state["current"] == {"digest": d1, "name": "mlp", "version": "1.1", "sequence": 1}
    assert state["probation"] == {"digest": d1, "passed": True}
    assert state["desired_digest"] == d1
    assert (state["v"], state["fleet"], state["device"]) == (1, FLEET, DEVICE)
    assert agent.digest == d1
    np.testing.assert_allclose(
        agent.predict(golden_inputs())["probs"], bundles["v1"].outputs, rtol=1e-5
    )
    assert watch.wait_for(
        lambda _: (
            {"install-started", "verified", "activated", "committed"}
            <= {e["event"] for e in events(watch)}
        )
    )
    status = latest(watch, TOPICS.status)
    assert status is not None
    assert status["status"] == "online"


def test_predictions_are_recorded_in_telemetry(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent = agent_factory()
    _install(broker, watch, bundles, "v1")
    for _ in range(5):
        agent.predict(golden_inputs())
    with pytest.raises(Exception, match="x"):
        agent.predict({"x": np.zeros((1, N_IN + 1), np.float32)})
    assert agent.reporter is not None
    agent.reporter.report_now()

    def telemetry() -> dict[str, Any] | None:
        return latest(watch, TOPICS.telemetry)

    assert watch.wait_for(lambda _: telemetry() is not None)
    t = telemetry()
    assert t is not None
    assert t["metrics"]["requests"] == 6
    assert t["metrics"]["errors"] == {"invalid-input": 1}
    assert t["metrics"]["model"] == {
        "name": "mlp",
        "version": "1.1",
        "sequence": 1,
        "runtime": "onnxruntime",
        "provider": "CPUExecutionProvider",
    }
    assert t["drift"]["outputs"]["kind"] == "top_score"


def test_new_desired_bundle_hot_swaps_under_load(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent = agent_factory()
    _install(broker, watch, bundles, "v1")
    inputs = golden_inputs()
    answers: list[npt.NDArray[Any]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answers.append(agent.predict(inputs)["probs"])
            except Exception as exc:  # noqa: BLE001 - any failure fails the test below
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        state = _install(broker, watch, bundles, "v2")
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert failures == []
    v1, v2 = bundles["v1"].outputs, bundles["v2"].outputs
    assert all(np.allclose(a, v1, rtol=1e-5) or np.allclose(a, v2, rtol=1e-5) for a in answers)
    assert state["previous"]["digest"] == _digest(bundles["v1"].path)
    np.testing.assert_allclose(agent.predict(inputs)["probs"], v2, rtol=1e-5)


def test_bundle_failing_its_health_check_is_refused_and_current_keeps_serving(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent = agent_factory()
    _install(broker, watch, bundles, "v1")
    d1, bad = _digest(bundles["v1"].path), _digest(bundles["bad"].path)
    publish_retained(broker, TOPICS.desired, desired_payload(bundles["bad"], bundles["url"]))

    state = wait_state(watch, lambda s: (s["last_failure"] or {}).get("digest") == bad)
    assert state["current"]["digest"] == d1
    assert state["pending"] is None
    assert state["desired_digest"] == bad
    assert "golden outputs do not match" in state["last_failure"]["reason"]
    assert agent.digest == d1
    np.testing.assert_allclose(
        agent.predict(golden_inputs())["probs"], bundles["v1"].outputs, rtol=1e-5
    )
    assert watch.wait_for(
        lambda _: any(e["event"] == "failed" and e["digest"] == bad for e in events(watch))
    )


def test_probation_breach_rolls_back_and_is_reported(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent = agent_factory()
    _install(broker, watch, bundles, "v1")
    d1, slow = _digest(bundles["v1"].path), _digest(bundles["slow"].path)
    publish_retained(broker, TOPICS.desired, desired_payload(bundles["slow"], bundles["url"]))
    wait_state(
        watch,
        lambda s: (
            (s["pending"] or {}).get("digest") == slow and s["pending"]["phase"] == "probation"
        ),
    )
    assert agent.digest == slow
    for _ in range(3):
        agent.predict(golden_inputs())

    state = wait_state(watch, lambda s: s["probation"] == {"digest": slow, "passed": False})
    assert state["current"]["digest"] == d1
    assert state["last_failure"]["outcome"] == "rolled-back"
    assert "p95 latency" in state["last_failure"]["reason"]
    assert agent.digest == d1


def test_failed_download_of_the_desired_bundle_is_retried(
    broker: Broker, watch: Subscriber, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent_factory()
    v1 = bundles["v1"]
    late = v1.path.with_name("published-late.bundle")
    late.unlink(missing_ok=True)
    payload = json.loads(desired_payload(v1, bundles["url"]))
    payload["bundle"]["url"] = f"{bundles['url']}/{late.name}"
    publish_retained(broker, TOPICS.desired, json.dumps(payload).encode())
    assert watch.wait_for(lambda _: "download-failed" in {e["event"] for e in events(watch)})

    shutil.copyfile(v1.path, late)
    try:
        wait_state(watch, lambda s: (s["current"] or {}).get("digest") == _digest(v1.path))
    finally:
        late.unlink()


def test_agent_connects_with_mutual_tls_from_its_config(
    tmp_path: Path, broker_factory: Callable[..., Broker], pki: Pki, bundles: dict[str, Any]
) -> None:
    broker = broker_factory(tls="mtls", pki=pki)
    cert = pki.client(DEVICE)
    text = (
        agent_toml(tmp_path / "state", bundles["trust"], broker).replace("mqtt://", "mqtts://")
        + "[attributes]\nsite = 'lab'\n"
    )
    text = text.replace(
        "[telemetry]",
        f'ca_file = "{pki.ca_file}"\ncert_file = "{cert.cert_file}"\n'
        f'key_file = "{cert.key_file}"\n[telemetry]',
    )
    with Agent(parse_config(text)) as agent:
        assert agent.transport is not None
        assert agent.transport.wait_connected(10)  # type: ignore[attr-defined]
        with Subscriber(broker, TOPICS.status, clean=True, cert=pki.client("collector")) as sub:
            assert sub.wait_for(lambda _: latest(sub, TOPICS.status) is not None)
            status = latest(sub, TOPICS.status)
    assert status is not None
    assert status["status"] == "online"
    assert status["attributes"]["site"] == "lab"


def test_a_second_agent_on_the_same_state_directory_is_refused(
    tmp_path: Path, broker: Broker, bundles: dict[str, Any], agent_factory: Callable[[], Agent]
) -> None:
    agent_factory()
    config = parse_config(agent_toml(tmp_path / "state", bundles["trust"], broker))
    with pytest.raises(Exception, match="another edgeship agent is running"):
        Agent(config).start()


# --- the agent as a real subprocess ------------------------------------------------------


def _slow_bundle(directory: Path) -> tuple[Path, Path]:
    """A signed bundle of a deep MLP: a large batch takes a noticeable time."""
    rng = np.random.default_rng(5)
    width, depth = 512, 10
    dims = [N_IN] + [width] * depth + [4]
    weights = [
        (rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a), np.zeros(b, np.float32))
        for a, b in itertools.pairwise(dims)
    ]
    model = make_onnx_mlp(directory / "slow.onnx", weights=weights)
    inputs = golden_inputs()
    buf_in, buf_out = _npz(inputs), _npz({"probs": reference_outputs(model, inputs)})
    payload = {MODEL_PATH: model.read_bytes(), GOLDEN_PATH: buf_in, EXPECTED_PATH: buf_out}
    manifest = make_manifest(
        payload,
        name="slow",
        version="1.0",
        sequence=1,
        model=ModelSpec(
            format="onnx",
            file=MODEL_PATH,
            inputs=(TensorSpec("x", "float32", (None, N_IN)),),
            outputs=(TensorSpec("probs", "float32", (None, 4)),),
        ),
        health=Health(
            GOLDEN_PATH, EXPECTED_PATH, Tolerance(atol=1e-5, rtol=1e-4), probation=NO_WAIT
        ),
    )
    path = directory / "slow.bundle"
    path.write_bytes(BundleParts(manifest=manifest, payload=payload, keys=(KEY,)).to_bytes())
    return path, model


def _npz(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


class _Lines:
    """Collects a subprocess's stderr lines (JSON logs) on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        stream = self._stream = proc.stderr
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._thread.join(10)
        self._stream.close()

    def events(self) -> list[str]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line)["event"])
        return out

    def wait_for(self, event: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if event in self.events():
                return
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} in the agent's log:\n{''.join(self.lines)}")


def test_agent_process_reloads_on_sighup_and_stops_cleanly_on_sigterm(
    tmp_path: Path, broker: Broker, bundles: dict[str, Any]
) -> None:
    path, model = _slow_bundle(tmp_path)
    state_dir = tmp_path / "state"
    updater = Updater(state_dir, POLICY)
    updater.install(str(path))
    updater.commit()
    port = free_port()
    config = tmp_path / "agent.toml"
    http_section = f"[http]\nenabled = true\nport = {port}\n[runtime]\nthreads = 1\n"
    config.write_text(agent_toml(state_dir, bundles["trust"], broker, http_section))

    with Subscriber(broker, f"{TOPICS.base}/status", clean=True) as sub:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env
        )
        logs = _Lines(proc)
        try:
            logs.wait_for("agent started")
            assert sub.wait_for(
                lambda _: (latest(sub, TOPICS.status) or {}).get("status") == "online"
            )

            config.write_text(
                agent_toml(state_dir, bundles["trust"], broker, http_section).replace(
                    "interval_s = 3600", "interval_s = 1800"
                )
            )
            proc.send_signal(signal.SIGHUP)
            logs.wait_for("configuration reloaded")
            assert "telemetry interval changed" in logs.events()

            # A request that takes a while; SIGTERM arrives while it runs.
            batch = np.random.default_rng(1).standard_normal((16384, N_IN)).astype(np.float32)
            body = json.dumps({"inputs": {"x": batch.tolist()}}).encode()
            answer: dict[str, Any] = {}

            def request() -> None:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/predict",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer["status"] = r.status
                    answer["body"] = json.loads(r.read())
                answer["at"] = time.monotonic()

            client = threading.Thread(target=request)
            client.start()
            time.sleep(0.3)
            killed_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            client.join(60)
            assert proc.wait(timeout=60) == 0, "".join(logs.lines)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            logs.close()

        assert answer.get("status") == 200, "".join(logs.lines)
        assert answer["at"] > killed_at  # it was still running when SIGTERM arrived
        probs = answer["body"]["outputs"]["probs"]
        got = np.asarray(probs["data"], np.float32).reshape(probs["shape"])
        np.testing.assert_allclose(
            got, reference_outputs(model, {"x": batch}), rtol=1e-4, atol=1e-6
        )
        assert "stopping" in logs.events()
        assert sub.wait_for(
            lambda _: (latest(sub, TOPICS.status) or {}).get("reason") == "shutdown"
        )
