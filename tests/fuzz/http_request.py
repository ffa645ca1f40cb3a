"""Fuzz the HTTP endpoint's request path: raw bytes in, through a real handler, answers out.

Each input is what a client sends on one connection (one request or several, kept alive),
through a real TCP connection on loopback to the endpoint's own handler, in front of a
real onnxruntime model. The client half-closes after sending, so nothing waits on a
timeout. Invariants: no answer is a 500, and nothing is logged as an error (where a bug
would show).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from pathlib import Path

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.serve.http import HttpServer, HttpServerConfig

from tests.support.models import load_onnx_mlp

TOKEN = "fuzz-token-0123456789abcdef"
CONFIG = HttpServerConfig(
    enabled=True,
    port=0,
    token=TOKEN,
    max_request_bytes=1 << 16,
    rate_limit_per_s=1e9,
    burst=10**9,
    read_timeout_s=2.0,
    request_deadline_s=10.0,
)


class _Errors(logging.Handler):
    """Every record at ERROR or above: the endpoint logs one only for a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


_ERRORS = _Errors()
logging.getLogger("agent").addHandler(_ERRORS)
_STACK = contextlib.ExitStack()
_MODEL = _STACK.enter_context(
    load_onnx_mlp(Path(_STACK.enter_context(tempfile.TemporaryDirectory())))
)
_ENDPOINT = _STACK.enter_context(HttpServer(_MODEL, CONFIG))
_LISTENER = socket.create_server(("127.0.0.1", 0))


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def target(data: bytes) -> None:
    server = _ENDPOINT._server
    assert server is not None
    with socket.create_connection(_LISTENER.getsockname(), timeout=30) as client:
        conn, address = _LISTENER.accept()
        client.sendall(data)  # fits the socket buffers: inputs are short
        client.shutdown(socket.SHUT_WR)
        assert server.connections.admit(address[0], conn) is None
        # What the server's connection thread does, here in the fuzzer's thread.
        server.process_request_thread(conn, address)
        answer = _read_all(client)
    errors, _ERRORS.records[:] = list(_ERRORS.records), []
    assert not errors, errors
    assert b"HTTP/1.1 500 " not in answer, answer[:300]


if __name__ == "__main__":
    run(target, "http_request", max_len=16384)
