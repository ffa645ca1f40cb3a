"""Throughput of the remote ways to call a model, against bare baselines, printed as JSON.

Same run, same payload, same client and concurrency for each pair:

* MQTT: the agent's :class:`MqttInferenceServer` (decode, validate, run the 64-32-10
  MLP, encode, answer with correlation data) against a bare paho client that echoes each
  request's payload to its response topic, through the same mosquitto. MQTT 5, QoS 1.
* HTTP: the agent's :class:`HttpServer` (rate limit, auth, decode, predict, encode)
  against a bare ``http.server`` that echoes the body, both keep-alive.

The ratio ``agent / baseline`` is the figure to watch; absolute numbers depend on the
machine. Both JSON and binary payloads are measured (one sample, 64 float32 values).

Memory: a fresh child process serves the same model over HTTP (default settings:
``max_request_bytes`` 8 MiB); after one small request, N clients send one maximal request
each at once (JSON floats as ``tolist()`` writes them, typed JSON as dense as the decoder
accepts, binary). Peak RSS growth (``VmHWM`` reset through ``/proc/<pid>/clear_refs``) per
request in flight, and its ratio to ``max_request_bytes`` (target: at most 4), plus what
stays resident after the answers.

    python bench/serving.py [--requests 3000] [--concurrency 8] [--phases throughput,memory]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
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

from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.serve.codec import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, encode_binary, encode_json
from agent.serve.http import HttpServer, HttpServerConfig
from agent.serve.mqtt import MqttInferenceServer, MqttServingConfig
from bench._machine import machine
from tests.support.broker import Broker
from tests.support.models import load_onnx_mlp

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


# --- memory ----------------------------------------------------------------------------


def _child_serve() -> int:
    """The measured process: the endpoint with default settings, until stdin closes."""
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        model = load_onnx_mlp(Path(tmp))
        config = HttpServerConfig(enabled=True, port=0, token=TOKEN)
        with HttpServer(model, config) as server:
            print(server.port, flush=True)
            sys.stdin.read()
        model.close()
    return 0


def _maximal_bodies(limit: int) -> dict[str, tuple[str, bytes]]:
    """The largest request of each kind that fits ``limit`` bytes."""
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, 64)).astype(np.float32)
    floats_row = len(json.dumps(row.tolist()[0])) + 2
    rows = (limit - 64) // floats_row
    floats = json.dumps({"inputs": {"x": np.repeat(row, rows, axis=0).tolist()}}).encode()
    # The densest typed JSON the decoder takes: 4 bytes a value, as many as binary float32.
    dense_rows = (limit - 100) // 256
    head = f'{{"inputs":{{"x":{{"dtype":"float32","shape":[{dense_rows},64],"data":['
    dense = (head + ",".join(["0.5"] * (dense_rows * 64)) + "]}}}").encode()
    binary_rows = (limit - 128) // 256
    binary = encode_binary({"x": np.repeat(row, binary_rows, axis=0)})
    bodies = {
        "json floats": (JSON_CONTENT_TYPE, floats),
        "json typed, densest accepted": (JSON_CONTENT_TYPE, dense),
        "binary": (BINARY_CONTENT_TYPE, binary),
    }
    assert all(len(body) <= limit for _, body in bodies.values())
    return bodies


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


def _post(port: int, content_type: str, body: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    conn.request("POST", "/v1/predict", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status} for a maximal request")


def _memory_run(content_type: str, body: bytes, concurrent: int) -> dict[str, Any]:
    """Peak RSS growth of a fresh serving process under ``concurrent`` maximal requests."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child-serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        _post(port, *_payloads()["json"])  # imports, first run of the model
        time.sleep(0.5)
        base = _proc_kib(child.pid, "VmRSS")
        Path(f"/proc/{child.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        clients = [
            threading.Thread(target=_post, args=(port, content_type, body))
            for _ in range(concurrent)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        peak = _proc_kib(child.pid, "VmHWM")
        time.sleep(0.5)
        after = _proc_kib(child.pid, "VmRSS")
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)
    per_request = (peak - base) * 1024 / concurrent
    limit = HttpServerConfig().max_request_bytes
    return {
        "concurrent": concurrent,
        "body_mib": round(len(body) / 2**20, 2),
        "peak_growth_mib_per_request": round(per_request / 2**20, 1),
        "ratio_to_max_request_bytes": round(per_request / limit, 2),
        "resident_after_mib": round((after - base) / 1024, 1),
    }


def _memory(concurrency: tuple[int, ...]) -> dict[str, Any]:
    limit = HttpServerConfig().max_request_bytes
    runs = {
        kind: [_memory_run(content_type, body, n) for n in concurrency]
        for kind, (content_type, body) in _maximal_bodies(limit).items()
    }
    return {"max_request_bytes": limit, "target_ratio": 4, "runs": runs}


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
    parser.add_argument("--phases", default="throughput,memory")
    parser.add_argument("--memory-concurrency", default="1,4")
    parser.add_argument("--child-serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_serve:
        return _child_serve()
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {"machine": machine(), "cpus_available": len(os.sched_getaffinity(0))}
    if "throughput" in phases:
        results["throughput"] = _throughput(args.requests, args.concurrency, args.reps)
    if "memory" in phases:
        concurrency = tuple(int(n) for n in args.memory_concurrency.split(","))
        results["memory"] = _memory(concurrency)
    print(json.dumps(results, indent=2))
    return 0


def _throughput(n: int, c: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        directory = Path(tmp)
        model = load_onnx_mlp(directory)
        payloads = _payloads()
        results: dict[str, Any] = {
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
                    reps,
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
                    reps,
                )
                for kind, (ctype, body) in payloads.items()
            }
        baseline.shutdown()
        baseline.server_close()
        model.close()
    return results


if __name__ == "__main__":
    raise SystemExit(main())
