"""The HTTP endpoint's settings (the ``[http]`` table) and its TLS.

Separate from the server so that reading a configuration imports neither
:mod:`http.server` nor :mod:`ssl`: an agent with the endpoint off never loads them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from agent.serve.codec import CodecLimits

if TYPE_CHECKING:
    import ssl

__all__ = [
    "FEEDBACK_PATH",
    "HEALTH_PATH",
    "KEY_HEADER",
    "METRICS_CONTENT_TYPE",
    "METRICS_PATH",
    "MIN_TOKEN_CHARS",
    "PREDICT_PATH",
    "REQUEST_ID_HEADER",
    "HttpServerConfig",
    "ServerTls",
    "model_route",
]

PREDICT_PATH = "/v1/predict"
FEEDBACK_PATH = "/v1/feedback"
# /v1/models/<name>/predict and /v1/models/<name>/feedback: a named model's endpoints.
_MODEL_PATH = re.compile(r"/v1/models/([a-z0-9][a-z0-9_-]{0,63})/(predict|feedback)")
KEY_HEADER = "X-Edgeship-Key"  # keeps a caller on one side of an A/B split
REQUEST_ID_HEADER = "X-Request-Id"  # names the request for feedback later
HEALTH_PATH = "/v1/health"
METRICS_PATH = "/metrics"  # where Prometheus looks by default
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
        max_connections_per_client: connections served at once from one client address
            (and never more than ``max_connections``), so that one client cannot hold
            every slot; on loopback, all local processes are one client.
        read_timeout_s: longest wait for one read or write on a connection.
        request_deadline_s: longest time from a connection (or the previous answer on
            it) to a complete request, headers and body.
        limits: bounds on the decoded tensors.
        tls: serve HTTPS with this certificate; with ``tls.client_ca_file`` every client
            must present a certificate that CA signed (which may replace the token on a
            non-loopback address).
        metrics: serve the agent's Prometheus metrics at ``/metrics`` (off by default),
            under the same admission as predictions: rate limit, then token.
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
    max_connections_per_client: int = 8
    read_timeout_s: float = 5.0
    request_deadline_s: float = 30.0
    limits: CodecLimits = field(default_factory=CodecLimits)
    tls: ServerTls | None = None
    metrics: bool = False

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
        for name in (
            "max_request_bytes",
            "burst",
            "max_tracked_clients",
            "max_connections",
            "max_connections_per_client",
        ):
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
        import ssl  # noqa: PLC0415 - only an HTTPS endpoint pays for TLS

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


def model_route(path: str) -> tuple[str, str] | None:
    """``(model, "predict" | "feedback")`` for a named model's path, else None."""
    m = _MODEL_PATH.fullmatch(path)
    return None if m is None else (m.group(1), m.group(2))
