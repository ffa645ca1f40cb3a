"""agent.toml parsing: a table of good and bad files, each bad one naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config, parse_config
from agent.errors import ConfigError
from agent.install._fetch import UrlFetcher

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = 'device_id = "d1"\nstate_dir = "state"\ntrust_policy = "trust.toml"\n'


def _parse(extra: str = "", base: Path = Path("/etc/edgeship")) -> AgentConfig:
    return parse_config(MINIMAL + extra, base_dir=base)


def test_minimal_config_has_safe_defaults() -> None:
    c = _parse()
    assert (c.device_id, c.fleet) == ("d1", "default")
    assert c.state_dir == Path("/etc/edgeship/state")
    assert c.trust_policy == Path("/etc/edgeship/trust.toml")
    assert c.broker is None
    assert c.http.enabled is False
    assert c.mqtt_serving.enabled is False
    assert c.cache.enabled is False
    assert (c.logging.level, c.logging.format) == ("info", "json")
    assert c.attributes == {}


def test_the_shipped_example_parses(tmp_path: Path) -> None:
    c = load_config(ROOT / "examples" / "agent.toml")
    assert c.broker is not None
    assert (c.broker.url.host, c.broker.url.port, c.broker.url.tls) == (
        "broker.example.com",
        8883,
        True,
    )
    assert c.broker.tls is not None
    assert c.broker.tls.cert_file == Path("/etc/edgeship/device.crt")
    assert c.attributes == {"hardware": "rpi4", "site": "warehouse-3"}


GOOD: list[tuple[str, str, object]] = [
    ('[broker]\nurl = "mqtt://10.0.0.5"', "broker.url.port", 1883),
    ('[broker]\nurl = "mqtts://b.example"', "broker.url.port", 8883),
    ('[broker]\nurl = "mqtt://b:1999"\nprotocol = "3.1.1"', "broker.protocol", "3.1.1"),
    ('[broker]\nurl = "mqtt://b"\nkeepalive_s = 60', "broker.keepalive_s", 60),
    ("[runtime]\nthreads = 2", "runtime.threads", 2),
    ("[runtime]\nthreads = 0", "runtime.threads", None),
    ('[update]\nhealth_gate_priority = "normal"', "update.health_gate_priority", "normal"),
    ("[update]\nhealth_gate_priority = 10", "update.health_gate_priority", 10),
    ("[update]", "update.health_gate_priority", "idle"),
    ('[update]\nhealth_gate = "thread"', "update.health_gate", "thread"),
    ("[update]", "update.health_gate", "process"),
    ("[update]\nhealth_gate_timeout_s = 60", "update.health_gate_timeout_s", 60.0),
    ("[telemetry]\ninterval_s = 2", "telemetry.interval_s", 2.0),
    ("[fetch]\nmax_bundle_bytes = 4096", "fetch.max_bundle_bytes", 4096),
    ("[http]\nenabled = true\nport = 0", "http.port", 0),
    (
        '[broker]\nurl = "mqtt://b"\n[mqtt_serving]\nenabled = true\nqueue_size = 8',
        "mqtt_serving.queue_size",
        8,
    ),
    ("[cache]\nenabled = true\nmax_entries = 5", "cache.max_entries", 5),
    ('[logging]\nlevel = "debug"\nformat = "text"', "logging.format", "text"),
    ('[attributes]\nsite = "x"\nfloors = 3', "attributes", {"floors": 3, "site": "x"}),
    ('device_class = "rpi4"', "device_class", "rpi4"),
]


@pytest.mark.parametrize(("extra", "attr", "expected"), GOOD, ids=[g[1] for g in GOOD])
def test_good_config_value(extra: str, attr: str, expected: object) -> None:
    value: object = _parse(extra)
    for part in attr.split("."):
        value = getattr(value, part)
    assert value == expected


BAD: list[tuple[str, str]] = [
    ("colour = 1", "colour"),
    ("[broker]\nurl = 'mqtt://b'\nkeep_alive = 3", "broker.keep_alive"),
    ("[http]\nprot = 1", "http.prot"),
    ("[telemetry]\ninterval_s = 0", "telemetry.interval_s"),
    ("[telemetry]\ninterval_s = 'fast'", "telemetry.interval_s"),
    ("[runtime]\nthreads = -1", "runtime.threads"),
    ("[runtime]\nthreads = true", "runtime.threads"),
    ("[broker]\nurl = 'http://b'", "broker.url"),
    ("[broker]\nurl = 'mqtt://user:pw@b'", "broker.url"),
    ("[broker]\nurl = 'mqtt://b:99999'", "broker.url"),
    ("[broker]\nport = 1", "broker.url"),
    ("[broker]\nurl = 'mqtt://b'\nprotocol = '4'", "broker.protocol"),
    ("[broker]\nurl = 'mqtt://b'\nca_file = 'ca.crt'", "mqtts"),
    ("[broker]\nurl = 'mqtts://b'\nkey_file = 'k'", "broker.key_file"),
    ("[broker]\nurl = 'mqtt://b'\npassword_file = 'p'", "broker.password_file"),
    ("[broker]\nurl = 'mqtt://b'\nkeepalive_s = 1", "broker.keepalive_s"),
    ("[http]\nenabled = true\nhost = '0.0.0.0'", "token"),
    ("[mqtt_serving]\nenabled = true", "mqtt_serving.enabled needs a [broker]"),
    ("[cache]\nenabled = 'yes'", "cache.enabled"),
    ("[logging]\nlevel = 'verbose'", "logging.level"),
    ("[attributes]\nnested = {a = 1}", "attributes.nested"),
    ("broker = 3", "broker must be a table"),
    ("[update]\nhealth_gate_priority = 25", "update.health_gate_priority"),
    ("[update]\nhealth_gate_priority = 0", "update.health_gate_priority"),
    ('[update]\nhealth_gate_priority = "low"', "update.health_gate_priority"),
    ("[update]\nhealth_gate_priority = true", "update.health_gate_priority"),
    ('[update]\nhealth_gate = "fork"', "update.health_gate"),
    ("[update]\nhealth_gate_nice = 10", "update.health_gate_nice"),
    ("[fetch]\nretry_initial_s = 10\nretry_max_s = 5", "fetch.retry_max_s"),
]


@pytest.mark.parametrize(("extra", "names"), BAD, ids=[b[1] for b in BAD])
def test_bad_config_is_refused_naming_the_key(extra: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        _parse(extra)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('state_dir = "s"\ntrust_policy = "t"', "device_id is required"),
        ('device_id = "d"\ntrust_policy = "t"', "state_dir is required"),
        ('device_id = "d"\nstate_dir = "s"', "trust_policy is required"),
        ('device_id = "a/b"\nstate_dir = "s"\ntrust_policy = "t"', "device id"),
        ('device_id = "d"\nfleet = "+"\nstate_dir = "s"\ntrust_policy = "t"', "fleet id"),
        ("device_id = ", "not valid TOML"),
    ],
)
def test_required_keys_and_ids_are_checked(text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        parse_config(text)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + "typo = 1\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: unknown key\(s\): typo"):
        load_config(path)


def test_relative_paths_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    assert load_config(path).state_dir == tmp_path / "state"


def test_a_home_directory_of_no_such_user_is_a_config_error() -> None:
    # Path.expanduser raises RuntimeError for ~user of an unknown user (found by fuzzing).
    text = MINIMAL.replace('"state"', '"~no-such-user-edgeship/state"')
    with pytest.raises(ConfigError, match=r"state_dir: cannot expand '~no-such-user-edgeship'"):
        parse_config(text, base_dir=Path("/x"))


def test_several_models_get_their_own_state_runtime_and_cache(tmp_path: Path) -> None:
    config = parse_config(
        MINIMAL
        + "[runtime]\nthreads = 2\n[models.detector]\n[models.classifier]\n"
        + 'output_kind = "top_score"\n[models.classifier.runtime]\nthreads = 1\n'
        + "[models.classifier.cache]\nenabled = true\n[models.default]\n",
        base_dir=tmp_path,
    )
    models = {m.name: m for m in config.model_configs()}
    assert list(models) == ["detector", "classifier", "default"]
    assert models["detector"].state_dir == tmp_path / "state" / "models" / "detector"
    assert models["default"].state_dir == tmp_path / "state"
    assert (models["detector"].runtime.threads, models["classifier"].runtime.threads) == (2, 1)
    assert (models["detector"].cache.enabled, models["classifier"].cache.enabled) == (False, True)
    assert models["classifier"].output_kind == "top_score"


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ("[models.Camera]\n", "must match"),
        ("[models.a]\ntypo = 1\n", "unknown key"),
        ("[models.a.runtime]\nthreads = -1\n", "threads"),
        ("[models]\n", "between 1 and 16"),
        ("".join(f"[models.m{i}]\n" for i in range(17)), "between 1 and 16"),
    ],
)
def test_model_tables_out_of_their_rules_are_refused(tables: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL + tables, base_dir=Path("/x"))


def test_without_model_tables_the_one_model_is_default_in_the_state_dir() -> None:
    (model,) = parse_config(MINIMAL, base_dir=Path("/x")).model_configs()
    assert (model.name, model.state_dir) == ("default", Path("/x/state"))


def test_http_token_is_read_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token-0123456789\n")
    c = _parse("[http]\nenabled = true\nhost = '0.0.0.0'\ntoken_file = 'token'\n", tmp_path)
    assert c.http.token == "s3cret-token-0123456789"


def test_missing_password_file_is_a_config_error(tmp_path: Path) -> None:
    c = _parse("[broker]\nurl = 'mqtt://b'\nusername = 'u'\npassword_file = 'nope'\n", tmp_path)
    assert c.broker is not None
    with pytest.raises(ConfigError, match="password_file"):
        c.broker.password()


def test_fetch_tls_files_are_resolved_and_checked() -> None:
    c = _parse('[fetch]\nca_file = "pki/ca.crt"\ncert_file = "d.crt"\nkey_file = "d.key"\n')
    assert c.fetch.tls is not None
    assert c.fetch.tls.ca_file == Path("/etc/edgeship/pki/ca.crt")
    assert (c.fetch.tls.cert_file, c.fetch.tls.key_file) == (
        Path("/etc/edgeship/d.crt"),
        Path("/etc/edgeship/d.key"),
    )
    assert _parse().fetch.tls is None
    with pytest.raises(ConfigError, match=r"fetch\.key_file needs fetch\.cert_file"):
        _parse('[fetch]\nkey_file = "d.key"\n')


def test_unusable_fetch_tls_files_are_a_config_error(tmp_path: Path) -> None:
    c = _parse('[fetch]\nca_file = "missing.crt"\n', base=tmp_path)
    with pytest.raises(ConfigError, match="fetch TLS files are unusable"):
        UrlFetcher.from_tls(c.fetch.tls, setting="fetch")
    (tmp_path / "missing.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="fetch TLS files are unusable"):
        UrlFetcher.from_tls(c.fetch.tls, setting="fetch")


def test_http_tls_files() -> None:
    c = _parse(
        '[http]\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\ntls_client_ca_file = "ca.pem"\n'
    )
    assert c.http.tls is not None
    assert (c.http.tls.cert_file, c.http.tls.key_file, c.http.tls.client_ca_file) == (
        Path("/etc/edgeship/c.pem"),
        Path("/etc/edgeship/k.pem"),
        Path("/etc/edgeship/ca.pem"),
    )
    assert _parse().http.tls is None
    with pytest.raises(ConfigError, match=r"need http\.tls_cert_file"):
        _parse('[http]\ntls_key_file = "k.pem"\n')
    # Client certificates stand in for the token beyond loopback.
    text = '[http]\nenabled = true\nhost = "0.0.0.0"\ntls_cert_file = "c.pem"\n'
    with pytest.raises(ConfigError, match="without a token"):
        _parse(text)
    assert _parse(text + 'tls_client_ca_file = "ca.pem"\n').http.host == "0.0.0.0"
