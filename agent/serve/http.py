"""The local HTTP endpoint: predictions for applications on (or near) the device.

Off by default, bound to 127.0.0.1 by default. Standard library only
(:class:`http.server.ThreadingHTTPServer`): the agent adds no web framework to a device
for two routes.

* ``POST /v1/predict`` — body in either encoding of :mod:`agent.serve.codec`, told by
  ``Content-Type``; the answer uses the ``Accept`` type if it names one of the two, else
  the request's type.
* ``POST /v1/models/<name>/predict`` — the same for a named model (``/v1/predict`` is
  the model called ``default``, or the only one); ``X-Edgeship-Key`` keeps a caller on one
  side of an A/B split, ``X-Request-Id`` names the request for feedback.
* ``POST /v1/feedback``, ``/v1/models/<name>/feedback`` — ``{"request_id": ...,
  "label": ...}``: the ground truth for an earlier request (404 ``unknown-request`` when
  it is not remembered).
* ``GET /v1/health`` — ``{"status": "ok", "model": <version or null>, "models": {name:
  version}}``; 503 with ``"no-model"`` while no model serves.

Every request passes, in order: per-client rate limit (token bucket per client address,
429 + ``Retry-After``), bearer-token check (constant time, 401), then the route (404,
405: an unauthenticated client learns nothing about them), ``Content-Length`` present
and within ``max_request_bytes`` before any body byte is read (411/413; a client that
sent ``Expect: 100-continue`` gets its ``100 Continue`` only then), content type (415);
the body is read to exactly its declared length. Errors are JSON
``{"error": {"code": ..., "message": ...}}`` with 400 (bad input, a body cut short), 404,
405, 408 (too slow), 429, 500 (the model failed, or a bug), 503 (overloaded, no model,
too many connections); never a traceback.

Against slow clients: each socket read times out after ``read_timeout_s``, and a
watchdog ends the reading of any request not complete within ``request_deadline_s``
(408; an idle keep-alive connection is just closed). At most ``max_connections``
connections are served at once, and at most ``max_connections_per_client`` from one
client address; the next ones get an immediate 503.

:meth:`HttpServer.stop` drains: it closes idle keep-alive connections at once, answers
the requests already arriving with ``Connection: close``, and cuts what is still running
at the drain timeout; the log says which.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from agent.errors import ConfigError, StateError
from agent.serve._cache import Predictor
from agent.serve._http_config import HttpServerConfig, ServerTls
from agent.serve._http_handler import (
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_CLIENT,
    Handler,
    TokenBuckets,
    shut_reading,
)
from agent.serve._router import Router

__all__ = ["HttpServer", "HttpServerConfig", "ServerTls", "TokenBuckets", "start_http_server"]

log = logging.getLogger(__name__)


class _Watchdog:
    """Ends the reading of requests that miss their deadline; one thread scans them all.

    At most ``max_connections`` sockets are armed at once, so a scan is cheap; acting up
    to one scan interval late is fine against clients that are already too slow. Only the
    reading side is shut: the handler's blocked read returns at once, and it can still
    answer 408.
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
                shut_reading(sock)


