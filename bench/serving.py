"""Throughput of the remote ways to call a model, against bare baselines, printed as JSON.

Same run, same payload, same client and concurrency for each pair:

* MQTT: the agent's :class:`MqttInferenceServer` (decode, validate, run the 64-32-10
  MLP, encode, answer with correlation data) against a bare paho client that echoes each
  request's payload to its response topic, through the same mosquitto. MQTT 5, QoS 1.
* HTTP: the agent's :class:`HttpServer` (rate limit, auth, decode, predict, encode)
  against a bare ``http.server`` that echoes the body, both keep-alive.

The ratio ``agent / baseline`` is the figure to watch; absolute numbers depend on the
machine. Both JSON and binary payloads are measured (one sample, 64 float32 values).

    python bench/serving.py [--requests 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle.manifest import ModelSpec, TensorSpec
from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.serve.codec import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, encode_binary, encode_json
from agent.serve.http import HttpServer, HttpServerConfig
from agent.serve.mqtt import MqttInferenceServer, MqttServingConfig
from agent.serve.runtimes import load_model
from bench._machine import machine
from tests.support.broker import Broker
from tests.support.bundles import make_manifest
from tests.support.models import make_onnx_mlp

TOKEN = "bench-token-0123456789abcdef"
TOPICS = Topics("bench", "dev-1")
ECHO_TOPIC = "bench/echo/request"


def _payloads() -> dict[str, tuple[str, bytes]]:
    x = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    return {
        "json": (JSON_CONTENT_TYPE, encode_json(x, "inputs")),
        "binary": (BINARY_CONTENT_TYPE, encode_binary(x)),
    }


# --- MQTT ----------------------------------------------------------------------------------


def _client(broker: Broker, name: str, *, nodelay: bool = False) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(20)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{name} could not connect")
    if nodelay:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _subscribe(client: paho.Client, topic: str) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *_a: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")


def _echo_device(broker: Broker) -> paho.Client:
    """The baseline: answer each request with its own payload, as paho alone would."""
    client = _client(broker, "bench-echo")

    def on_message(c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        c.publish(msg.properties.ResponseTopic, msg.payload, qos=1, properties=props)

    client.on_message = on_message
    _subscribe(client, ECHO_TOPIC)
    return client


def _mqtt_run(
    broker: Broker, request_topic: str, payload: bytes, n: int, concurrency: int
) -> float:
    """Requests per second with ``concurrency`` requests in flight until ``n`` are answered."""
    # The requester is the same for both paths; NODELAY keeps its own Nagle waits out.
    client = _client(broker, f"bench-req-{time.monotonic_ns()}", nodelay=True)
    reply = f"bench/replies/{time.monotonic_ns()}"
    done = threading.Event()
    state = {"sent": 0, "answered": 0}
    lock = threading.Lock()

    def send(c: paho.Client) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = str(state["sent"]).encode()
        state["sent"] += 1
        c.publish(request_topic, payload, qos=1, properties=props)

    def on_message(c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if b'"error"' in msg.payload[:16]:
            raise RuntimeError(f"error answer: {msg.payload[:200]!r}")
        with lock:
            state["answered"] += 1
            if state["answered"] >= n:
                done.set()
            elif state["sent"] < n:
                send(c)

    client.on_message = on_message
    _subscribe(client, reply)
    start = time.perf_counter()
    with lock:
        for _ in range(concurrency):
            send(client)
    if not done.wait(300):
        raise RuntimeError(f"only {state['answered']} of {n} answers arrived")
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    return n / elapsed


# --- HTTP ----------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # As the agent's server does: no Nagle delay between headers and body.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", self.headers["Content-Type"])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _http_run(port: int, content_type: str, payload: bytes, n: int, concurrency: int) -> float:
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    per_client = n // concurrency
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(per_client):
            conn.request("POST", "/v1/predict", body=payload, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(str(response.status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"HTTP failures: {failures[:5]}")
    return per_client * concurrency / elapsed


def _pair(baseline: Callable[[], float], agent: Callable[[], float], reps: int) -> dict[str, Any]:
    baseline(), agent()  # warm up
    base_runs, agent_runs = [], []
    for _ in range(reps):  # alternate, so drift in the machine's speed hits both
        base_runs.append(baseline())
        agent_runs.append(agent())
    b, a = float(np.median(base_runs)), float(np.median(agent_runs))
    return {"baseline_rps": round(b, 1), "agent_rps": round(a, 1), "ratio": round(a / b, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    n, c = args.requests, args.concurrency

    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        directory = Path(tmp)
        make_onnx_mlp(directory / "model" / "model.onnx")
        manifest = make_manifest(
            model=ModelSpec(
                format="onnx",
                file="model/model.onnx",
                inputs=(TensorSpec("x", "float32", (None, 64)),),
                outputs=(TensorSpec("probs", "float32", (None, 10)),),
            )
        )
        model = load_model(manifest, directory, "onnxruntime")
        payloads = _payloads()
        results: dict[str, Any] = {
            "machine": machine(),
            "requests": n,
            "concurrency": c,
            "model": "onnx mlp 64-32-10, batch 1",
        }

        # Without TCP_NODELAY, mosquitto's small writes wait for delayed ACKs and both
        # paths measure the kernel's 40 ms timer instead of the software.
        broker = Broker(directory / "broker", extra_config="set_tcp_nodelay true\n")
        broker.start()
        transport = MqttClient(BrokerConfig(broker.url), presence=device_presence(TOPICS))
        server = MqttInferenceServer(model, transport, TOPICS, MqttServingConfig(queue_size=256))
        server.start()
        transport.start()
        echo = _echo_device(broker)
        try:
            if not transport.wait_connected(10):
                raise RuntimeError(f"device transport: {transport.last_error}")
            time.sleep(0.5)  # the device's subscription is asynchronous
            results["mqtt"] = {
                kind: _pair(
                    lambda p=body: _mqtt_run(broker, ECHO_TOPIC, p, n, c),
                    lambda p=body: _mqtt_run(broker, TOPICS.infer_request, p, n, c),
                    args.reps,
                )
                for kind, (_, body) in payloads.items()
            }
        finally:
            echo.loop_stop()
            echo.disconnect()
            server.stop()
            transport.stop()
            broker.stop()

        baseline = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        baseline.daemon_threads = True
        threading.Thread(target=baseline.serve_forever, daemon=True).start()
        config = HttpServerConfig(
            enabled=True, port=0, token=TOKEN, rate_limit_per_s=1e9, burst=10**9
        )
        with HttpServer(model, config) as agent_http:
            results["http"] = {
                kind: _pair(
                    lambda t=ctype, p=body: _http_run(baseline.server_address[1], t, p, n, c),
                    lambda t=ctype, p=body: _http_run(agent_http.port, t, p, n, c),
                    args.reps,
                )
                for kind, (ctype, body) in payloads.items()
            }
        baseline.shutdown()
        baseline.server_close()
        model.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
