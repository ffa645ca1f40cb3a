"""The HTTP endpoint's request handler: admission, routing, bodies, answers.

One :class:`Handler` per connection (a thread of :class:`http.server.ThreadingHTTPServer`).
Every request passes, in order: rate limit, bearer token, ``Content-Length`` within
``max_request_bytes`` before any body byte is read, content type; then the route. Every
failure is a JSON error with its status; a traceback only ever reaches the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, NoReturn

from agent.errors import EdgeshipError, InputValidationError, error_code
from agent.serve._cache import predict_versioned
from agent.serve._http_config import HEALTH_PATH, PREDICT_PATH
from agent.serve.codec import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json,
)

if TYPE_CHECKING:
    from agent.serve.http import Server

__all__ = ["TOO_MANY_CONNECTIONS", "Handler", "HttpError", "TokenBuckets", "error_body"]

log = logging.getLogger("agent.serve.http")


class TokenBuckets:
    """Per-client token buckets, bounded in the number of clients. Thread-safe."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def take(self, client: str) -> float:
        """0.0 if ``client`` may proceed (one token taken), else seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self._rate
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait


class HttpError(Exception):
    def __init__(
        self, status: HTTPStatus, code: str, message: str, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers)


# The HTTP status of each prediction error code (agent.errors.error_code).
_STATUS = {
    "invalid-input": HTTPStatus.BAD_REQUEST,
    "overloaded": HTTPStatus.SERVICE_UNAVAILABLE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
    "inference-failed": HTTPStatus.INTERNAL_SERVER_ERROR,
    "internal": HTTPStatus.INTERNAL_SERVER_ERROR,
}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_BUSY_BODY = error_body("busy", "too many connections; retry shortly")
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "edgeship-agent"
    sys_version = ""

    def setup(self) -> None:
        self.endpoint = self.server.endpoint
        watchdog = self.endpoint._watchdog
        assert watchdog is not None  # started before the server accepts connections
        self.watchdog = watchdog
        super().setup()
        self.connection.settimeout(self.endpoint.config.read_timeout_s)
        # Headers and body go out in two writes; without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (up to 40 ms per keep-alive request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls_failed = False
        if isinstance(self.connection, ssl.SSLSocket):
            deadline = time.monotonic() + self.endpoint.config.request_deadline_s
            self.watchdog.arm(self.connection, deadline)
            try:
                self.connection.do_handshake()
            except (OSError, ValueError) as exc:  # refused certificate, plain HTTP, timeout
                log.info("TLS handshake with %s failed: %s", self.client_address[0], exc)
                self.tls_failed = True
            finally:
                self.watchdog.disarm(self.connection)

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def handle_one_request(self) -> None:
        self.body_read = False
        watchdog = self.watchdog
        watchdog.arm(self.connection, time.monotonic() + self.endpoint.config.request_deadline_s)
        try:
            super().handle_one_request()
        except OSError:  # the watchdog shut the socket, or the client reset it
            self.close_connection = True
        finally:
            watchdog.disarm(self.connection)

    def do_POST(self) -> None:
        self._dispatch(self._predict if self._path() == PREDICT_PATH else None)

    def do_GET(self) -> None:
        self._dispatch(self._health if self._path() == HEALTH_PATH else None)

    # --- the routes ----------------------------------------------------------------------

    def _dispatch(self, route: Callable[[], tuple[int, str, bytes]] | None) -> None:
        try:
            if route is None:
                self._not_found()
            self._admit()
            status, content_type, body = route()
        except HttpError as exc:
            if not self.body_read and (
                self.headers.get("Content-Length", "0") != "0"
                or "Transfer-Encoding" in self.headers
            ):
                self.close_connection = True  # an unread body would be taken for the next request
            self._send_json_error(exc.status, exc.code, exc.message, exc.headers)
            return
        except Exception:
            # A bug or an unforeseen runtime failure: the client learns nothing internal.
            log.exception("HTTP %s %s failed", self.command, self.path)
            self._send_json_error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error; see the agent log"
            )
            return
        self._send(status, content_type, body)

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _not_found(self) -> NoReturn:
        known = {PREDICT_PATH: "POST", HEALTH_PATH: "GET"}
        path = self._path()
        if path in known:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method-not-allowed",
                f"{path} takes {known[path]}",
                {"Allow": known[path]},
            )
        raise HttpError(
            HTTPStatus.NOT_FOUND, "not-found", f"no such endpoint; use {', '.join(known)}"
        )

    def _admit(self) -> None:
        wait = self.endpoint._buckets.take(self.client_address[0])
        if wait:
            raise HttpError(
                HTTPStatus.TOO_MANY_REQUESTS,
                "rate-limited",
                f"too many requests from {self.client_address[0]}; slow down",
                {"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        expected = self.endpoint._token_digest
        if expected is not None:
            given = (self.headers.get("Authorization") or "").encode("latin-1", "replace")
            # Compare fixed-length digests: constant time, and the token's length stays secret.
            if not hmac.compare_digest(hashlib.sha256(given).digest(), expected):
                raise HttpError(
                    HTTPStatus.UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                    {"WWW-Authenticate": 'Bearer realm="edgeship"'},
                )

    def _predict(self) -> tuple[int, str, bytes]:
        body, binary = self._read_body()
        limits = self.endpoint.config.limits
        try:
            message = decode_binary(body, limits) if binary else decode_json(body, "inputs", limits)
        except InputValidationError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, "invalid-input", str(exc)) from None
        try:
            version, outputs = predict_versioned(self.endpoint.predictor, message.tensors)
        except EdgeshipError as exc:
            code = error_code(exc)
            if code == "inference-failed":
                log.warning("prediction failed: %s", exc)
            status = _STATUS[code]
            retry = {"Retry-After": "1"} if status == HTTPStatus.SERVICE_UNAVAILABLE else {}
            raise HttpError(status, code, str(exc), retry) from None
        meta = {} if version is None else {"model": version}
        if self._answer_binary(binary):
            return HTTPStatus.OK, BINARY_CONTENT_TYPE, encode_binary(outputs, meta)
        return HTTPStatus.OK, JSON_CONTENT_TYPE, encode_json(outputs, "outputs", meta)

    def _health(self) -> tuple[int, str, bytes]:
        predictor = self.endpoint.predictor
        version = getattr(predictor, "digest", None)
        if hasattr(predictor, "digest") and version is None:
            body = {"status": "no-model", "model": None}
            return HTTPStatus.SERVICE_UNAVAILABLE, JSON_CONTENT_TYPE, json.dumps(body).encode()
        body = {"status": "ok", "model": version if isinstance(version, str) else None}
        return HTTPStatus.OK, JSON_CONTENT_TYPE, json.dumps(body).encode()

    # --- request body --------------------------------------------------------------------

    def _read_body(self) -> tuple[bytes, bool]:
        config = self.endpoint.config
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the body's end is unknown: never reuse
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "length-required",
                "chunked bodies are not accepted; send Content-Length",
            )
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "length-required", "send Content-Length")
        if not raw_length.isdigit() or len(raw_length) > 18:
            self.close_connection = True
            raise HttpError(
                HTTPStatus.BAD_REQUEST, "bad-request", f"invalid Content-Length {raw_length!r}"
            )
        length = int(raw_length)
        if length > config.max_request_bytes:
            # The body stays unread; closing the connection discards it.
            self.close_connection = True
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too-large",
                f"the body is {length} bytes; at most {config.max_request_bytes} are accepted",
            )
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type not in (JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE):
            self.close_connection = True
            raise HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                f"Content-Type must be {JSON_CONTENT_TYPE} or {BINARY_CONTENT_TYPE}",
            )
        # rfile.read(n) never reads past the declared length; the socket timeout and the
        # watchdog bound how long a slow sender can hold the connection.
        body = self.rfile.read(length)
        self.body_read = True
        self.watchdog.disarm(self.connection)
        if len(body) != length:
            self.close_connection = True
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                "truncated",
                f"the body ended after {len(body)} of {length} bytes",
            )
        return body, content_type == BINARY_CONTENT_TYPE

    def _answer_binary(self, request_binary: bool) -> bool:
        accept = self.headers.get("Accept") or ""
        if BINARY_CONTENT_TYPE in accept:
            return True
        if JSON_CONTENT_TYPE in accept:
            return False
        return request_binary

    # --- responses -----------------------------------------------------------------------

    def _send(
        self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] = {}
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json_error(
        self, status: int, code: str, message: str, headers: Mapping[str, str] = {}
    ) -> None:
        self._send(status, JSON_CONTENT_TYPE, error_body(code, message), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, oversized headers) as JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_json_error(code, phrase.lower().replace(" ", "-"), message or phrase)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)
