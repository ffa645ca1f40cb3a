"""The agent's configuration file (``agent.toml``): strict parsing into frozen dataclasses.

Every key has a safe default except ``device_id``, ``state_dir`` and ``trust_policy``.
Unknown keys, wrong types and out-of-range values are errors that name the key path
(``broker.keepalive_s``), so a typo never silently falls back to a default. Relative
paths are resolved against the directory of the configuration file. Units are in the key
names. docs/agent.md ("Configuration") documents every key; examples/agent.toml is a
commented example.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.errors import ConfigError
from agent.install._config import FetchConfig, UpdateConfig
from agent.install._sched import check_priority
from agent.messages.topics import check_id
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.tls import TlsConfig
from agent.serve._cache import CacheConfig
from agent.serve._http_config import HttpServerConfig, ServerTls
from agent.serve.mqtt import MqttServingConfig
from agent.serve.runtimes import RuntimeOptions
from agent.telemetry._reporter import TelemetryConfig

T = TypeVar("T")

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "FetchConfig",
    "LoggingConfig",
    "TelemetryConfig",
    "UpdateConfig",
    "load_config",
    "parse_config",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
AttributeValue = str | int | float | bool


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``."""

    level: LogLevel = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class AgentConfig:
    """The whole ``agent.toml``."""

    device_id: str
    state_dir: Path
    trust_policy: Path
    fleet: str = "default"
    device_class: str | None = None
    # The device's X25519 private key: opens bundles encrypted for this device.
    decryption_key: Path | None = None
    # SIGTERM: how long calls in flight may take to finish before the agent exits.
    drain_timeout_s: float = 10.0
    broker: BrokerConfig | None = None  # no [broker]: offline (no desired state, no telemetry)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    http: HttpServerConfig = field(default_factory=HttpServerConfig)
    mqtt_serving: MqttServingConfig = field(default_factory=MqttServingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


# --- the strict reader -------------------------------------------------------------------


class _Table:
    """One TOML table being read: each key is taken once; leftovers are unknown keys."""

    def __init__(self, doc: object, path: str, base: Path) -> None:
        if not isinstance(doc, dict):
            raise ConfigError(f"{path or 'the file'} must be a table")
        self.doc: dict[str, Any] = dict(doc)
        self.path = path
        self.base = base

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _take(self, key: str) -> Any:
        return self.doc.pop(key, None)

    def checked(self, key: str, check: Callable[[object], T], default: T) -> T:
        """A value of more than one TOML type, validated by ``check`` (raises ValueError)."""
        value = self._take(key)
        if value is None:
            return default
        try:
            return check(value)
        except ValueError as exc:
            raise ConfigError(f"{self._key(key)} {exc}") from None

    def table(self, key: str) -> _Table | None:
        value = self._take(key)
        return None if value is None else _Table(value, self._key(key), self.base)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.opt_string(key)
        if value is None:
            if required or default is None:
                raise ConfigError(f"{self._key(key)} is required")
            return default
        return value

    def opt_string(self, key: str) -> str | None:
        value = self._take(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{self._key(key)} must be a non-empty string")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise ConfigError(f"{self._key(key)} must be one of {', '.join(choices)}")
        return value

    def path_value(self, key: str, *, required: bool = False) -> Path | None:
        value = self.opt_string(key)
        if value is None:
            if required:
                raise ConfigError(f"{self._key(key)} is required")
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def boolean(self, key: str, default: bool) -> bool:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)} must be true or false")
        return value

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._key(key)} must be an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self._key(key)} must be {bound}, not {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._key(key)} must be a number")
        if not math.isfinite(value) or (value <= 0 if positive else value < 0):
            raise ConfigError(
                f"{self._key(key)} must be {'positive' if positive else '>= 0'}, not {value}"
            )
        return float(value)

    def done(self) -> None:
        if self.doc:
            unknown = ", ".join(sorted(self._key(k) for k in self.doc))
            raise ConfigError(f"unknown key(s): {unknown}; see docs/agent.md, 'Configuration'")


