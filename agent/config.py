"""The agent's configuration file (``agent.toml``): strict parsing into frozen dataclasses.

Every key has a safe default except ``device_id``, ``state_dir`` and ``trust_policy``.
Unknown keys, wrong types and out-of-range values are errors that name the key path
(``broker.keepalive_s``), so a typo never silently falls back to a default. Relative
paths are resolved against the directory of the configuration file. Units are in the key
names. docs/agent.md ("Configuration") documents every key; examples/agent.toml is a
commented example.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar, Union

from agent.errors import ConfigError
from agent.install._config import FetchConfig, TrustConfig, UpdateConfig
from agent.messages.desired import DEFAULT_MODEL, MODEL_RE
from agent.messages.topics import TRUST_LEVEL, check_id
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.sched import check_priority
from agent.plumbing.strict import MISSING, Doc
from agent.plumbing.tls import TlsConfig
from agent.serve._cache import CacheConfig
from agent.serve._http_config import HttpServerConfig, ServerTls
from agent.serve.mqtt import MqttServingConfig
from agent.serve.runtimes import RuntimeOptions
from agent.telemetry._observe import OutputKind
from agent.telemetry._reporter import TelemetryConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, a dependency on these Pythons only
    import tomli as tomllib

T = TypeVar("T")

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "FetchConfig",
    "LoggingConfig",
    "ModelConfig",
    "TelemetryConfig",
    "TrustConfig",
    "UpdateConfig",
    "load_config",
    "parse_config",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
AttributeValue = Union[str, int, float, bool]


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``."""

    level: LogLevel = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class ModelConfig:
    """``[models.NAME]``: a model with its own state (``<state_dir>/models/NAME``; ``default``
    keeps ``<state_dir>``), runtime options and cache (else ``[runtime]``, ``[cache]``)."""

    name: str
    state_dir: Path
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output_kind: OutputKind = "auto"


MAX_MODELS = 16
_KINDS = ("auto", "top_score", "values")


