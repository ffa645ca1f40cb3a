"""Inference over MQTT through a real mosquitto, with a real onnxruntime model."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import InputValidationError
from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.serve._model import Model
from agent.serve.codec import decode_binary, encode_binary
from agent.serve.mqtt import MqttInferenceServer, MqttServingConfig, check_reply_topic
from tests.agent.serve.test_codec import UNALLOCATABLE_SHAPES
from tests.support.broker import Broker
from tests.support.models import load_onnx_mlp, mlp_reference, mlp_weights

pytestmark = pytest.mark.integration

TOPICS = Topics("fleet-a", "dev-1")
WAIT_S = 10.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    with load_onnx_mlp(tmp_path_factory.mktemp("mqtt-model")) as m:
        yield m


class Requester:
    """A plain paho client playing the application that asks the device for predictions."""

    def __init__(self, broker: Broker, protocol: str) -> None:
        self.protocol = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"req-{uuid.uuid4().hex[:8]}",
            protocol=self.protocol,
        )
        self.inbox: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client.on_message = lambda _c, _u, msg: self.inbox.put(msg)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self._subscribed = subscribed
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(WAIT_S), "no SUBACK"

    def send(
        self,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        self.client.publish(
            TOPICS.infer_request, payload, qos=1, properties=props
        ).wait_for_publish(WAIT_S)

    def receive(self) -> paho.MQTTMessage:
        return self.inbox.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _device(
    broker: Broker, predictor: Any, protocol: str, config: MqttServingConfig | None = None
) -> tuple[MqttClient, MqttInferenceServer]:
    transport = MqttClient(
        BrokerConfig(broker.url, protocol=protocol),  # type: ignore[arg-type]
        presence=device_presence(TOPICS),
    )
    server = MqttInferenceServer(predictor, transport, TOPICS, config)
    server.start()
    transport.start()
    assert transport.wait_connected(WAIT_S), transport.last_error
    return transport, server


@pytest.fixture(params=["5", "3.1.1"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def device(broker: Broker, model: Model, protocol: str) -> Iterator[MqttInferenceServer]:
    transport, server = _device(broker, model, protocol)
    yield server
    server.stop()
    transport.stop()


@pytest.fixture
def requester(broker: Broker, protocol: str) -> Iterator[Requester]:
    r = Requester(broker, protocol)
    yield r
    r.close()


def _x(seed: int = 0, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    return mlp_reference(x, mlp_weights(64, 32, 10, seed=0))


def _ask(requester: Requester, protocol: str, body: dict[str, Any], reply: str, cid: str) -> None:
    """A JSON request in the protocol's own way of naming the reply topic and correlation."""
    if protocol == "5":
        requester.send(
            json.dumps(body).encode(), response_topic=reply, correlation_data=cid.encode()
        )
    else:
        requester.send(json.dumps({**body, "reply_to": reply, "correlation_id": cid}).encode())


def _correlation(msg: paho.MQTTMessage, protocol: str) -> str:
    if protocol == "5":
        return bytes(msg.properties.CorrelationData).decode()
    return str(json.loads(msg.payload)["correlation_id"])


def _wait_ready(requester: Requester, protocol: str, reply: str) -> None:
    """The device subscribes asynchronously: retry a probe until it answers."""
    for attempt in range(50):
        _ask(requester, protocol, {"inputs": {"x": _x().tolist()}}, reply, f"probe-{attempt}")
        try:
            requester.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        # Drain late answers to earlier probes.
        while True:
            try:
                requester.inbox.get(timeout=0.3)
            except queue.Empty:
                return
    pytest.fail("the device never answered")


def test_request_is_answered_on_the_reply_topic_with_its_correlation(
    device: MqttInferenceServer, requester: Requester, protocol: str
) -> None:
    reply = "apps/app-1/answers"
    requester.subscribe(reply)
    _wait_ready(requester, protocol, reply)
    xs = {f"c-{i}": _x(i) for i in range(3)}
    for cid, x in xs.items():
        _ask(requester, protocol, {"inputs": {"x": x.tolist()}}, reply, cid)
    answers = {}
    for _ in xs:
        msg = requester.receive()
        assert msg.topic == reply
        answers[_correlation(msg, protocol)] = json.loads(msg.payload)
    assert set(answers) == set(xs)
    for cid, x in xs.items():
        probs = answers[cid]["outputs"]["probs"]
        np.testing.assert_allclose(
            np.reshape(probs["data"], probs["shape"]), _expected(x), atol=1e-5
        )


def test_binary_request_gets_a_binary_answer(
    device: MqttInferenceServer, requester: Requester, protocol: str
) -> None:
    reply = "apps/app-1/binary"
    requester.subscribe(reply)
    _wait_ready(requester, protocol, reply)
    x = _x(7)
    if protocol == "5":
        requester.send(encode_binary({"x": x}), response_topic=reply, correlation_data=b"b-1")
    else:
        requester.send(encode_binary({"x": x}, {"reply_to": reply, "correlation_id": "b-1"}))
    answer = decode_binary(requester.receive().payload)
    np.testing.assert_allclose(answer.tensors["probs"], _expected(x), atol=1e-5)
    if protocol == "3.1.1":
        assert answer.meta["correlation_id"] == "b-1"