def _broker(t: _Table) -> BrokerConfig:
    url = BrokerUrl.parse(t.string("url", required=True), setting="broker.url")
    tls = _tls_files(t, "broker")
    if not url.tls and tls is not None:
        raise ConfigError("broker.ca_file / cert_file / key_file need an mqtts:// url")
    username = t.opt_string("username")
    password_file = t.path_value("password_file")
    if password_file is not None and username is None:
        raise ConfigError("broker.password_file needs broker.username")
    config = BrokerConfig(
        url=url,
        protocol=t.choice("protocol", ("5", "3.1.1"), "5"),  # type: ignore[arg-type]
        tls=tls,
        username=username,
        password_file=password_file,
        connect_timeout_s=t.number("connect_timeout_s", 10.0),
        keepalive_s=t.integer("keepalive_s", 30, minimum=5, maximum=65535),
        backoff_initial_s=t.number("backoff_initial_s", 1.0),
        backoff_max_s=t.number("backoff_max_s", 60.0),
    )
    if config.backoff_max_s < config.backoff_initial_s:
        raise ConfigError("broker.backoff_max_s must be >= broker.backoff_initial_s")
    return config


def _fetch(t: _Table) -> FetchConfig:
    d = FetchConfig()
    config = FetchConfig(
        max_bundle_bytes=t.integer("max_bundle_bytes", d.max_bundle_bytes, minimum=1024),
        connect_timeout_s=t.number("connect_timeout_s", d.connect_timeout_s),
        read_timeout_s=t.number("read_timeout_s", d.read_timeout_s),
        max_resumes=t.integer("max_resumes", d.max_resumes),
        min_free_bytes=t.integer("min_free_bytes", d.min_free_bytes),
        retry_initial_s=t.number("retry_initial_s", d.retry_initial_s),
        retry_max_s=t.number("retry_max_s", d.retry_max_s),
        tls=_tls_files(t, "fetch"),
    )
    if config.retry_max_s < config.retry_initial_s:
        raise ConfigError("fetch.retry_max_s must be >= fetch.retry_initial_s")
    return config


def _tls_files(t: _Table, table: str) -> TlsConfig | None:
    """``ca_file``, ``cert_file``, ``key_file`` of a table; None when none is set."""
    files = {k: t.path_value(k) for k in ("ca_file", "cert_file", "key_file")}
    if files["key_file"] is not None and files["cert_file"] is None:
        raise ConfigError(f"{table}.key_file needs {table}.cert_file")
    if not any(files.values()):
        return None
    return TlsConfig(files["ca_file"], files["cert_file"], files["key_file"])


def _update(t: _Table) -> UpdateConfig:
    d = UpdateConfig()
    priority = t.checked("health_gate_priority", check_priority, d.health_gate_priority)
    gate = t.choice("health_gate", ("process", "thread"), d.health_gate)
    return UpdateConfig(
        max_attempts=t.integer("max_attempts", d.max_attempts, minimum=1),
        health_runs=t.integer("health_runs", d.health_runs, minimum=1),
        health_gate="process" if gate == "process" else "thread",
        health_gate_priority=priority,
        health_gate_timeout_s=t.number("health_gate_timeout_s", d.health_gate_timeout_s),
        clock_slack_s=t.number("clock_slack_s", d.clock_slack_s, positive=False),
    )


def _runtime(t: _Table) -> RuntimeOptions:
    threads = t.integer("threads", 0)
    inter = t.integer("inter_op_threads", 0)
    return RuntimeOptions(
        intra_op_threads=threads or None,
        inter_op_threads=inter or None,
        load_from_memory=t.boolean("load_from_memory", True),
        cpu_mem_arena=t.boolean("cpu_mem_arena", True),
    )


def _telemetry(t: _Table) -> TelemetryConfig:
    d = TelemetryConfig()
    return TelemetryConfig(
        interval_s=t.number("interval_s", d.interval_s),
        outbox_max_bytes=t.integer("outbox_max_bytes", d.outbox_max_bytes, minimum=64 * 1024),
        ttl_s=t.number("ttl_s", d.ttl_s or 24 * 3600.0),
        output_kind=t.choice("output_kind", ("auto", "top_score", "values"), "auto"),  # type: ignore[arg-type]
    )


def _http(t: _Table) -> HttpServerConfig:
    d = HttpServerConfig()
    token = None
    token_file = t.path_value("token_file")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"http.token_file: cannot read {token_file}: {exc.strerror}"
            ) from None
    cert, key, client_ca = (
        t.path_value(k) for k in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    )
    if cert is None and (key is not None or client_ca is not None):
        raise ConfigError("http.tls_key_file and http.tls_client_ca_file need http.tls_cert_file")
    config = HttpServerConfig(
        enabled=t.boolean("enabled", False),
        host=t.string("host", d.host),
        port=t.integer("port", d.port, maximum=65535),
        token=token,
        max_request_bytes=t.integer("max_request_bytes", d.max_request_bytes, minimum=1),
        rate_limit_per_s=t.number("rate_limit_per_s", d.rate_limit_per_s),
        burst=t.integer("burst", d.burst, minimum=1),
        max_connections=t.integer("max_connections", d.max_connections, minimum=1),
        read_timeout_s=t.number("read_timeout_s", d.read_timeout_s),
        request_deadline_s=t.number("request_deadline_s", d.request_deadline_s),
        tls=None if cert is None else ServerTls(cert, key, client_ca),
    )
    if config.enabled:
        try:
            config.check()
        except ConfigError as exc:
            raise ConfigError(f"[http]: {exc}") from None
    return config