@dataclass(frozen=True)
class AgentConfig:
    """The whole ``agent.toml``."""

    device_id: str
    state_dir: Path
    # The bootstrap trust: a signed trust root (JSON), or a bare trust policy (TOML) that
    # stands for root 0; newer roots arrive over the air (docs/keys.md).
    trust_policy: Path
    fleet: str = "default"
    device_class: str | None = None
    # The device's X25519 private key: opens bundles encrypted for this device.
    decryption_key: Path | None = None
    # SIGTERM: how long calls in flight may take to finish before the agent exits.
    drain_timeout_s: float = 10.0
    broker: BrokerConfig | None = None  # no [broker]: offline (no desired state, no telemetry)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    http: HttpServerConfig = field(default_factory=HttpServerConfig)
    mqtt_serving: MqttServingConfig = field(default_factory=MqttServingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()  # empty: one model, "default"

    def model_configs(self) -> tuple[ModelConfig, ...]:
        """The models served: the ``[models.NAME]`` tables, or one model named ``default``."""
        if self.models:
            return self.models
        kind = self.telemetry.output_kind
        return (ModelConfig(DEFAULT_MODEL, self.state_dir, self.runtime, self.cache, kind),)


# --- the strict reader -------------------------------------------------------------------


_HINT = "see docs/agent.md, 'Configuration'"
_PROVIDER = re.compile(r"[A-Za-z][A-Za-z0-9]*ExecutionProvider")
_NON_EMPTY = re.compile(r".+", re.DOTALL)

_error = ConfigError


def _table(root: Doc, key: str) -> Doc:
    """A section; an absent one reads as empty (every key at its default)."""
    return root.obj(key) if root.has(key) else Doc({}, key, error=_error, kind="a table")


def _text(t: Doc, key: str, default: str = MISSING) -> str:
    return t.text(key, default, pattern=_NON_EMPTY, what="a non-empty string")


def _opt_text(t: Doc, key: str) -> str | None:
    return t.opt(t.text, key, pattern=_NON_EMPTY, what="a non-empty string")


def _path(t: Doc, key: str, base: Path) -> Path | None:
    """A path setting; a relative one is taken from the configuration file's directory."""
    value = _opt_text(t, key)
    if value is None:
        return None
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of a user this system does not have
        raise ConfigError(f"{t.path(key)}: cannot expand {value.split('/')[0]!r}") from None
    return path if path.is_absolute() else base / path


def _required_path(t: Doc, key: str, base: Path) -> Path:
    _text(t, key)  # says "is required" when absent
    path = _path(t, key, base)
    assert path is not None  # checked just above
    return path


def _checked(t: Doc, key: str, check: Callable[[object], T], default: T) -> T:
    """A value of more than one TOML type, validated by ``check`` (raises ValueError)."""
    value = t.raw(key, None)
    if value is None:
        return default
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(f"{t.path(key)} {exc}") from None


def _broker(t: Doc, base: Path) -> BrokerConfig:
    url = BrokerUrl.parse(t.text("url"), setting="broker.url")
    tls = _tls_files(t, "broker", base)
    if not url.tls and tls is not None:
        raise ConfigError("broker.ca_file / cert_file / key_file need an mqtts:// url")
    username = _opt_text(t, "username")
    password_file = _path(t, "password_file", base)
    if password_file is not None and username is None:
        raise ConfigError("broker.password_file needs broker.username")
    d = BrokerConfig(url)
    config = BrokerConfig(
        url=url,
        protocol=t.choice("protocol", ("5", "3.1.1"), d.protocol),  # type: ignore[arg-type]
        tls=tls,
        username=username,
        password_file=password_file,
        connect_timeout_s=t.number("connect_timeout_s", d.connect_timeout_s, positive=True),
        keepalive_s=t.integer("keepalive_s", d.keepalive_s, minimum=5, maximum=65535),
        backoff_initial_s=t.number("backoff_initial_s", d.backoff_initial_s, positive=True),
        backoff_max_s=t.number("backoff_max_s", d.backoff_max_s, positive=True),
    )
    if config.backoff_max_s < config.backoff_initial_s:
        raise ConfigError("broker.backoff_max_s must be >= broker.backoff_initial_s")
    return config


def _fetch(t: Doc, base: Path) -> FetchConfig:
    d = FetchConfig()
    config = FetchConfig(
        max_bundle_bytes=t.integer("max_bundle_bytes", d.max_bundle_bytes, minimum=1024),
        connect_timeout_s=t.number("connect_timeout_s", d.connect_timeout_s, positive=True),
        read_timeout_s=t.number("read_timeout_s", d.read_timeout_s, positive=True),
        max_resumes=t.integer("max_resumes", d.max_resumes, minimum=0),
        min_free_bytes=t.integer("min_free_bytes", d.min_free_bytes, minimum=0),
        retry_initial_s=t.number("retry_initial_s", d.retry_initial_s, positive=True),
        retry_max_s=t.number("retry_max_s", d.retry_max_s, positive=True),
        tls=_tls_files(t, "fetch", base),
    )
    if config.retry_max_s < config.retry_initial_s:
        raise ConfigError("fetch.retry_max_s must be >= fetch.retry_initial_s")
    return config


def _trust(t: Doc) -> TrustConfig:
    d = TrustConfig()
    url = _opt_text(t, "server_url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError("trust.server_url must be an http:// or https:// URL")
    config = TrustConfig(
        server_url=url,
        retry_initial_s=t.number("retry_initial_s", d.retry_initial_s, positive=True),
        retry_max_s=t.number("retry_max_s", d.retry_max_s, positive=True),
    )
    if config.retry_max_s < config.retry_initial_s:
        raise ConfigError("trust.retry_max_s must be >= trust.retry_initial_s")
    return config


def _tls_files(t: Doc, table: str, base: Path) -> TlsConfig | None:
    """``ca_file``, ``cert_file``, ``key_file`` of a table; None when none is set."""
    files = {k: _path(t, k, base) for k in ("ca_file", "cert_file", "key_file")}
    if files["key_file"] is not None and files["cert_file"] is None:
        raise ConfigError(f"{table}.key_file needs {table}.cert_file")
    if not any(files.values()):
        return None
    return TlsConfig(files["ca_file"], files["cert_file"], files["key_file"])


def _update(t: Doc) -> UpdateConfig:
    d = UpdateConfig()
    priority = _checked(t, "health_gate_priority", check_priority, d.health_gate_priority)
    gate = t.choice("health_gate", ("process", "thread"), d.health_gate)
    return UpdateConfig(
        max_attempts=t.integer("max_attempts", d.max_attempts, minimum=1),
        health_runs=t.integer("health_runs", d.health_runs, minimum=1),
        health_gate="process" if gate == "process" else "thread",
        health_gate_priority=priority,
        health_gate_timeout_s=t.number(
            "health_gate_timeout_s", d.health_gate_timeout_s, positive=True
        ),
        clock_slack_s=t.number("clock_slack_s", d.clock_slack_s, minimum=0.0),
    )


def _runtime(t: Doc) -> RuntimeOptions:
    threads = t.integer("threads", 0, minimum=0)
    inter = t.integer("inter_op_threads", 0, minimum=0)
    providers = t.texts("providers") if t.has("providers") else ()
    delegates = t.texts("delegates") if t.has("delegates") else ()
    for name in providers:
        if not _PROVIDER.fullmatch(name):
            raise ConfigError(
                f"runtime.providers: {name!r} is not an onnxruntime execution provider name"
                " (such as OpenVINOExecutionProvider or CPUExecutionProvider)"
            )
    for name in delegates:
        if name not in ("xnnpack", "cpu") and not name.startswith("/"):
            raise ConfigError(
                f"runtime.delegates: {name!r} is not xnnpack, cpu or the absolute path of a"
                " delegate library"
            )
    return RuntimeOptions(
        threads=threads or None,
        inter_op_threads=inter or None,
        load_from_memory=t.boolean("load_from_memory", True),
        cpu_mem_arena=t.boolean("cpu_mem_arena", True),
        providers=providers,
        delegates=delegates,
        provider_options=_provider_options(t, {*providers, *delegates}),
    )


def _provider_options(t: Doc, named: set[str]) -> dict[str, dict[str, str]]:
    """``[runtime.provider_options.<name>]``: options of a provider named above, as text."""
    if not t.has("provider_options"):
        return {}
    tables = t.any_obj("provider_options")
    out: dict[str, dict[str, str]] = {}
    for name, table in sorted(tables.items()):
        where = f"runtime.provider_options.{name}"
        if name not in named:
            raise ConfigError(f"{where}: {name} is not in runtime.providers or runtime.delegates")
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        out[name] = {}
        for key, value in sorted(table.items()):
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"{where}.{key} must be a string, number or boolean")
            out[name][key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def _telemetry(t: Doc) -> TelemetryConfig:
    d = TelemetryConfig()
    return TelemetryConfig(
        interval_s=t.number("interval_s", d.interval_s, positive=True),
        outbox_max_bytes=t.integer("outbox_max_bytes", d.outbox_max_bytes, minimum=64 * 1024),
        ttl_s=t.number("ttl_s", d.ttl_s or 24 * 3600.0, positive=True),
        output_kind=t.choice("output_kind", _KINDS, d.output_kind),  # type: ignore[arg-type]
    )


def _http(t: Doc, base: Path) -> HttpServerConfig:
    d = HttpServerConfig()
    token = None
    token_file = _path(t, "token_file", base)
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"http.token_file: cannot read {token_file}: {exc.strerror}"
            ) from None
    cert, key, client_ca = (
        _path(t, k, base) for k in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    )
    if cert is None and (key is not None or client_ca is not None):
        raise ConfigError("http.tls_key_file and http.tls_client_ca_file need http.tls_cert_file")
    config = HttpServerConfig(
        enabled=t.boolean("enabled", d.enabled),
        host=_text(t, "host", d.host),
        port=t.integer("port", d.port, minimum=0, maximum=65535),
        token=token,
        max_request_bytes=t.integer("max_request_bytes", d.max_request_bytes, minimum=1),
        rate_limit_per_s=t.number("rate_limit_per_s", d.rate_limit_per_s, positive=True),
        burst=t.integer("burst", d.burst, minimum=1),
        max_connections=t.integer("max_connections", d.max_connections, minimum=1),
        max_connections_per_client=t.integer(
            "max_connections_per_client", d.max_connections_per_client, minimum=1
        ),
        read_timeout_s=t.number("read_timeout_s", d.read_timeout_s, positive=True),
        request_deadline_s=t.number("request_deadline_s", d.request_deadline_s, positive=True),
        tls=None if cert is None else ServerTls(cert, key, client_ca),
        metrics=t.boolean("metrics", d.metrics),
    )
    if config.enabled:
        try:
            config.check()
        except ConfigError as exc:
            raise ConfigError(f"[http]: {exc}") from None
    return config


def _mqtt_serving(t: Doc) -> MqttServingConfig:
    d = MqttServingConfig()
    return MqttServingConfig(
        enabled=t.boolean("enabled", d.enabled),
        queue_size=t.integer("queue_size", d.queue_size, minimum=1),
        workers=t.integer("workers", d.workers, minimum=1, maximum=64),
        max_request_bytes=t.integer("max_request_bytes", d.max_request_bytes, minimum=1),
        response_expiry_s=t.number("response_expiry_s", d.response_expiry_s or 60.0, positive=True),
    )


def _cache(t: Doc) -> CacheConfig:
    d = CacheConfig()
    return CacheConfig(
        enabled=t.boolean("enabled", d.enabled),
        max_entries=t.integer("max_entries", d.max_entries, minimum=1),
        max_bytes=t.integer("max_bytes", d.max_bytes, minimum=1),
    )


def _models(root: Doc, config: AgentConfig) -> tuple[ModelConfig, ...]:
    """``[models.NAME]`` tables: optional ``output_kind``, ``[...runtime]``, ``[...cache]``."""
    if not root.has("models"):
        return ()
    tables = root.obj("models")
    if not 0 < len(tables.value) <= MAX_MODELS:
        raise ConfigError(f"[models] must name between 1 and {MAX_MODELS} models")
    out = []
    for name in tables.value:
        if not MODEL_RE.fullmatch(name):
            raise ConfigError(f"models.{name}: a model name must match {MODEL_RE.pattern}")
        t = tables.obj(name)
        sub = {k: t.obj(k) for k in ("runtime", "cache") if t.has(k)}
        kind = t.choice(
            "output_kind", ("auto", "top_score", "values"), config.telemetry.output_kind
        )
        out.append(
            ModelConfig(
                name,
                config.state_dir / "models" / name if name != DEFAULT_MODEL else config.state_dir,
                _runtime(sub["runtime"]) if "runtime" in sub else config.runtime,
                _cache(sub["cache"]) if "cache" in sub else config.cache,
                kind,  # type: ignore[arg-type]
            )
        )
        for table in (*sub.values(), t):
            table.done(_HINT)
    return tuple(out)


def _logging(t: Doc) -> LoggingConfig:
    d = LoggingConfig()
    return LoggingConfig(
        level=t.choice("level", LOG_LEVELS, d.level),  # type: ignore[arg-type]
        format=t.choice("format", ("json", "text"), d.format),  # type: ignore[arg-type]
    )


def _attributes(t: Doc) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for key in sorted(t.value):
        value = t.raw(key)
        if not isinstance(value, (str, int, float, bool)):
            raise t.bad(key, "a string, number or boolean")
        out[key] = value
    return out


_SECTIONS: tuple[str, ...] = ("fetch", "trust", "update", "runtime", "telemetry", "http")
_SECTIONS += ("mqtt_serving", "cache", "logging")


def parse_config(data: bytes | str, *, base_dir: Path = Path()) -> AgentConfig:
    """Parse ``agent.toml`` content; relative paths are taken from ``base_dir``.

    Raises:
        ConfigError: not TOML, an unknown key, a missing required key, a wrong type or an
            out-of-range value; the message names the key path.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        root = Doc(tomllib.loads(text), "", error=_error, kind="a table")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    device_id = _text(root, "device_id")
    fleet = _text(root, "fleet", "default")
    try:
        check_id("device", device_id)
        check_id("fleet", fleet)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if device_id == TRUST_LEVEL:
        raise ConfigError(
            f"device_id {TRUST_LEVEL!r} is reserved: it names the fleet's trust topics"
        )
    t = {name: _table(root, name) for name in (*_SECTIONS, "attributes")}
    broker_table = root.obj("broker") if root.has("broker") else None
    config = AgentConfig(
        device_id=device_id,
        fleet=fleet,
        state_dir=_required_path(root, "state_dir", base_dir),
        trust_policy=_required_path(root, "trust_policy", base_dir),
        device_class=_opt_text(root, "device_class"),
        decryption_key=_path(root, "decryption_key", base_dir),
        drain_timeout_s=root.number("drain_timeout_s", 10.0, positive=True),
        broker=None if broker_table is None else _broker(broker_table, base_dir),
        fetch=_fetch(t["fetch"], base_dir),
        trust=_trust(t["trust"]),
        update=_update(t["update"]),
        runtime=_runtime(t["runtime"]),
        telemetry=_telemetry(t["telemetry"]),
        http=_http(t["http"], base_dir),
        mqtt_serving=_mqtt_serving(t["mqtt_serving"]),
        cache=_cache(t["cache"]),
        logging=_logging(t["logging"]),
        attributes=_attributes(t["attributes"]),
    )
    config = replace(config, models=_models(root, config))
    for table in [root, *t.values(), *([] if broker_table is None else [broker_table])]:
        table.done(_HINT)
    if config.mqtt_serving.enabled and config.broker is None:
        raise ConfigError("mqtt_serving.enabled needs a [broker]")
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