class Connections:
    """The connections being served: how many from each client address, and which are
    between requests (a drain closes those at once). Thread-safe."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self._max_total = max_total
        self._max_per_client = max_per_client
        self._lock = threading.Lock()
        self._per_client: dict[str, int] = {}
        self._idle: set[socket.socket] = set()
        self._busy: set[socket.socket] = set()
        self.draining = False

    def admit(self, client: str, sock: socket.socket) -> bytes | None:
        """None if ``sock`` may be served (it then counts as idle), else the answer refusing it."""
        with self._lock:
            if len(self._idle) + len(self._busy) >= self._max_total:
                return TOO_MANY_CONNECTIONS
            held = self._per_client.get(client, 0)
            if held >= self._max_per_client:
                return TOO_MANY_FROM_CLIENT
            self._per_client[client] = held + 1
            self._idle.add(sock)
        return None

    def release(self, client: str, sock: socket.socket) -> None:
        with self._lock:
            self._idle.discard(sock)
            self._busy.discard(sock)
            held = self._per_client.pop(client, 0) - 1
            if held > 0:
                self._per_client[client] = held

    def begin(self, sock: socket.socket) -> None:
        """A request started arriving on ``sock``."""
        with self._lock:
            self._idle.discard(sock)
            self._busy.add(sock)

    def end(self, sock: socket.socket) -> bool:
        """The request on ``sock`` was answered; True if the connection must now close."""
        with self._lock:
            self._busy.discard(sock)
            if not self.draining:
                self._idle.add(sock)
            return self.draining

    def drain(self) -> int:
        """Close the idle connections, make the busy ones close after their answer; returns
        how many requests are in progress."""
        with self._lock:
            self.draining = True
            idle, busy = list(self._idle), len(self._busy)
        for sock in idle:
            shut_reading(sock, also_writing=True)
        return busy

    def cut(self) -> int:
        """Shut every connection still busy; returns how many there were."""
        with self._lock:
            busy = list(self._busy)
        for sock in busy:
            shut_reading(sock, also_writing=True)
        return len(busy)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The agent restarts the endpoint on the same port after a config reload.
    allow_reuse_address = True

    def __init__(self, endpoint: HttpServer, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        config = endpoint.config
        self.connections = Connections(config.max_connections, config.max_connections_per_client)
        # Connection threads are daemons (a stuck client never blocks exit); they are
        # tracked here so that stop() can let requests already received finish.
        self.active: set[threading.Thread] = set()
        self.active_lock = threading.Lock()
        super().__init__(address, Handler)
        if endpoint.tls_context is not None:
            # The handshake happens in the connection's own thread, under its read timeout
            # and deadline: a client that stalls it cannot hold up the accept loop.
            self.socket = endpoint.tls_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        refusal = self.connections.admit(client_address[0], request)
        if refusal is not None:
            # Answer without a thread: a flood of slow connections cannot take them all.
            if not isinstance(request, ssl.SSLSocket):  # no TLS session to answer in yet
                try:
                    request.setblocking(False)
                    request.send(refusal)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release(client_address[0], request)
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
            self.connections.release(client_address[0], request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the client went away before a request
            log.debug("HTTP connection from %s failed", client_address, exc_info=True)
            return
        log.exception("HTTP connection from %s failed", client_address)


class HttpServer:
    """The HTTP endpoint in front of ``predictor`` (a model, or the agent's models by name:
    a :class:`~agent.serve._router.Router`); :meth:`start` listens, :meth:`stop` ends.

    Raises (from the constructor):
        ConfigError: ``config`` is unsafe or invalid (see :meth:`HttpServerConfig.check`).
    """

    def __init__(
        self,
        predictor: Predictor | Router,
        config: HttpServerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics_text: Callable[[], bytes] | None = None,
    ) -> None:
        config.check()
        self.router = Router.of(predictor)
        self.config = config
        # What /metrics answers (the agent's exposition); routed only with http.metrics.
        self.metrics_text = metrics_text if config.metrics else None
        self.tls_context = None if config.tls is None else config.tls.context()
        self._token_digest = (
            None
            if config.token is None
            else hashlib.sha256(f"Bearer {config.token}".encode()).digest()
        )
        self._buckets = TokenBuckets(
            config.rate_limit_per_s, config.burst, config.max_tracked_clients, clock
        )
        # Refused TLS handshakes are logged as warnings: a few at once, then one a minute
        # per client address, so that no client can flood the log.
        self.tls_warnings = TokenBuckets(1 / 60, 3, 1024, clock)
        self._watchdog: _Watchdog | None = None
        self._server: Server | None = None
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
            self._server = Server(self, (self.config.host, self.config.port))
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
        """Stop accepting, close idle connections, and drain the requests in progress.

        Requests already arriving are read, answered with ``Connection: close`` and their
        connections closed; after ``drain_timeout_s`` the ones still running are cut.
        Returns False if some were cut. The log says which.
        """
        server, self._server = self._server, None
        if server is None:
            return True
        server.shutdown()
        server.server_close()
        in_progress = server.connections.drain()
        deadline = time.monotonic() + drain_timeout_s
        with server.active_lock:
            running = list(server.active)
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        cut = server.connections.cut()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        fields = {"in_progress": in_progress, "cut": cut, "drain_timeout_s": drain_timeout_s}
        if cut:
            log.warning(
                "HTTP endpoint stopped: requests cut at the drain timeout", extra={"fields": fields}
            )
        else:
            log.info("HTTP endpoint drained", extra={"fields": fields})
        return cut == 0

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
