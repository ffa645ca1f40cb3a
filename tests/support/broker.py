"""A real mosquitto broker for tests: started on a free loopback port, stopped at teardown.

The root conftest registers this module as a plugin, so every test can ask for the
fixtures by name.

``broker`` is a plain TCP broker. ``broker_factory(tls=..., acl=..., users=...)`` makes
brokers with TLS / mutual TLS, ACL files, and user names with passwords (no anonymous
clients then); ``pki`` is a CA, a server certificate for
127.0.0.1/localhost, client certificates and a foreign CA's client certificate, all
generated in tmp. ``Broker.stop()`` / ``Broker.start()`` restart on the same port for
outage tests. Persistence is on, so messages the broker acknowledged survive a
``stop()``/``start()`` (mosquitto writes its database on SIGTERM).

If mosquitto is missing the fixtures skip, except when ``CI=true``: then they fail.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.plumbing.broker import BrokerUrl

__all__ = [
    "MOSQUITTO",
    "Broker",
    "ClientCert",
    "Pki",
    "Received",
    "Subscriber",
    "TlsMode",
    "broker",
    "broker_factory",
    "free_port",
    "make_pki",
    "mosquitto_path",
    "pki",
]

MOSQUITTO = "/usr/sbin/mosquitto"
_START_TIMEOUT_S = 10.0


def mosquitto_path() -> str:
    """The mosquitto binary; skips the test when missing, or fails when ``CI=true``."""
    path = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else shutil.which("mosquitto")
    if path is None:
        message = f"mosquitto not found at {MOSQUITTO} nor on PATH (apt-get install mosquitto)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    cert_file: Path
    key_file: Path
    common_name: str


@dataclass(frozen=True)
class Pki:
    """Files of a throwaway PKI. ``foreign`` is signed by a CA the broker does not trust."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, ClientCert]
    foreign: ClientCert
    directory: Path
    _ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = field(repr=False)

    def client(self, common_name: str) -> ClientCert:
        """A client certificate for ``common_name`` signed by the trusted CA (made on demand)."""
        if common_name not in self.clients:
            ca_cert, ca_key = self._ca
            self.clients[common_name] = _issue_client(self.directory, common_name, ca_cert, ca_key)
        return self.clients[common_name]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )


def _authority_key_id(ca_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    # RFC 5280 asks it of every certificate a CA issues; Python 3.13's default context
    # (VERIFY_X509_STRICT) refuses a chain without it, as a device on Debian 13 would.
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())


def _make_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / name, cert, key)
    return cert, key


