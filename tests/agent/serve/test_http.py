"""The local HTTP endpoint: a real server on a free loopback port, a real onnxruntime model."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import parse_config
from agent.errors import ConfigError, InferenceError, OverloadedError
from agent.plumbing.tls import TlsConfig
from agent.serve._model import Model
from agent.serve.codec import BINARY_CONTENT_TYPE, decode_binary, encode_binary
from agent.serve.http import (
    HttpServer,
    HttpServerConfig,
    ServerTls,
    TokenBuckets,
    start_http_server,
)
from tests.agent.serve.test_codec import UNALLOCATABLE_SHAPES
from tests.support.broker import ClientCert, Pki, make_pki
from tests.support.models import load_onnx_mlp, mlp_reference, mlp_weights

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    with load_onnx_mlp(tmp_path_factory.mktemp("http-model")) as m:
        yield m


def _config(**overrides: Any) -> HttpServerConfig:
    values: dict[str, Any] = {"enabled": True, "port": 0, "token": TOKEN}
    values.update(overrides)
    return HttpServerConfig(**values)


@pytest.fixture
def server(model: Model) -> Iterator[HttpServer]:
    with HttpServer(model, _config()) as s:
        yield s


def _request(
    server: HttpServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _predict_json(
    server: HttpServer, payload: Any, headers: Mapping[str, str] = AUTH
) -> tuple[int, Any]:
    status, _, body = _request(
        server,
        "POST",
        "/v1/predict",
        json.dumps(payload).encode(),
        {**headers, "Content-Type": "application/json"},
    )
    return status, json.loads(body)


def _batch(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    return mlp_reference(x, mlp_weights(64, 32, 10, seed=0))


# --- predictions ---------------------------------------------------------------------------


def test_json_predict_returns_the_models_outputs(server: HttpServer) -> None:
    x = _batch()
    status, body = _predict_json(server, {"inputs": {"x": x.tolist()}})
    assert status == 200
    probs = body["outputs"]["probs"]
    assert probs["dtype"] == "float32"
    assert probs["shape"] == [2, 10]
    np.testing.assert_allclose(np.reshape(probs["data"], (2, 10)), _expected(x), atol=1e-5)


def test_typed_json_predict_works(server: HttpServer) -> None:
    x = _batch(1)
    typed = {"dtype": "float32", "shape": [1, 64], "data": x.ravel().tolist()}
    status, body = _predict_json(server, {"inputs": {"x": typed}})
    assert status == 200
    np.testing.assert_allclose(body["outputs"]["probs"]["data"], _expected(x).ravel(), atol=1e-5)


def test_binary_predict_answers_in_binary(server: HttpServer) -> None:
    x = _batch(3)
    status, headers, body = _request(
        server,
        "POST",
        "/v1/predict",
        encode_binary({"x": x}),
        {**AUTH, "Content-Type": BINARY_CONTENT_TYPE},
    )
    assert status == 200
    assert headers["Content-Type"] == BINARY_CONTENT_TYPE
    np.testing.assert_allclose(decode_binary(body).tensors["probs"], _expected(x), atol=1e-5)


def test_accept_header_chooses_the_answer_encoding(server: HttpServer) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Accept": BINARY_CONTENT_TYPE}
    body = json.dumps({"inputs": {"x": _batch(1).tolist()}}).encode()
    status, got_headers, answer = _request(server, "POST", "/v1/predict", body, headers)
    assert status == 200
    assert got_headers["Content-Type"] == BINARY_CONTENT_TYPE
    assert decode_binary(answer).tensors["probs"].shape == (1, 10)


def test_keep_alive_connection_serves_several_requests(server: HttpServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"inputs": {"x": _batch(1).tolist()}}).encode()
    try:
        for _ in range(3):
            conn.request(
                "POST",
                "/v1/predict",
                body=body,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()


def test_health_reports_ok(server: HttpServer) -> None:
    status, _, body = _request(server, "GET", "/v1/health", headers=AUTH)
    assert status == 200
    assert json.loads(body)["status"] == "ok"


# --- bad requests: clear errors, and the server keeps serving ----------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"inputs": {"x": [[1.0] * 63]}}, "dimension 1 must be 64"),
        ({"inputs": {"y": [[1.0] * 64]}}, "missing input"),
        ({"inputs": {"x": [[float("nan")] * 64]}}, "NaN"),
        ({"inputs": {"x": [["a"] * 64]}}, "numbers only"),
        ({"x": [[1.0] * 64]}, '"inputs"'),
    ],
    ids=["wrong shape", "unknown name", "nan", "strings", "no inputs key"],
)
def test_invalid_input_gets_400_and_the_server_keeps_serving(
    server: HttpServer, payload: Any, message: str
) -> None:
    status, body = _predict_json(server, payload)
    assert status == 400
    assert body["error"]["code"] == "invalid-input"
    assert message in body["error"]["message"]
    status, _ = _predict_json(server, {"inputs": {"x": _batch(1).tolist()}})
    assert status == 200


def test_malformed_binary_gets_400(server: HttpServer) -> None:
    body = encode_binary({"x": _batch(1)})[:-3]
    status, _, answer = _request(
        server, "POST", "/v1/predict", body, {**AUTH, "Content-Type": BINARY_CONTENT_TYPE}
    )
    assert status == 400
    assert "truncated" in json.loads(answer)["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/nothing", AUTH, 404),
        ("GET", "/v1/predict", AUTH, 405),
        ("POST", "/v1/health", {**AUTH, "Content-Length": "0"}, 405),
        ("POST", "/v1/predict", {**AUTH, "Content-Type": "text/plain", "Content-Length": "2"}, 415),
    ],
)
def test_wrong_routes_and_types_get_json_errors(
    server: HttpServer, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    body = b"{}" if headers.get("Content-Length") == "2" else None
    got, got_headers, answer = _request(server, method, path, body, headers)
    assert got == status
    assert got_headers["Content-Type"] == "application/json"
    assert json.loads(answer)["error"]["message"]


def _raw_exchange(server: HttpServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_missing_content_length_gets_411(server: HttpServer) -> None:
    answer = _raw_exchange(
        server,
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 411")


def test_oversized_body_gets_413_before_it_is_sent(model: Model) -> None:
    with HttpServer(model, _config(max_request_bytes=1000)) as s:
        # Only the headers go out: the server must answer from Content-Length alone.
        answer = _raw_exchange(
            s,
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n".encode(),
        )
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"too-large"' in answer


def test_body_shorter_than_its_content_length_gets_400(server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}".encode()
        )
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")


def test_oversized_header_gets_a_json_error(server: HttpServer) -> None:
    answer = _raw_exchange(
        server, b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")
    assert "error" in json.loads(body)
    assert b"Traceback" not in answer


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["none", "wrong", "no scheme", "longer"],
)
def test_requests_without_the_right_token_get_401(
    server: HttpServer, headers: dict[str, str]
) -> None:
    status, body = _predict_json(server, {"inputs": {"x": _batch(1).tolist()}}, headers)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    status, _, _ = _request(server, "GET", "/v1/health", headers=headers)
    assert status == 401


def test_loopback_server_without_token_needs_none(model: Model) -> None:
    with HttpServer(model, _config(token=None)) as s:
        status, _, _ = _request(s, "GET", "/v1/health")
    assert status == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "device.local"])
def test_non_loopback_address_without_token_is_refused(model: Model, host: str) -> None:
    with pytest.raises(ConfigError, match="without a token"):
        HttpServer(model, _config(host=host, token=None))


def test_short_token_is_refused(model: Model) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        HttpServer(model, _config(token="short"))


def test_endpoint_is_off_by_default(model: Model) -> None:
    assert HttpServerConfig().enabled is False
    assert HttpServerConfig().host == "127.0.0.1"
    assert start_http_server(model, HttpServerConfig(port=0)) is None


def test_port_in_use_is_a_config_error(model: Model, server: HttpServer) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        HttpServer(model, _config(port=server.port)).start()


# --- rate limits, connection limits, slow clients ---------------------------------------------


def test_rate_limit_answers_429_per_client_address(model: Model) -> None:
    with HttpServer(model, _config(rate_limit_per_s=0.01, burst=2)) as s:
        codes = [_request(s, "GET", "/v1/health", headers=AUTH)[0] for _ in range(3)]
        status, headers, body = _request(s, "GET", "/v1/health", headers=AUTH)
        other = _request(s, "GET", "/v1/health", headers=AUTH, source="127.0.0.2")[0]
    assert codes == [200, 200, 429]
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"]["code"] == "rate-limited"
    assert other == 200  # another client still has its own full bucket


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=2.0, burst=2, max_clients=10, clock=lambda: now[0])
    assert [buckets.take("a"), buckets.take("a")] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0.0


def test_token_buckets_forget_the_least_recent_client_beyond_the_bound() -> None:
    buckets = TokenBuckets(rate_per_s=1e-9, burst=1, max_clients=2, clock=lambda: 0.0)
    assert buckets.take("a") == 0.0
    assert buckets.take("b") == 0.0
    assert buckets.take("c") == 0.0  # "a" is forgotten: it starts again with a full bucket
    assert buckets.take("a") == 0.0
    assert buckets.take("c") > 0.0


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_client_gets_408_and_is_disconnected_at_the_request_deadline(model: Model) -> None:
    with HttpServer(model, _config(request_deadline_s=0.3, read_timeout_s=5.0)) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # and never finishes
            # Answered and closed by the server, long before the 10 s timeout.
            answer = _read_all(sock)
        status, _, _ = _request(s, "GET", "/v1/health", headers=AUTH)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"too-slow"' in answer
    assert status == 200


def test_connections_beyond_the_limit_get_503(model: Model) -> None:
    with HttpServer(model, _config(max_connections=1)) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as held:
            held.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # keeps the only slot busy
            answer = _raw_exchange(s, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"busy"' in answer


# --- failures of the model ----------------------------------------------------------------


class _Failing:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OverloadedError("queue full; retry later"), 503, "overloaded"),
        (InferenceError("onnxruntime failed"), 500, "inference-failed"),
        (RuntimeError("secret internal detail"), 500, "internal"),
    ],
)
def test_model_failures_map_to_status_codes_without_tracebacks(
    error: BaseException, status: int, code: str
) -> None:
    with HttpServer(_Failing(error), _config()) as s:
        got, _, body = _request(
            s,
            "POST",
            "/v1/predict",
            b'{"inputs": {"x": [1]}}',
            {**AUTH, "Content-Type": "application/json"},
        )
    assert got == status
    assert json.loads(body)["error"]["code"] == code
    assert b"Traceback" not in body
    assert b"secret" not in body


def test_concurrent_clients_all_get_correct_answers(server: HttpServer) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        for i in range(5):
            x = _batch(seed * 10 + i + 1)
            status, body = _predict_json(server, {"inputs": {"x": x.tolist()}})
            ok = status == 200 and np.allclose(
                np.reshape(body["outputs"]["probs"]["data"], (-1, 10)), _expected(x), atol=1e-5
            )
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20


def test_server_stops_and_frees_its_port(model: Model, tmp_path: Path) -> None:
    s = HttpServer(model, _config())
    s.start()
    port = s.port
    s.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


# --- https ---------------------------------------------------------------------------------


def _https(
    server: HttpServer, pki: Pki, client: ClientCert | None = None
) -> http.client.HTTPSConnection:
    ctx = TlsConfig(pki.ca_file, client and client.cert_file, client and client.key_file).context()
    return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=ctx)


def _https_predict(conn: http.client.HTTPSConnection, x: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    conn.request(
        "POST", "/v1/predict", body=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200
    probs = json.loads(response.read())["outputs"]["probs"]
    return np.reshape(np.asarray(probs["data"], np.float32), probs["shape"])


def _https_health(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/v1/health", headers=AUTH)
    return conn.getresponse().status


def test_https_endpoint_serves_predictions(model: Model, pki: Pki) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key)
    with HttpServer(model, _config(tls=tls)) as s:
        assert s.url.startswith("https://")
        conn = _https(s, pki)
        try:
            x = _batch(3)
            for _ in range(2):  # keep-alive over one TLS session
                np.testing.assert_allclose(_https_predict(conn, x), _expected(x), atol=1e-5)
        finally:
            conn.close()
        # Plain HTTP to the TLS port gets no answer, and the server keeps serving.
        with pytest.raises((http.client.HTTPException, OSError)):
            _request(s, "GET", "/v1/health")
        conn = _https(s, pki)
        assert _https_health(conn) == 200
        conn.close()


def test_a_stalled_tls_handshake_does_not_hold_up_other_clients(model: Model, pki: Pki) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key)
    with HttpServer(model, _config(tls=tls, request_deadline_s=30.0)) as s:
        stalled = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(3)]
        try:
            conn = _https(s, pki)
            assert _https_health(conn) == 200
            conn.close()
        finally:
            for sock in stalled:
                sock.close()


def test_client_certificates_are_required_when_a_client_ca_is_set(model: Model, pki: Pki) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca_file)
    # Client certificates authenticate callers: no token needed, even beyond loopback.
    HttpServer(model, _config(tls=tls, token=None, host="0.0.0.0"))
    with HttpServer(model, _config(tls=tls)) as s:
        conn = _https(s, pki, pki.client("device-1"))
        x = _batch(2)
        np.testing.assert_allclose(_https_predict(conn, x), _expected(x), atol=1e-5)
        conn.close()
        for refused in (None, pki.foreign):
            conn = _https(s, pki, refused)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _https_health(conn)
            conn.close()


def test_unusable_tls_files_are_a_config_error(model: Model, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS files are unusable"):
        HttpServer(model, _config(tls=ServerTls(tmp_path / "cert.pem")))


# --- hostile requests: always a 4xx, never a 500 -----------------------------------------


def _post(server: HttpServer, body: bytes, content_type: str) -> tuple[int, Any]:
    status, _, answer = _request(
        server, "POST", "/v1/predict", body, {**AUTH, "Content-Type": content_type}
    )
    return status, json.loads(answer)


@pytest.mark.parametrize("shape", UNALLOCATABLE_SHAPES)
def test_an_empty_tensor_numpy_cannot_allocate_gets_400(
    server: HttpServer, shape: list[int]
) -> None:
    typed = {"inputs": {"x": {"dtype": "float32", "shape": shape, "data": []}}}
    status, answer = _post(server, json.dumps(typed).encode(), "application/json")
    assert (status, answer["error"]["code"]) == (400, "invalid-input")
    header = json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": shape}]})
    header += " " * (-(8 + len(header)) % 8)
    binary = b"EST1" + len(header).to_bytes(4, "little") + header.encode()
    status, answer = _post(server, binary, BINARY_CONTENT_TYPE)
    assert (status, answer["error"]["code"]) == (400, "invalid-input")


def test_a_stalled_body_gets_408_and_the_server_keeps_serving(model: Model) -> None:
    with HttpServer(model, _config(read_timeout_s=0.3)) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(
                f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}".encode()
            )
            answer = _read_all(sock)  # the body never comes
        status, _, _ = _request(s, "GET", "/v1/health", headers=AUTH)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"Connection: close" in answer
    assert status == 200


def test_a_body_cut_by_a_reset_is_no_internal_error(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    with HttpServer(model, _config()) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        # Linger 0: close() sends a reset, which the server's read gets mid-body.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        status, _, _ = _request(s, "GET", "/v1/health", headers=AUTH)
    assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "length",
    [b"\xb2", b"1\xb2", b"+5", b"5 5", b"5, 5"],
    ids=["superscript two", "digit and superscript", "plus sign", "space inside", "list"],
)
def test_a_content_length_of_anything_but_ascii_digits_gets_400(
    server: HttpServer, length: bytes
) -> None:
    answer = _raw_exchange(
        server,
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: "
        + length
        + b"\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 400")


def test_two_content_lengths_get_400(server: HttpServer) -> None:
    answer = _raw_exchange(
        server,
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n"
        "Content-Length: 2\r\n\r\n{}".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 400")


# --- authentication and rate limits come before routing ----------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nothing"),
        ("GET", "/v1/predict"),
        ("POST", "/v1/health"),
        ("PUT", "/v1/predict"),
        ("DELETE", "/admin"),
        ("BREW", "/v1/health"),
    ],
)
def test_an_unauthenticated_client_learns_nothing_about_routes(
    server: HttpServer, method: str, path: str
) -> None:
    status, _, answer = _request(server, method, path, headers={"Content-Length": "0"})
    assert status == 401
    assert json.loads(answer)["error"]["code"] == "unauthorized"


def test_an_authenticated_client_gets_405_for_an_unknown_method(server: HttpServer) -> None:
    status, headers, _ = _request(server, "BREW", "/v1/health", headers=AUTH)
    assert (status, headers["Allow"]) == (405, "GET")


def test_probing_unknown_routes_is_rate_limited(model: Model) -> None:
    with HttpServer(model, _config(rate_limit_per_s=0.01, burst=2)) as s:
        codes = [_request(s, "GET", f"/probe/{i}")[0] for i in range(4)]
    assert codes == [401, 401, 429, 429]


def _expect_continue(server: HttpServer, headers: str) -> tuple[bytes, bytes]:
    """Send a request head with ``Expect: 100-continue``; the first answer, then the rest."""
    body = json.dumps({"inputs": {"x": _batch(1).tolist()}}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\n{headers}Expect: 100-continue\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        first = sock.recv(65536)
        if not first.startswith(b"HTTP/1.1 100"):
            return first, _read_all(sock)
        sock.sendall(body)
        return first, _read_all(sock)


def test_100_continue_is_sent_only_to_an_admitted_request(server: HttpServer) -> None:
    first, _ = _expect_continue(server, "")
    assert first.startswith(b"HTTP/1.1 401")
    first, rest = _expect_continue(server, f"Authorization: Bearer {TOKEN}\r\n")
    assert first.startswith(b"HTTP/1.1 100 Continue")
    assert rest.startswith(b"HTTP/1.1 200")


# --- connections per client ---------------------------------------------------------------


def _hold(server: HttpServer, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", server.port), timeout=10, source_address=(source, 0)
    )
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # half a request: holds its slot
    return sock


def test_one_client_cannot_hold_every_connection(model: Model) -> None:
    with HttpServer(model, _config(max_connections_per_client=2)) as s:
        held = [_hold(s, "127.0.0.1") for _ in range(2)]
        try:
            refused = _raw_exchange(s, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            other = _request(s, "GET", "/v1/health", headers=AUTH, source="127.0.0.2")[0]
        finally:
            for sock in held:
                sock.close()
    assert refused.startswith(b"HTTP/1.1 503")
    assert b"from your address" in refused
    assert other == 200


def test_a_clients_connection_slot_returns_when_it_closes(model: Model) -> None:
    with HttpServer(model, _config(max_connections_per_client=1)) as s:
        _hold(s, "127.0.0.1").close()
        deadline = time.monotonic() + 5
        status = 0
        while status != 200 and time.monotonic() < deadline:  # the server notices the close
            status = _request(s, "GET", "/v1/health", headers=AUTH)[0]
    assert status == 200


def test_the_per_client_connection_limit_is_an_http_setting() -> None:
    config = parse_config(
        'device_id = "d"\nstate_dir = "/s"\ntrust_policy = "/t"\n'
        "[http]\nmax_connections_per_client = 3\n"
    )
    assert config.http.max_connections_per_client == 3
    assert HttpServerConfig().max_connections_per_client == 8


# --- stopping: a real drain ------------------------------------------------------------------


class _Gated:
    """The real model behind a gate, so a test can hold a request in progress."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.gate = threading.Event()
        self.entered = threading.Event()

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        return self.model.predict(inputs)


