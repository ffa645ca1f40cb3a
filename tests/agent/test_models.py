"""Several models on one agent, and the stages a candidate can pass through before it serves.

In-process agents with real bundles over HTTP and real onnxruntime sessions: two models
installed, updated and rolled back independently while both serve; a candidate that is
exact on its golden inputs and wrong elsewhere rejected in shadow before it answers a
single request; an identical candidate promoted by its shadow verdict; an A/B split within
binomial bounds, sticky by key, then promoted; feedback accuracy per version; an agent
restarted mid-shadow resuming its counters. The same over MQTT: named models' desired and
state topics.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import Probation
from agent.config import parse_config
from agent.daemon import Agent
from agent.errors import UnknownModelError, UnknownRequestError
from agent.messages.desired import BundleRef, Desired, ProbationRule, PromotionRule, Split
from agent.messages.topics import Topics
from tests.agent.test_daemon import _Quiet, publish_retained
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.lifecycle import (
    N_IN,
    N_OUT,
    POLICY,
    LifecycleBundle,
    golden_inputs,
    make_model_bundle,
)
from tests.support.models import make_onnx_golden_impostor, make_onnx_mlp

pytestmark = pytest.mark.integration

FLEET, DEVICE = "f", "d1"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("bundles")
    impostor = make_onnx_golden_impostor(
        d / "impostor.onnx",
        golden_inputs()["x"],
        n_in=N_IN,
        n_hidden=16,
        n_out=N_OUT,
        seed=1,
        other_seed=9,
    )
    made = {
        "a1": make_model_bundle(d, seed=1, sequence=1),
        "a2": make_model_bundle(d, seed=2, sequence=2),
        # The same weights as a1 under a new sequence: a candidate that agrees everywhere.
        "a1-again": make_model_bundle(d, seed=1, sequence=3),
        # Exact on the golden inputs (its gate passes), wrong on 60 % of other inputs.
        "impostor": make_model_bundle(d, seed=101, sequence=4, model=impostor),
        "b1": make_model_bundle(d / "b", seed=5, sequence=1),
        # Another model (seed 2) with a long probation window: ground truth decides it.
        "a2-watched": make_model_bundle(
            d, seed=2, sequence=5, probation=Probation(requests=100_000, seconds=0.0)
        ),
        "b2": make_model_bundle(d / "b", seed=6, sequence=2),
    }
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(d))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    yield {**made, "url": f"http://127.0.0.1:{server.server_address[1]}", "dir": d, "trust": trust}
    server.shutdown()
    server.server_close()


def digest_of(bundle: LifecycleBundle) -> str:
    with bundle.path.open("rb") as f:
        return verify_bundle(f, POLICY, now=datetime.now(UTC)).digest


def desired(bundles: dict[str, Any], name: str, *, model: str = "default", **stage: Any) -> Desired:
    b: LifecycleBundle = bundles[name]
    rel = b.path.relative_to(bundles["dir"]).as_posix()
    ref = BundleRef(
        url=f"{bundles['url']}/{rel}",
        sha256=hashlib.sha256(b.path.read_bytes()).hexdigest(),
        digest=digest_of(b),
        sequence=b.sequence,
        name="mlp",
        version=f"1.{b.sequence}",
    )
    return Desired(ref, "r1", time.time(), model=model, **stage)


def toml(state_dir: Path, trust: Path, models: tuple[str, ...], extra: str = "") -> str:
    tables = "".join(f"[models.{m}]\n" for m in models)
    return (
        f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nstate_dir = "{state_dir}"\n'
        f'trust_policy = "{trust}"\n[update]\nhealth_runs = 3\n{extra}{tables}'
    )


@pytest.fixture
def make_agent(tmp_path: Path, bundles: dict[str, Any]) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def make(models: tuple[str, ...] = ("detector", "classifier"), extra: str = "") -> Agent:
        config = parse_config(toml(tmp_path / "state", bundles["trust"], models, extra))
        agent = Agent(config)
        agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


def wait(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def serving(agent: Agent, model: str) -> str | None:
    return agent.host(model).slot.digest


def committed(agent: Agent, model: str, digest: str) -> Callable[[], bool]:
    def ok() -> bool:
        state = agent.host(model).updater.status()
        return state.current == digest and state.pending is None

    return ok


def live_inputs(seed: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, N_IN)).astype(np.float32)}


# --- several models ----------------------------------------------------------------------


def test_two_models_install_update_and_roll_back_independently_while_both_serve(
    make_agent: Callable[..., Agent], bundles: dict[str, Any], tmp_path: Path
) -> None:
    agent = make_agent()
    assert agent.models == ["detector", "classifier"]
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    agent.apply_desired(desired(bundles, "b1", model="classifier"))
    a1, a2, b1 = digest_of(bundles["a1"]), digest_of(bundles["a2"]), digest_of(bundles["b1"])
    wait(committed(agent, "detector", a1), "detector on a1")
    wait(committed(agent, "classifier", b1), "classifier on b1")
    x = golden_inputs()
    assert np.allclose(agent.predict(x, model="detector")["probs"], bundles["a1"].outputs)
    assert np.allclose(agent.predict(x, model="classifier")["probs"], bundles["b1"].outputs)
    # Each model keeps its own state directory.
    assert (tmp_path / "state/models/detector/state.json").is_file()
    assert (tmp_path / "state/models/classifier/state.json").is_file()
    with pytest.raises(UnknownModelError, match="several models"):
        agent.predict(x)
    with pytest.raises(UnknownModelError, match="no model 'camera'"):
        agent.predict(x, model="camera")

    # The detector is updated while the classifier answers without pause.
    failures: list[BaseException] = []
    answered: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answered.add(agent.predict_versioned(x, model="classifier")[0])
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        agent.apply_desired(desired(bundles, "a2", model="detector"))
        wait(committed(agent, "detector", a2), "detector on a2")
        agent.host("detector").updater.rollback("test: back to a1")
        wait(lambda: serving(agent, "detector") == a1, "detector rolled back to a1")
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert answered == {b1}
    assert agent.host("classifier").updater.status().current == b1
    assert agent.status("classifier")["model"] == "classifier"
    assert agent.status("detector")["current"]["digest"] == a1


def test_a_single_model_config_keeps_its_layout_and_api(
    make_agent: Callable[..., Agent], bundles: dict[str, Any], tmp_path: Path
) -> None:
    agent = make_agent(models=())
    assert agent.models == ["default"]
    agent.apply_desired(desired(bundles, "a1"))
    a1 = digest_of(bundles["a1"])
    wait(committed(agent, "default", a1), "a1")
    assert (tmp_path / "state/state.json").is_file()
    assert not (tmp_path / "state/models").exists()
    assert agent.digest == a1
    assert agent.predict_versioned(golden_inputs())[0] == a1
    assert agent.status()["model"] == "default"


# --- shadow ----------------------------------------------------------------------------


def _drive(agent: Agent, model: str, until: Callable[[], bool], seen: set[str]) -> int:
    """Live traffic (inputs unlike the golden ones) until ``until``; what answered in ``seen``."""
    n = 0
    deadline = time.monotonic() + 120
    while not until():
        assert time.monotonic() < deadline, agent.status(model)
        version, _ = agent.predict_versioned(live_inputs(n), model=model)
        seen.add(version)
        n += 1
        # Leave the CPU idle now and then: the shadow runs at idle priority, in what
        # serving leaves (a busy machine around the test must not starve it).
        time.sleep(0.002)
    return n


def test_a_candidate_exact_on_golden_inputs_but_wrong_on_live_traffic_is_rejected_in_shadow(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    agent = make_agent(models=("detector",))
    a1, impostor = digest_of(bundles["a1"]), digest_of(bundles["impostor"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    rule = PromotionRule(min_samples=100, min_agreement=0.95, sample_rate=1.0)
    agent.apply_desired(desired(bundles, "impostor", model="detector", shadow=rule))
    host = agent.host("detector")
    wait(
        lambda: (
            host.updater.status().pending is not None
            and host.updater.status().pending.phase == "shadow"
        ),
        "the shadow stage",
    )  # type: ignore[union-attr]
    seen: set[str] = set()

    def rejected() -> bool:
        failure = host.updater.status().last_failure
        return failure is not None and failure.digest == impostor

    _drive(agent, "detector", rejected, seen)
    failure = host.updater.status().last_failure
    assert failure is not None
    assert failure.phase == "shadow"
    assert "rejected in shadow" in failure.reason
    assert "agreement" in failure.reason
    assert seen == {a1}  # the impostor never answered a request
    assert host.updater.status().current == a1
    assert agent.status("detector")["shadow"] is None
    assert not (host.store.root / "shadow.json").exists()


def test_a_candidate_that_agrees_is_promoted_by_its_shadow_verdict(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    agent = make_agent(models=("detector",))
    a1, same = digest_of(bundles["a1"]), digest_of(bundles["a1-again"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    rule = PromotionRule(min_samples=40, min_agreement=0.99, sample_rate=1.0, max_latency_ratio=50)
    agent.apply_desired(desired(bundles, "a1-again", model="detector", shadow=rule))
    seen: set[str] = set()
    _drive(agent, "detector", committed(agent, "detector", same), seen)
    assert agent.host("detector").updater.status().current == same


def test_an_agent_restarted_mid_shadow_resumes_its_counters(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    agent = make_agent(models=("detector",))
    a1 = digest_of(bundles["a1"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    never = PromotionRule(min_samples=10**6, min_agreement=0.0, sample_rate=1.0)
    agent.apply_desired(desired(bundles, "a1-again", model="detector", shadow=never))
    host = agent.host("detector")
    wait(lambda: agent.status("detector")["shadow"] is not None, "the shadow stage")
    _drive(agent, "detector", lambda: agent.status("detector")["shadow"]["samples"] >= 60, set())
    agent.stop()
    saved = json.loads((host.store.root / "shadow.json").read_bytes())
    assert saved["samples"] >= 60

    again = make_agent(models=("detector",))  # no desired state: stage.json says where it was
    wait(lambda: again.status("detector")["shadow"] is not None, "the shadow stage again")
    assert again.status("detector")["shadow"]["samples"] >= saved["samples"]
    assert again.host("detector").updater.status().pending.phase == "shadow"  # type: ignore[union-attr]


# --- A/B split and feedback --------------------------------------------------------------


def test_an_ab_split_is_within_binomial_bounds_sticky_and_counted_per_version(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    agent = make_agent(models=("detector",))
    a1, a2 = digest_of(bundles["a1"]), digest_of(bundles["a2"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    agent.apply_desired(desired(bundles, "a2", model="detector", split=Split(0.3)))
    wait(lambda: agent.status("detector")["split"] is not None, "the split")
    n = 3000
    sides = {
        key: agent.predict_versioned(live_inputs(i), model="detector", key=key)[0]
        for i, key in enumerate(f"camera-{i}" for i in range(n))
    }
    share = sum(v == a2 for v in sides.values()) / n
    assert set(sides.values()) == {a1, a2}
    assert abs(share - 0.3) <= 4.5 * math.sqrt(0.3 * 0.7 / n)
    for key in list(sides)[:200]:  # sticky
        assert agent.predict_versioned(live_inputs(0), model="detector", key=key)[0] == sides[key]
    versions = {v["digest"]: v for v in agent.host("detector").telemetry_section()["versions"]}
    assert versions[a2]["role"] == "candidate"
    assert versions[a1]["role"] == "serving"
    assert versions[a2]["requests"] + versions[a1]["requests"] == n + 200
    assert versions[a2]["requests"] == sum(v == a2 for v in sides.values()) + sum(
        sides[k] == a2 for k in list(sides)[:200]
    )
    # Promoted: the same bundle without the split.
    agent.apply_desired(desired(bundles, "a2", model="detector"))
    wait(committed(agent, "detector", a2), "a2 promoted")
    assert agent.status("detector")["split"] is None


def test_feedback_gives_each_version_its_accuracy(
    make_agent: Callable[..., Agent], bundles: dict[str, Any], tmp_path: Path
) -> None:
    agent = make_agent(models=("detector",))
    a1, a2 = digest_of(bundles["a1"]), digest_of(bundles["a2"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    agent.apply_desired(desired(bundles, "a2", model="detector", split=Split(0.5)))
    wait(lambda: agent.status("detector")["split"] is not None, "the split")
    # Ground truth: what a1's weights say; a2 is right only where it agrees with them.
    truth = ort.InferenceSession(
        str(make_onnx_mlp(tmp_path / "truth.onnx", n_in=N_IN, n_hidden=16, n_out=N_OUT, seed=1))
    )
    right = {a1: [0, 0], a2: [0, 0]}
    for i in range(400):
        x = live_inputs(1000 + i)
        version, out = agent.predict_versioned(x, model="detector", key=f"k{i}", request_id=f"r{i}")
        label = int(truth.run(None, x)[0].argmax())
        right[version][0] += 1
        right[version][1] += int(out["probs"].argmax()) == label
        answer = agent.feedback(f"r{i}", label, model="detector")
        assert answer["versions"] == {version: int(out["probs"].argmax()) == label}
    totals = agent.status("detector")["feedback"]
    for digest, (labels, correct) in right.items():
        assert totals[digest] == {"labels": labels, "correct": correct}
    assert right[a1][1] == right[a1][0]  # a1 is the truth
    assert right[a2][1] < right[a2][0]
    with pytest.raises(UnknownRequestError):
        agent.feedback("never-asked", 1, model="detector")


def test_ground_truth_in_probation_rolls_back_a_candidate_that_is_wrong(
    make_agent: Callable[..., Agent], bundles: dict[str, Any], tmp_path: Path
) -> None:
    agent = make_agent(models=("detector",))
    a1, watched = digest_of(bundles["a1"]), digest_of(bundles["a2-watched"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "a1")
    rule = ProbationRule(min_accuracy=0.9, min_feedback=20)
    agent.apply_desired(desired(bundles, "a2-watched", model="detector", probation=rule))
    host = agent.host("detector")
    wait(lambda: host.slot.digest == watched, "the candidate in probation")
    truth = ort.InferenceSession(
        str(make_onnx_mlp(tmp_path / "truth.onnx", n_in=N_IN, n_hidden=16, n_out=N_OUT, seed=1))
    )
    labelled = 0
    while host.slot.digest == watched:
        assert labelled < 200, agent.status("detector")
        x = live_inputs(5000 + labelled)
        agent.predict(x, model="detector", request_id=f"p{labelled}")
        agent.feedback(f"p{labelled}", int(truth.run(None, x)[0].argmax()), model="detector")
        labelled += 1
        time.sleep(0.01)
    wait(lambda: host.updater.status().current == a1, "the rollback to a1")
    failure = host.updater.status().last_failure
    assert failure is not None
    assert failure.outcome == "rolled-back"
    assert "accuracy" in failure.reason
    assert labelled >= 20  # not before the rule had its labels


# --- over MQTT ---------------------------------------------------------------------------


def test_named_models_follow_their_own_desired_topics_and_report_their_own_state(
    tmp_path: Path, broker: Broker, bundles: dict[str, Any]
) -> None:
    topics = Topics(FLEET, DEVICE)
    extra = (
        f'[broker]\nurl = "mqtt://{broker.host}:{broker.port}"\nconnect_timeout_s = 5\n'
        "[telemetry]\ninterval_s = 3600\n[mqtt_serving]\nenabled = true\n"
    )
    config = parse_config(
        toml(tmp_path / "state", bundles["trust"], ("detector", "classifier"), extra)
    )
    a1, b1 = digest_of(bundles["a1"]), digest_of(bundles["b1"])
    with Subscriber(broker, f"{topics.base}/#", clean=True) as sub, Agent(config) as agent:
        for model, name in (("detector", "a1"), ("classifier", "b1")):
            payload = desired(bundles, name, model=model).to_payload(fleet=FLEET, device=DEVICE)
            publish_retained(broker, topics.desired_for(model), payload)
        wait(committed(agent, "detector", a1), "detector on a1")
        wait(committed(agent, "classifier", b1), "classifier on b1")

        def state(model: str) -> dict[str, Any] | None:
            for m in reversed(sub.snapshot()):
                if m.topic == topics.state_for(model) and m.payload:
                    return json.loads(m.payload)  # type: ignore[no-any-return]
            return None

        def reported() -> bool:
            d, c = state("detector"), state("classifier")
            return (
                d is not None
                and c is not None
                and (d.get("current") or {}).get("digest") == a1
                and (c.get("current") or {}).get("digest") == b1
            )

        assert sub.wait_for(lambda _: reported(), timeout_s=30)
        assert state("detector")["model"] == "detector"  # type: ignore[index]
        agent.predict(golden_inputs(), model="classifier")
        assert agent.reporter is not None
        agent.reporter.report_now()

        def telemetry_models() -> set[str]:
            return {
                json.loads(m.payload)["model"]
                for m in sub.snapshot()
                if m.topic == topics.telemetry
            }

        assert sub.wait_for(lambda _: telemetry_models() == {"detector", "classifier"}, 30)
        activated = [
            json.loads(m.payload)
            for m in sub.snapshot()
            if m.topic == topics.events and json.loads(m.payload)["event"] == "activated"
        ]
        assert {e["model"] for e in activated} == {"detector", "classifier"}
        # Inference by name over MQTT, then its ground truth on the feedback topic.
        x = golden_inputs()["x"][:1]
        request = {
            "inputs": {"x": x.tolist()},
            "model": "classifier",
            "request_id": "m-1",
            "correlation_id": "c-1",
        }
        publish_retained(broker, topics.infer_request, json.dumps(request).encode(), retain=False)

        def answer() -> dict[str, Any] | None:
            for m in sub.snapshot():
                if m.topic == topics.infer_response:
                    return json.loads(m.payload)  # type: ignore[no-any-return]
            return None

        assert sub.wait_for(lambda _: answer() is not None, 30)
        reply = answer()
        assert reply is not None
        assert (reply["model"], reply["correlation_id"]) == (b1, "c-1")
        top = int(np.argmax(reply["outputs"]["probs"]["data"]))
        feedback = {"v": 1, "request_id": "m-1", "label": top, "model": "classifier"}
        publish_retained(broker, topics.feedback, json.dumps(feedback).encode(), retain=False)
        wait(
            lambda: agent.status("classifier")["feedback"] == {b1: {"labels": 1, "correct": 1}},
            "the feedback",
        )
        for model in ("detector", "classifier"):
            publish_retained(broker, topics.desired_for(model), b"")


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_addresses_models_by_name_and_takes_feedback(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    port = free_port()
    agent = make_agent(extra=f"[http]\nenabled = true\nport = {port}\n")
    a1, b1 = digest_of(bundles["a1"]), digest_of(bundles["b1"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    agent.apply_desired(desired(bundles, "b1", model="classifier"))
    wait(committed(agent, "detector", a1), "detector on a1")
    wait(committed(agent, "classifier", b1), "classifier on b1")
    base = f"http://127.0.0.1:{port}"
    x = golden_inputs()["x"][:1]
    status, answer = _post(
        f"{base}/v1/models/classifier/predict",
        {"inputs": {"x": x.tolist()}},
        {"X-Request-Id": "frame-1"},
    )
    assert status == 200
    assert answer["model"] == b1
    probs = np.reshape(answer["outputs"]["probs"]["data"], answer["outputs"]["probs"]["shape"])
    assert np.allclose(probs, bundles["b1"].outputs[:1], atol=1e-6)
    top = int(np.argmax(probs))
    status, scored = _post(
        f"{base}/v1/models/classifier/feedback", {"request_id": "frame-1", "label": top}
    )
    assert (status, scored["versions"]) == (200, {b1: True})
    status, again = _post(
        f"{base}/v1/models/classifier/feedback", {"request_id": "frame-1", "label": top}
    )
    assert (status, again["error"]["code"]) == (409, "already-labelled")
    status, unknown = _post(
        f"{base}/v1/models/classifier/feedback", {"request_id": "nope", "label": 0}
    )
    assert (status, unknown["error"]["code"]) == (404, "unknown-request")
    status, error = _post(f"{base}/v1/predict", {"inputs": {"x": x.tolist()}})
    assert (status, error["error"]["code"]) == (404, "unknown-model")
    status, error = _post(f"{base}/v1/models/camera/predict", {"inputs": {"x": x.tolist()}})
    assert (status, error["error"]["code"]) == (404, "unknown-model")
    with urllib.request.urlopen(f"{base}/v1/health", timeout=10) as health:
        assert json.loads(health.read())["models"] == {"detector": a1, "classifier": b1}
    assert agent.status("classifier")["feedback"] == {b1: {"labels": 1, "correct": 1}}


def _gate_workers_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` that are health-gate workers."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                state = Path(f"/proc/{child}/stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if b"agent.install._gate_child" in cmdline and state != "Z":
                found.append(int(child))
    return found


def test_the_models_of_an_agent_share_one_gate_worker_started_ahead(
    make_agent: Callable[..., Agent], bundles: dict[str, Any]
) -> None:
    before = set(_gate_workers_of(os.getpid()))  # other tests' updaters may leave theirs
    agent = make_agent()
    a1, b1 = digest_of(bundles["a1"]), digest_of(bundles["b1"])
    agent.apply_desired(desired(bundles, "a1", model="detector"))
    wait(committed(agent, "detector", a1), "detector on a1")
    agent.apply_desired(desired(bundles, "b1", model="classifier"))
    wait(committed(agent, "classifier", b1), "classifier on b1")
    workers = agent.host("detector").updater.models.gate_workers
    assert workers is agent.host("classifier").updater.models.gate_workers
    assert workers.wait_ready(60) is not None  # the one started after the second gate
    new = set(_gate_workers_of(os.getpid())) - before
    assert len(new) == 1  # one per device, not one per model
    assert workers.warm_served == 1  # the second model's gate used the first's worker