def _issue_client(
    directory: Path, common_name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> ClientCert:
    key = _key()
    cert = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_authority_key_id(ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = directory / f"client-{common_name}-{ca_cert.serial_number % 10_000}"
    _write(stem, cert, key)
    return ClientCert(stem.with_suffix(".crt"), stem.with_suffix(".key"), common_name)


def make_pki(directory: Path, clients: tuple[str, ...] = ("device-1",)) -> Pki:
    """A CA, a server cert (127.0.0.1, localhost), client certs and a foreign CA's client cert."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(directory, "edgeship-test-ca")
    server_key = _key()
    server_cert = (
        _builder("localhost", ca_cert.subject, server_key.public_key())
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_authority_key_id(ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "server", server_cert, server_key)
    issued = {cn: _issue_client(directory, cn, ca_cert, ca_key) for cn in clients}
    foreign_ca, foreign_key = _make_ca(directory, "foreign-ca")
    foreign = _issue_client(
        directory, clients[0] if clients else "device-1", foreign_ca, foreign_key
    )
    return Pki(
        ca_file=directory / "edgeship-test-ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        clients=issued,
        foreign=foreign,
        directory=directory,
        _ca=(ca_cert, ca_key),
    )


# --- the broker --------------------------------------------------------------------------


TlsMode = str  # "none" | "tls" (server auth only) | "mtls" (client certificate required)


class Broker:
    """One mosquitto process on 127.0.0.1:``port``, restartable on the same port.

    Raises (from start): RuntimeError if mosquitto exits or does not listen in time.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: TlsMode = "none",
        pki: Pki | None = None,
        acl: str | None = None,
        extra_config: str = "",
        users: dict[str, str] | None = None,
    ) -> None:
        if tls != "none" and pki is None:
            raise ValueError("TLS needs a pki")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls = tls
        self.pki = pki
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_file = directory / "mosquitto.log"
        self.config_file = directory / "mosquitto.conf"
        self._binary = mosquitto_path()
        self._process: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if users else 'true'}",
            # The default (1000) silently drops QoS 1 messages to a slow or absent
            # persistent subscriber, which would look like loss in the outage tests.
            "max_queued_messages 1000000",
            "persistence true",
            f"persistence_location {directory}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
        ]
        if users:
            lines.append(f"password_file {_password_file(directory / 'passwords', users)}")
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto", which cannot write tmp_path.
            lines.append("user root")
        if tls != "none":
            assert pki is not None
            lines += [
                f"cafile {pki.ca_file}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
            ]
        if tls == "mtls":
            lines += ["require_certificate true", "use_identity_as_username true"]
        if acl is not None:
            self.acl_file = directory / "acl"
            self.acl_file.write_text(acl)
            lines.append(f"acl_file {self.acl_file}")
        self.config_file.write_text("\n".join(lines) + "\n" + extra_config)

    @property
    def url(self) -> BrokerUrl:
        """Where clients connect: ``mqtt://``, or ``mqtts://`` with TLS (``str()`` for the CLI)."""
        return BrokerUrl(self.host, self.port, self.tls != "none")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts TCP connections."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [self._binary, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {_START_TIMEOUT_S}s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop mosquitto: SIGTERM (saves persistence) or SIGKILL with ``kill=True``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def __repr__(self) -> str:
        return f"Broker({self.host}:{self.port}, tls={self.tls}, running={self.running})"


def _password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed with ``mosquitto_passwd``) for ``users``."""
    tool = shutil.which("mosquitto_passwd") or str(
        Path(mosquitto_path()).parent / "mosquitto_passwd"
    )
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


# --- a test subscriber -------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """A paho MQTT 5 subscriber with a persistent session, collecting what it receives.

    Its session survives broker restarts (the broker persists it), so messages the
    broker acknowledged while the subscriber was away still arrive. Use as a context
    manager, or call ``close()``.
    """

    def __init__(
        self,
        broker: Broker,
        topic_filter: str,
        *,
        client_id: str = "test-subscriber",
        cert: ClientCert | None = None,
        clean: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        self.messages: list[Received] = []
        self.granted: list[object] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        if broker.tls != "none":
            assert broker.pki is not None
            ctx = ssl.create_default_context(cafile=str(broker.pki.ca_file))
            if cert is not None:
                ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
            self.client.tls_set_context(ctx)

        def on_connect(c: paho.Client, _u: object, _f: object, rc: object, _p: object) -> None:
            c.subscribe(topic_filter, qos=1)

        def on_subscribe(
            _c: object, _u: object, _mid: int, codes: list[object], _p: object
        ) -> None:
            self.granted = list(codes)
            self._subscribed.set()

        def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3600
        self.client.connect(broker.host, broker.port, 10, clean_start=clean, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise RuntimeError(f"subscriber could not subscribe to {topic_filter}")

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.02)
        return predicate(self.snapshot())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Call with Broker keyword arguments (tls, pki, acl, extra_config); stopped at teardown."""
    made: list[Broker] = []

    def make(**kwargs: object) -> Broker:
        b = Broker(tmp_path / f"broker-{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(b)
        b.start()
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A plain-TCP, anonymous mosquitto on a free loopback port."""
    return broker_factory()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", clients=("device-1", "device-2", "collector"))