def _stop_in_background(
    server: HttpServer, drain_timeout_s: float
) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(server.stop(drain_timeout_s)))
    thread.start()
    return thread, result


def test_a_drain_closes_an_idle_keep_alive_connection_at_once(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.serve.http")
    s = HttpServer(model, _config(read_timeout_s=30.0))
    s.start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("GET", "/v1/health", headers=AUTH)
    conn.getresponse().read()  # the connection is now idle, kept alive
    started = time.monotonic()
    assert s.stop(drain_timeout_s=20.0)
    assert time.monotonic() - started < 10  # not the read timeout, nor the drain timeout
    assert conn.sock is not None
    assert conn.sock.recv(100) == b""  # closed by the server
    conn.close()
    assert "HTTP endpoint drained" in caplog.messages


def test_a_drain_answers_a_request_in_progress_with_connection_close(model: Model) -> None:
    gated = _Gated(model)
    s = HttpServer(gated, _config())
    s.start()
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        body = json.dumps({"inputs": {"x": _batch(1).tolist()}}).encode()
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert gated.entered.wait(10)
        thread, result = _stop_in_background(s, 10.0)
        time.sleep(0.2)  # the drain has begun while the model runs
        gated.gate.set()
        answer = _read_all(sock)  # ends: the server closes after this answer
        thread.join(10)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in answer
    assert result == [True]


def test_a_drain_cuts_what_still_runs_at_the_timeout_and_says_so(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    gated = _Gated(model)
    s = HttpServer(gated, _config())
    s.start()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(
                f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 22\r\n\r\n"
                '{"inputs": {"x": [1]}}'.encode()
            )
            assert gated.entered.wait(10)
            drained = s.stop(drain_timeout_s=0.3)
    finally:
        gated.gate.set()
    assert drained is False
    cut = [r for r in caplog.records if r.levelno == logging.WARNING and "cut" in r.getMessage()]
    assert [r.fields["cut"] for r in cut] == [1]  # type: ignore[attr-defined]


# --- TLS refusals are warnings naming the peer and the setting -----------------------------


def _warnings_after_stop(server: HttpServer, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings logged, once every connection thread has ended (a server thread logs a
    refused handshake just after the client has seen it fail)."""
    server.stop(drain_timeout_s=10)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_refused_client_certificate_is_a_warning_naming_the_setting(
    model: Model, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca_file)
    with HttpServer(model, _config(tls=tls)) as s:
        for refused in (None, pki.foreign):
            conn = _https(s, pki, refused)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _https_health(conn)
            conn.close()
        with pytest.raises((http.client.HTTPException, OSError)):
            _request(s, "GET", "/v1/health")  # plain HTTP: noise, not a warning
        warnings = _warnings_after_stop(s, caplog)
    assert len(warnings) == 2
    for text in warnings:
        assert "TLS handshake with 127.0.0.1 refused" in text
        assert "http.tls_client_ca_file" in text


def test_refused_handshakes_from_one_client_do_not_flood_the_log(
    model: Model, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca_file)
    with HttpServer(model, _config(tls=tls)) as s:
        for _ in range(6):
            conn = _https(s, pki, None)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _https_health(conn)
            conn.close()
        warnings = _warnings_after_stop(s, caplog)
    assert len(warnings) == 3


def test_a_client_refusing_the_endpoints_certificate_is_a_warning_naming_the_setting(
    model: Model, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = make_pki(tmp_path / "stranger")  # the client trusts another CA
    with HttpServer(model, _config(tls=ServerTls(pki.server_cert, pki.server_key))) as s:
        conn = _https(s, stranger)
        with pytest.raises(ssl.SSLError):
            _https_health(conn)
        conn.close()
        warnings = _warnings_after_stop(s, caplog)
    assert len(warnings) == 1
    assert "TLS handshake with 127.0.0.1 refused" in warnings[0]
    assert "http.tls_cert_file" in warnings[0]