def _mqtt_serving(t: _Table) -> MqttServingConfig:
    d = MqttServingConfig()
    return MqttServingConfig(
        enabled=t.boolean("enabled", False),
        queue_size=t.integer("queue_size", d.queue_size, minimum=1),
        workers=t.integer("workers", d.workers, minimum=1, maximum=64),
        max_request_bytes=t.integer("max_request_bytes", d.max_request_bytes, minimum=1),
        response_expiry_s=t.number("response_expiry_s", d.response_expiry_s or 60.0),
    )


def _cache(t: _Table) -> CacheConfig:
    d = CacheConfig()
    return CacheConfig(
        enabled=t.boolean("enabled", False),
        max_entries=t.integer("max_entries", d.max_entries, minimum=1),
        max_bytes=t.integer("max_bytes", d.max_bytes, minimum=1),
    )


def _logging(t: _Table) -> LoggingConfig:
    return LoggingConfig(
        level=t.choice("level", LOG_LEVELS, "info"),  # type: ignore[arg-type]
        format=t.choice("format", ("json", "text"), "json"),  # type: ignore[arg-type]
    )


def _attributes(t: _Table) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for key in sorted(t.doc):
        value = t.doc.pop(key)
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"attributes.{key} must be a string, number or boolean")
        out[key] = value
    return out


def _section(root: _Table, key: str) -> _Table:
    return root.table(key) or _Table({}, key, root.base)


def parse_config(data: bytes | str, *, base_dir: Path = Path()) -> AgentConfig:
    """Parse ``agent.toml`` content; relative paths are taken from ``base_dir``.

    Raises:
        ConfigError: not TOML, an unknown key, a missing required key, a wrong type or an
            out-of-range value; the message names the key path.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    root = _Table(doc, "", base_dir)
    device_id = root.string("device_id", required=True)
    fleet = root.string("fleet", "default")
    try:
        check_id("device", device_id)
        check_id("fleet", fleet)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    state_dir = root.path_value("state_dir", required=True)
    trust_policy = root.path_value("trust_policy", required=True)
    assert state_dir is not None  # required above
    assert trust_policy is not None
    device_class = root.opt_string("device_class")
    decryption_key = root.path_value("decryption_key")
    drain = root.number("drain_timeout_s", 10.0)
    broker_table = root.table("broker")
    sections = {
        name: _section(root, name)
        for name in (
            "fetch",
            "update",
            "runtime",
            "telemetry",
            "http",
            "mqtt_serving",
            "cache",
            "logging",
            "attributes",
        )
    }
    root.done()
    broker = None if broker_table is None else _broker(broker_table)
    serving = _mqtt_serving(sections["mqtt_serving"])
    if serving.enabled and broker is None:
        raise ConfigError("mqtt_serving.enabled needs a [broker]")
    config = AgentConfig(
        device_id=device_id,
        fleet=fleet,
        state_dir=state_dir,
        trust_policy=trust_policy,
        device_class=device_class,
        decryption_key=decryption_key,
        drain_timeout_s=drain,
        broker=broker,
        fetch=_fetch(sections["fetch"]),
        update=_update(sections["update"]),
        runtime=_runtime(sections["runtime"]),
        telemetry=_telemetry(sections["telemetry"]),
        http=_http(sections["http"]),
        mqtt_serving=serving,
        cache=_cache(sections["cache"]),
        logging=_logging(sections["logging"]),
        attributes=_attributes(sections["attributes"]),
    )
    for t in [*sections.values(), *([] if broker_table is None else [broker_table])]:
        t.done()
    return config


def load_config(path: Path) -> AgentConfig:
    """Read and parse a configuration file.

    Raises:
        ConfigError: the file cannot be read, or as :func:`parse_config` (prefixed with
            the file name).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the agent configuration {path}: {exc.strerror}") from None
    try:
        return parse_config(data, base_dir=Path(path).resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