def test_request_without_reply_topic_is_answered_on_the_device_response_topic(
    device: MqttInferenceServer, requester: Requester, protocol: str
) -> None:
    requester.subscribe(TOPICS.infer_response)
    _wait_ready(requester, protocol, TOPICS.infer_response)
    requester.send(json.dumps({"inputs": {"x": _x(1).tolist()}, "correlation_id": "d-1"}).encode())
    msg = requester.receive()
    assert msg.topic == TOPICS.infer_response
    assert json.loads(msg.payload)["correlation_id"] == "d-1"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": [[1.0] * 5]}, "dimension 1 must be 64"),
        ({"nope": [[1.0] * 64]}, "missing input"),
        ("not tensors", '"inputs"'),
    ],
    ids=["shape", "name", "malformed"],
)
def test_invalid_request_gets_an_error_answer_and_serving_continues(
    device: MqttInferenceServer, requester: Requester, protocol: str, inputs: Any, message: str
) -> None:
    reply = "apps/app-1/errors"
    requester.subscribe(reply)
    _wait_ready(requester, protocol, reply)
    _ask(requester, protocol, {"inputs": inputs}, reply, "bad-1")
    msg = requester.receive()
    body = json.loads(msg.payload)
    assert _correlation(msg, protocol) == "bad-1"
    assert body["error"]["code"] == "invalid-input"
    assert message in body["error"]["message"]
    _ask(requester, protocol, {"inputs": {"x": _x(2).tolist()}}, reply, "good-1")
    assert "outputs" in json.loads(requester.receive().payload)


@pytest.mark.parametrize("shape", UNALLOCATABLE_SHAPES[:2])
def test_a_tensor_numpy_cannot_allocate_gets_invalid_input_in_either_encoding(
    device: MqttInferenceServer, requester: Requester, protocol: str, shape: list[int]
) -> None:
    reply = "apps/app-1/hostile"
    requester.subscribe(reply)
    _wait_ready(requester, protocol, reply)
    typed = {"x": {"dtype": "float32", "shape": shape, "data": []}}
    _ask(requester, protocol, {"inputs": typed}, reply, "json-1")
    header = {"tensors": [{"name": "x", "dtype": "float32", "shape": shape}]}
    if protocol == "3.1.1":
        header |= {"reply_to": reply, "correlation_id": "binary-1"}
    raw = json.dumps(header)
    raw += " " * (-(8 + len(raw)) % 8)
    binary = b"EST1" + len(raw).to_bytes(4, "little") + raw.encode()
    if protocol == "5":
        requester.send(binary, response_topic=reply, correlation_data=b"binary-1")
    else:
        requester.send(binary)
    answers = {}
    for _ in range(2):
        msg = requester.receive()
        answers[_correlation(msg, protocol)] = json.loads(msg.payload)["error"]["code"]
    assert answers == {"json-1": "invalid-input", "binary-1": "invalid-input"}
    assert device.stats().errors == 2


def test_reply_topic_inside_the_device_namespace_is_dropped(
    device: MqttInferenceServer, requester: Requester, protocol: str
) -> None:
    reply = "apps/app-1/ok"
    requester.subscribe(TOPICS.telemetry)
    requester.subscribe(reply)
    _wait_ready(requester, protocol, reply)
    _ask(requester, protocol, {"inputs": {"x": _x().tolist()}}, TOPICS.telemetry, "evil")
    _ask(requester, protocol, {"inputs": {"x": _x().tolist()}}, reply, "after")
    msg = requester.receive()  # one worker answers in order: the first one was handled already
    assert (msg.topic, _correlation(msg, protocol)) == (reply, "after")
    assert requester.inbox.empty()
    assert device.stats().dropped == 1


class _Gated:
    """The real model behind a gate, so a test can hold the worker busy."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.entered.release()
        assert self.gate.wait(WAIT_S)
        return self.model.predict(inputs)


def test_full_queue_answers_overloaded_at_once(broker: Broker, model: Model, protocol: str) -> None:
    gated = _Gated(model)
    gated.gate.set()
    transport, server = _device(broker, gated, protocol, MqttServingConfig(queue_size=1, workers=1))
    requester = Requester(broker, protocol)
    try:
        reply = "apps/app-1/load"
        requester.subscribe(reply)
        _wait_ready(requester, protocol, reply)
        while gated.entered.acquire(blocking=False):  # the probes' calls
            pass
        gated.gate.clear()
        _ask(requester, protocol, {"inputs": {"x": _x(1).tolist()}}, reply, "r-1")
        assert gated.entered.acquire(timeout=WAIT_S)  # r-1 holds the only worker
        _ask(requester, protocol, {"inputs": {"x": _x(2).tolist()}}, reply, "r-2")  # queued
        _ask(requester, protocol, {"inputs": {"x": _x(3).tolist()}}, reply, "r-3")  # queue full
        msg = requester.receive()
        assert _correlation(msg, protocol) == "r-3"
        assert json.loads(msg.payload)["error"]["code"] == "overloaded"
        gated.gate.set()
        rest = {
            _correlation(m, protocol): json.loads(m.payload)
            for m in (requester.receive(), requester.receive())
        }
        assert set(rest) == {"r-1", "r-2"}
        assert all("outputs" in body for body in rest.values())
        assert server.stats().overloaded == 1
    finally:
        gated.gate.set()
        requester.close()
        server.stop()
        transport.stop()


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "a/+/b",
        "a/#",
        "$SYS/x",
        "a\0b",
        TOPICS.status,
        TOPICS.desired,
        "edgeship/v1/f/d/state",
        "x" * 1025,
    ],
)
def test_check_reply_topic_refuses_unsafe_topics(topic: str) -> None:
    with pytest.raises(InputValidationError):
        check_reply_topic(topic)


@pytest.mark.parametrize(
    "topic", ["apps/a/answers", TOPICS.infer_response, "edgeship/v1/f/other/infer/response/c-9"]
)
def test_check_reply_topic_accepts_response_topics(topic: str) -> None:
    assert check_reply_topic(topic) == topic
