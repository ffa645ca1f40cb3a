"""Where the broker is and how to log in: one rule for the agent and the fleet side.

A broker URL is ``mqtt://HOST[:PORT]`` (port 1883 by default) or ``mqtts://HOST[:PORT]``
(TLS, 8883 by default), and nothing else: no path, query or fragment, and no
credentials. A user name and password in a URL leak into process lists, shell history
and logs, so the user name is a setting of its own and the password is read from a file:
``broker.username`` / ``broker.password_file`` in agent.toml, ``--username`` /
``--password-file`` on the ``edgeship`` fleet commands.

:class:`BrokerConfig` is the whole connection's settings, the ``[broker]`` table of
agent.toml read as it is; :class:`agent.plumbing.mqtt.MqttClient` takes it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.errors import ConfigError
from agent.plumbing.tls import TlsConfig

if TYPE_CHECKING:
    import ssl

__all__ = ["BrokerConfig", "BrokerUrl"]

_CREDENTIALS_FIX = (
    "give the user name on its own (broker.username in agent.toml, --username for"
    " edgeship) and the password in a file (broker.password_file, --password-file)"
)


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL; ``tls`` is true for ``mqtts://``."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str, *, setting: str = "the broker URL") -> BrokerUrl:
        """Parse ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` (a trailing ``/`` is fine).

        Raises:
            ConfigError: another scheme, no host, a bad port, a path, query or fragment,
                or credentials (which the message never repeats); it names ``setting``.
        """
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is not None and "@" in parts.netloc:
            raise ConfigError(
                f"{setting} must not carry a user name or password (they leak into process"
                f" lists, shell history and logs); {_CREDENTIALS_FIX}"
            )
        if (
            parts is None
            or parts.scheme not in ("mqtt", "mqtts")
            or not parts.hostname
            or port == 0
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ConfigError(
                f"{setting} {url!r} must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
                " (no path, query or fragment)"
            )
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


@dataclass(frozen=True)
class BrokerConfig:
    """One broker connection's settings: agent.toml's ``[broker]``, or the fleet CLI's.

    TLS is used exactly when ``url`` is ``mqtts://``; ``tls`` then names the CA to trust
    (None: the system's CAs) and a client certificate for mutual TLS.
    """

    url: BrokerUrl
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Path | None = None  # read when the client is made, never stored here
    connect_timeout_s: float = 10.0
    keepalive_s: int = 30
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def password(self) -> str | None:
        """The password from ``password_file`` (surrounding white space removed); None without.

        Raises:
            ConfigError: the file cannot be read.
        """
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"cannot read the broker password from {self.password_file}: {reason};"
                " check broker.password_file (agent.toml) or --password-file"
            ) from None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of an ``mqtts://`` broker; None for ``mqtt://``.

        Raises:
            ConfigError: a TLS file is missing or unusable.
        """
        if not self.url.tls:
            return None
        try:
            return (self.tls or TlsConfig()).context()
        except OSError as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"broker TLS files are unusable: {exc}; check broker.ca_file, cert_file and"
                " key_file (--ca-file, --cert, --key)"
            ) from None
