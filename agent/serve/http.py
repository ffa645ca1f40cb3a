"""The local HTTP endpoint: predictions for applications on (or near) the device.

Off by default, bound to 127.0.0.1 by default. Standard library only
(:class:`http.server.ThreadingHTTPServer`): the agent adds no web framework to a device
for two routes.

* ``POST /v1/predict`` — body in either encoding of :mod:`agent.serve.codec`, told by
  ``Content-Type``; the answer uses the ``Accept`` type if it names one of the two, else
  the request's type.
* ``GET /v1/health`` — ``{"status": "ok", "model": <version or null>}``; 503 with
  ``"no-model"`` while nothing is installed.

Every request passes, in order: per-client rate limit (token bucket per client address,
429 + ``Retry-After``), bearer-token check (constant time, 401), ``Content-Length``
present and within ``max_request_bytes`` before any body byte is read (411/413), content
type (415); the body is read to exactly its declared length. Errors are JSON
``{"error": {"code": ..., "message": ...}}`` with 400 (bad input), 404/405, 429,
500 (the model failed), 503 (overloaded, no model, too many connections); never a
traceback.

Against slow clients: each socket read times out after ``read_timeout_s``, and a
watchdog closes any connection that has not delivered a complete request within
``request_deadline_s`` (this also ends idle keep-alive connections); at most
``max_connections`` connections are served at once, the next ones get an immediate 503.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

from agent.errors import (
    ConfigError,
    EdgeshipError,
    InputValidationError,
    OverloadedError,
    StateError,
)
from agent.serve._cache import Predictor, predict_versioned
from agent.serve.codec import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    CodecLimits,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json,
)

__all__ = ["HttpServer", "HttpServerConfig", "ServerTls", "TokenBuckets", "start_http_server"]

log = logging.getLogger(__name__)

PREDICT_PATH = "/v1/predict"
HEALTH_PATH = "/v1/health"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class HttpServerConfig:
    """The HTTP endpoint's settings; units are in the names.

    Attributes:
        enabled: off by default; :func:`start_http_server` does nothing unless set.
        host: address to bind; loopback by default. Any other address needs ``token``.
        port: TCP port; 0 picks a free one (see :attr:`HttpServer.port`).
        token: the bearer token clients must send (``Authorization: Bearer <token>``),
            at least 16 characters. ``None`` disables authentication, allowed on
            loopback only.
        max_request_bytes: largest request body; larger ones get 413 unread.
        rate_limit_per_s: requests per second each client address may sustain.
        burst: requests a client may send at once after being idle.
        max_tracked_clients: rate-limit buckets kept; the least recently seen client is
            forgotten first (it then starts with a full bucket).
        max_connections: connections served at once (one thread each).
        read_timeout_s: longest wait for one read or write on a connection.
        request_deadline_s: longest time from a connection (or the previous answer on
            it) to a complete request, headers and body.
        limits: bounds on the decoded tensors.
        tls: serve HTTPS with this certificate; with ``tls.client_ca_file`` every client
            must present a certificate that CA signed (which may replace the token on a
            non-loopback address).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8470
    token: str | None = field(default=None, repr=False)
    max_request_bytes: int = 8 * 1024 * 1024
    rate_limit_per_s: float = 100.0
    burst: int = 200
    max_tracked_clients: int = 10_000
    max_connections: int = 32
    read_timeout_s: float = 5.0
    request_deadline_s: float = 30.0
    limits: CodecLimits = field(default_factory=CodecLimits)
    tls: ServerTls | None = None

    def check(self) -> None:
        """Refuse settings that would be unsafe or meaningless.

        Raises:
            ConfigError: no token on a non-loopback address, a short token, or a
                non-positive limit.
        """
        client_certs = self.tls is not None and self.tls.client_ca_file is not None
        if self.token is None and not client_certs and not _is_loopback(self.host):
            raise ConfigError(
                f"the HTTP endpoint would listen on {self.host}, beyond this machine, without"
                " a token; set http.token (at least 16 random characters), require client"
                " certificates (http.tls_client_ca_file), or bind 127.0.0.1"
            )
        if self.token is not None and (
            len(self.token) < MIN_TOKEN_CHARS or not self.token.isascii() or " " in self.token
        ):
            raise ConfigError(
                f"the HTTP token must be at least {MIN_TOKEN_CHARS} ASCII characters without"
                " spaces; generate one with:"
                " python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        for name in ("max_request_bytes", "burst", "max_tracked_clients", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"http.{name} must be at least 1")
        for name in ("rate_limit_per_s", "read_timeout_s", "request_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"http.{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port {self.port} is not a TCP port")


@dataclass(frozen=True)
class ServerTls:
    """HTTPS for the endpoint: a certificate chain, its key, optionally a client CA."""

    cert_file: Path
    key_file: Path | None = None  # None: the key is in cert_file
    client_ca_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """Raises: ConfigError when a file is missing or invalid."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(self.client_ca_file)
        except OSError as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"the HTTP endpoint's TLS files are unusable: {exc}") from None
        return ctx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


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


class _Watchdog:
    """Closes connections that miss their deadline; one thread scans all armed connections.

    At most ``max_connections`` sockets are armed at once, so a scan is cheap; closing up
    to one scan interval late is fine against clients that are already too slow.
    """

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._armed: dict[socket.socket, float] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeship-http-watchdog")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def arm(self, sock: socket.socket, deadline: float) -> None:
        with self._lock:
            self._armed[sock] = deadline

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._armed.pop(sock, None)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, deadline in self._armed.items() if deadline <= now]
                for sock in late:
                    del self._armed[sock]
            for sock in late:
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns at once


class _HttpError(Exception):
    def __init__(
        self, status: HTTPStatus, code: str, message: str, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The agent restarts the endpoint on the same port after a config reload.
    allow_reuse_address = True

    def __init__(self, endpoint: HttpServer, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(endpoint.config.max_connections)
        # Connection threads are daemons (a stuck client never blocks exit); they are
        # tracked here so that stop() can let requests already received finish.
        self.active: set[threading.Thread] = set()
        self.active_lock = threading.Lock()
        super().__init__(address, _Handler)
        if endpoint.tls_context is not None:
            # The handshake happens in the connection's own thread, under its read timeout
            # and deadline: a client that stalls it cannot hold up the accept loop.
            self.socket = endpoint.tls_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Answer without a thread: a flood of slow connections cannot take them all.
            if not isinstance(request, ssl.SSLSocket):  # no TLS session to answer in yet
                try:
                    request.setblocking(False)
                    request.send(_TOO_MANY_CONNECTIONS)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        me = threading.current_thread()
        with self.active_lock:
            self.active.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.active_lock:
                self.active.discard(me)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP connection from %s failed", client_address)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_BUSY_BODY = _error_body("busy", "too many connections; retry shortly")
_TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
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
        except _HttpError as exc:
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
            raise _HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method-not-allowed",
                f"{path} takes {known[path]}",
                {"Allow": known[path]},
            )
        raise _HttpError(
            HTTPStatus.NOT_FOUND, "not-found", f"no such endpoint; use {', '.join(known)}"
        )

    def _admit(self) -> None:
        wait = self.endpoint._buckets.take(self.client_address[0])
        if wait:
            raise _HttpError(
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
                raise _HttpError(
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
            raise _HttpError(HTTPStatus.BAD_REQUEST, "invalid-input", str(exc)) from None
        try:
            version, outputs = predict_versioned(self.endpoint.predictor, message.tensors)
        except InputValidationError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "invalid-input", str(exc)) from None
        except (OverloadedError, StateError) as exc:
            code = "overloaded" if isinstance(exc, OverloadedError) else "unavailable"
            raise _HttpError(
                HTTPStatus.SERVICE_UNAVAILABLE, code, str(exc), {"Retry-After": "1"}
            ) from None
        except EdgeshipError as exc:
            log.warning("prediction failed: %s", exc)
            raise _HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "inference-failed", str(exc)
            ) from None
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
            raise _HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "length-required",
                "chunked bodies are not accepted; send Content-Length",
            )
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "length-required", "send Content-Length")
        if not raw_length.isdigit() or len(raw_length) > 18:
            self.close_connection = True
            raise _HttpError(
                HTTPStatus.BAD_REQUEST, "bad-request", f"invalid Content-Length {raw_length!r}"
            )
        length = int(raw_length)
        if length > config.max_request_bytes:
            # The body stays unread; closing the connection discards it.
            self.close_connection = True
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too-large",
                f"the body is {length} bytes; at most {config.max_request_bytes} are accepted",
            )
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type not in (JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE):
            self.close_connection = True
            raise _HttpError(
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
            raise _HttpError(
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
        self._send(status, JSON_CONTENT_TYPE, _error_body(code, message), headers)

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


class HttpServer:
    """The HTTP endpoint in front of ``predictor``; :meth:`start` listens, :meth:`stop` ends.

    Raises (from the constructor):
        ConfigError: ``config`` is unsafe or invalid (see :meth:`HttpServerConfig.check`).
    """

    def __init__(
        self,
        predictor: Predictor,
        config: HttpServerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.check()
        self.predictor = predictor
        self.config = config
        self.tls_context = None if config.tls is None else config.tls.context()
        self._token_digest = (
            None
            if config.token is None
            else hashlib.sha256(f"Bearer {config.token}".encode()).digest()
        )
        self._buckets = TokenBuckets(
            config.rate_limit_per_s, config.burst, config.max_tracked_clients, clock
        )
        self._watchdog: _Watchdog | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (useful with ``port=0``).

        Raises:
            StateError: the server is not started.
        """
        if self._server is None:
            raise StateError("the HTTP endpoint is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host
        scheme = "https" if self.tls_context is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        """Listen and serve in a background thread.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, no permission).
        """
        if self._server is not None:
            return
        try:
            self._server = _Server(self, (self.config.host, self.config.port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc};"
                " choose another http.port or http.host"
            ) from exc
        if self.config.token is None:
            log.warning("the HTTP endpoint on %s accepts requests without a token", self.url)
        self._watchdog = _Watchdog(min(0.5, self.config.request_deadline_s / 4))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="edgeship-http",
            daemon=True,
        )
        self._thread.start()
        log.info("HTTP endpoint listening on %s", self.url)

    def stop(self, drain_timeout_s: float = 0.0) -> bool:
        """Stop accepting and close the listening socket.

        Requests already received get up to ``drain_timeout_s`` to finish (a handler idle
        on a keep-alive connection ends at its read timeout). Returns False if some were
        still running when that time was up.
        """
        server, self._server = self._server, None
        if server is None:
            return True
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + drain_timeout_s
        with server.active_lock:
            running = list(server.active)
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        drained = not any(t.is_alive() for t in running)
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return drained

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http_server(predictor: Predictor, config: HttpServerConfig) -> HttpServer | None:
    """Start the endpoint if ``config.enabled``; None when it is off (the default).

    Raises:
        ConfigError: as :class:`HttpServer` and :meth:`HttpServer.start`.
    """
    if not config.enabled:
        return None
    server = HttpServer(predictor, config)
    server.start()
    return server
