"""The HTTP endpoint's request handler: admission, routing, bodies, answers.

One :class:`Handler` per connection (a thread of :class:`http.server.ThreadingHTTPServer`).
Every request passes, in order: rate limit, bearer token, route and method,
``Content-Length`` within ``max_request_bytes`` before any body byte is read, content
type. Every failure is a JSON error with its status, a client's mistake always a 4xx; a
traceback only ever reaches the log, for a bug.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Union

from agent.errors import EdgeshipError, InputValidationError, error_code
from agent.messages.feedback import parse_feedback
from agent.serve import _http_config as paths
from agent.serve._buckets import TokenBuckets
from agent.serve.codec import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json_parts,
)

if TYPE_CHECKING:
    from agent.serve.http import Server

__all__ = [
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_FROM_CLIENT",
    "Handler",
    "HttpError",
    "TokenBuckets",
    "error_body",
    "shut_reading",
]

log = logging.getLogger("agent.serve.http")


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
    "unknown-model": HTTPStatus.NOT_FOUND,
    "unknown-request": HTTPStatus.NOT_FOUND,
    "already-labelled": HTTPStatus.CONFLICT,
    "overloaded": HTTPStatus.SERVICE_UNAVAILABLE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
    "inference-failed": HTTPStatus.INTERNAL_SERVER_ERROR,
    "internal": HTTPStatus.INTERNAL_SERVER_ERROR,
}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _unavailable(code: str, message: str) -> bytes:
    """A complete 503 answer, sent without a handler thread."""
    body = error_body(code, message)
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


TOO_MANY_CONNECTIONS = _unavailable("busy", "too many connections; retry shortly")
TOO_MANY_FROM_CLIENT = _unavailable(
    "busy", "too many connections from your address; reuse or close some, then retry"
)

Body = Union[bytes, list[bytes]]  # an answer, whole or in parts written one after the other
_WRITE_BYTES = 1 << 16


def shut_reading(sock: socket.socket, *, also_writing: bool = False) -> None:
    """Make a blocked read on ``sock`` return at once (and a write fail, ``also_writing``).

    Through the plain socket's method: an ``SSLSocket``'s own would drop its TLS state,
    so an answer still to be written would go out in clear.
    """
    with contextlib.suppress(OSError):  # closed already
        socket.socket.shutdown(sock, socket.SHUT_RDWR if also_writing else socket.SHUT_RD)


def tls_refusal(exc: BaseException) -> str | None:
    """What to check when a TLS handshake failed over trust; None when it failed otherwise
    (plain HTTP on the TLS port, a timeout, a client going away)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            "its client certificate does not verify against http.tls_client_ca_file"
            f" ({exc.verify_message}); issue it from that CA, or check the setting"
        )
    reason = str(getattr(exc, "reason", None) or "").upper()
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "it sent no client certificate, which http.tls_client_ca_file requires"
    if "ALERT" in reason and any(w in reason for w in ("CERTIFICATE", "UNKNOWN_CA", "DECRYPT")):
        return (
            f"it refused this endpoint's certificate ({reason.lower()}); check"
            " http.tls_cert_file (the whole chain) against the CA the client trusts"
        )
    return None


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "edgeship-agent"
    sys_version = ""

    def setup(self) -> None:
        self.endpoint = self.server.endpoint
        self.connections = self.server.connections
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
                self._handshake_failed(exc)
            finally:
                self.watchdog.disarm(self.connection)

    def _handshake_failed(self, exc: BaseException) -> None:
        self.tls_failed = True
        peer = self.client_address[0]
        refusal = tls_refusal(exc)
        # A refusal is worth an operator's attention, but a client must not flood the log.
        if refusal is not None and not self.endpoint.tls_warnings.take(peer):
            log.warning("TLS handshake with %s refused: %s", peer, refusal)
        else:
            log.debug("TLS handshake with %s failed: %s", peer, exc)

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def handle_one_request(self) -> None:
        """Read one request and answer it (http.server's loop, with our admission first)."""
        self.body_read = self.responding = self.expect_continue = False
        self.deadline = time.monotonic() + self.endpoint.config.request_deadline_s
        self.watchdog.arm(self.connection, self.deadline)
        started = False
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            started = True
            self.connections.begin(self.connection)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            elif self.parse_request():
                self._dispatch()
        except socket.timeout:  # TimeoutError from 3.10 on; a plain OSError before
            # An idle keep-alive connection just closes; a request stalled half-way gets 408.
            self.close_connection = True
            if started and not self.responding:
                self._answer_too_slow()
        except OSError:  # the client reset the connection, or a drain shut it
            self.close_connection = True
        finally:
            self.watchdog.disarm(self.connection)
            if started and self.connections.end(self.connection):
                self.close_connection = True

    def _answer_too_slow(self) -> None:
        with contextlib.suppress(OSError):  # the client may be gone as well
            self._send_json_error(
                HTTPStatus.REQUEST_TIMEOUT,
                "too-slow",
                f"no byte of the request arrived for {self.endpoint.config.read_timeout_s} s",
            )

    def handle_expect_100(self) -> bool:
        # 100 Continue only once the request is admitted (see _read_body), so that an
        # unauthenticated or oversized request never has its body sent.
        self.expect_continue = True
        return True

    # --- admission and routes ------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._admit()
            status, content_type, body = self._route()()
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

    def _route(self) -> Callable[[], tuple[int, str, Body]]:
        """The handler of the request's path and method; only ever for an admitted client."""
        path = self.path.split("?", 1)[0]
        routes: dict[str, tuple[str, Callable[[], tuple[int, str, Body]]]] = {
            paths.PREDICT_PATH: ("POST", lambda: self._predict(None)),
            paths.FEEDBACK_PATH: ("POST", lambda: self._feedback(None)),
            paths.HEALTH_PATH: ("GET", self._health),
        }
        if (text := self.endpoint.metrics_text) is not None:  # opt-in: http.metrics
            routes[paths.METRICS_PATH] = (
                "GET",
                lambda: (HTTPStatus.OK, paths.METRICS_CONTENT_TYPE, text()),
            )
        named = paths.model_route(path)  # /v1/models/<name>/predict or .../feedback
        if named is not None:
            name, leaf = named
            handler = self._predict if leaf == "predict" else self._feedback
            routes[path] = ("POST", lambda: handler(name))
        if path not in routes:
            raise HttpError(
                HTTPStatus.NOT_FOUND,
                "not-found",
                f"no such endpoint; use {', '.join(routes)} or /v1/models/<name>/predict",
            )
        method, route = routes[path]
        if self.command != method:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method-not-allowed",
                f"{path} takes {method}",
                {"Allow": method},
            )
        return route

    def _admit(self) -> None:
        """Refuse a request too slow, too frequent or not authenticated, in that order."""
        if time.monotonic() >= self.deadline:  # the watchdog ended the reading of its head
            self.close_connection = True
            raise HttpError(
                HTTPStatus.REQUEST_TIMEOUT,
                "too-slow",
                f"the request did not arrive within {self.endpoint.config.request_deadline_s} s",
            )
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

    def _predict(self, model: str | None) -> tuple[int, str, Body]:
        body, binary = self._read_body()
        limits = self.endpoint.config.limits
        try:
            message = decode_binary(body, limits) if binary else decode_json(body, "inputs", limits)
        except InputValidationError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, "invalid-input", str(exc)) from None
        del body  # JSON tensors do not refer to it (binary ones are views that keep it)
        try:
            version, outputs = self.endpoint.router.get(model).predict_request(
                message.tensors,
                key=self.headers.get(paths.KEY_HEADER),
                request_id=self.headers.get(paths.REQUEST_ID_HEADER),
            )
        except EdgeshipError as exc:
            raise self._failed(exc) from None
        del message  # the inputs are no longer needed while the answer is encoded
        meta = {} if version is None else {"model": version}
        if self._answer_binary(binary):
            return HTTPStatus.OK, BINARY_CONTENT_TYPE, encode_binary(outputs, meta)
        return HTTPStatus.OK, JSON_CONTENT_TYPE, encode_json_parts(outputs, "outputs", meta)

    def _failed(self, exc: EdgeshipError) -> HttpError:
        code = error_code(exc)
        if code == "inference-failed":
            log.warning("prediction failed: %s", exc)
        status = _STATUS[code]
        retry = {"Retry-After": "1"} if status == HTTPStatus.SERVICE_UNAVAILABLE else {}
        return HttpError(status, code, str(exc), retry)

    def _feedback(self, model: str | None) -> tuple[int, str, Body]:
        body, _ = self._read_body()
        try:
            item = parse_feedback(body, versioned=False)
            answer = self.endpoint.router.get(model or item.model).feedback(
                item.request_id, item.label
            )
        except ValueError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, "invalid-input", str(exc)) from None
        except EdgeshipError as exc:
            raise self._failed(exc) from None
        return HTTPStatus.OK, JSON_CONTENT_TYPE, json.dumps(answer).encode()

    def _health(self) -> tuple[int, str, bytes]:
        router = self.endpoint.router
        versions = {name: served.digest for name, served in router.models.items()}
        default = None if router.default is None else versions[router.default]
        body = {"status": "ok", "model": default, "models": versions}
        if not any(served.ready for served in router.models.values()):
            body["status"] = "no-model"
            return HTTPStatus.SERVICE_UNAVAILABLE, JSON_CONTENT_TYPE, json.dumps(body).encode()
        return HTTPStatus.OK, JSON_CONTENT_TYPE, json.dumps(body).encode()

    # --- request body --------------------------------------------------------------------

    def _read_body(self) -> tuple[bytes, bool]:
        length = self._content_length()
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type not in (JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE):
            self.close_connection = True
            raise HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                f"Content-Type must be {JSON_CONTENT_TYPE} or {BINARY_CONTENT_TYPE}",
            )
        if self.expect_continue:
            try:
                self.send_response_only(HTTPStatus.CONTINUE)
                self.end_headers()
            except OSError:  # the client went away: no body will come
                self.close_connection = True
                raise HttpError(
                    HTTPStatus.BAD_REQUEST, "truncated", "the connection failed"
                ) from None
        # rfile.read(n) never reads past the declared length; the socket timeout and the
        # watchdog bound how long a slow sender can hold the connection.
        try:
            body = self.rfile.read(length)
        except OSError as exc:  # a read timed out, or the client reset the connection
            self.close_connection = True
            if isinstance(exc, socket.timeout):
                raise HttpError(
                    HTTPStatus.REQUEST_TIMEOUT,
                    "too-slow",
                    f"the body stalled: no byte for {self.endpoint.config.read_timeout_s} s",
                ) from None
            raise HttpError(
                HTTPStatus.BAD_REQUEST, "truncated", "the connection failed during the body"
            ) from None
        finally:
            self.body_read = True
            self.watchdog.disarm(self.connection)
        if len(body) != length:
            self.close_connection = True
            if time.monotonic() >= self.deadline:  # the watchdog ended the reading
                raise HttpError(
                    HTTPStatus.REQUEST_TIMEOUT,
                    "too-slow",
                    f"the body did not arrive within {self.endpoint.config.request_deadline_s} s",
                )
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                "truncated",
                f"the body ended after {len(body)} of {length} bytes",
            )
        return body, content_type == BINARY_CONTENT_TYPE

    def _content_length(self) -> int:
        """The declared body length, checked before any body byte is read."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the body's end is unknown: never reuse
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "length-required",
                "chunked bodies are not accepted; send Content-Length",
            )
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "length-required", "send Content-Length")
        raw = values[0]
        # isdigit() alone takes "²" or Arabic-Indic digits, which int() then refuses.
        if len(values) > 1 or not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            self.close_connection = True
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                "bad-request",
                f"send exactly one Content-Length of decimal digits, not {values!r}"[:200],
            )
        length = int(raw)
        limit = self.endpoint.config.max_request_bytes
        if length > limit:
            # The body stays unread; closing the connection discards it.
            self.close_connection = True
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too-large",
                f"the body is {length} bytes; at most {limit} are accepted",
            )
        return length

    def _answer_binary(self, request_binary: bool) -> bool:
        accept = self.headers.get("Accept") or ""
        if BINARY_CONTENT_TYPE in accept:
            return True
        if JSON_CONTENT_TYPE in accept:
            return False
        return request_binary

    # --- responses -----------------------------------------------------------------------

    def _send(
        self, status: int, content_type: str, body: Body, headers: Mapping[str, str] = {}
    ) -> None:
        self.responding = True
        parts = [body] if isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(part) for part in parts)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.connections.draining:
            self.close_connection = True  # the server is stopping: this is the last answer
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        # One write per 64 KiB or so: with TCP_NODELAY every write is a packet, and an
        # answer is never joined whole.
        pending: list[bytes] = []
        size = 0
        for part in parts:
            pending.append(part)
            size += len(part)
            if size >= _WRITE_BYTES:
                self.wfile.write(b"".join(pending))
                pending, size = [], 0
        if pending:
            self.wfile.write(b"".join(pending))

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
