"""The one broker-URL rule and the one credential rule, for agent and fleet side."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.tls import TlsConfig

GOOD = [
    ("mqtt://broker", BrokerUrl("broker", 1883, tls=False)),
    ("mqtts://broker.example.com", BrokerUrl("broker.example.com", 8883, tls=True)),
    ("mqtt://10.0.0.5:1999", BrokerUrl("10.0.0.5", 1999, tls=False)),
    ("mqtts://[::1]:8884/", BrokerUrl("::1", 8884, tls=True)),
    ("MQTT://Broker:1883", BrokerUrl("broker", 1883, tls=False)),
]


@pytest.mark.parametrize(("url", "parsed"), GOOD, ids=[g[0] for g in GOOD])
def test_good_urls_parse_with_the_default_ports(url: str, parsed: BrokerUrl) -> None:
    assert BrokerUrl.parse(url) == parsed


def test_a_parsed_url_prints_back_as_a_url() -> None:
    assert str(BrokerUrl.parse("mqtts://[::1]")) == "mqtts://[::1]:8883"
    assert str(BrokerUrl.parse("mqtt://b")) == "mqtt://b:1883"


BAD = [
    "http://broker",
    "broker:1883",
    "mqtt://",
    "mqtt://broker:0",
    "mqtt://broker:99999",
    "mqtt://broker:port",
    "mqtt://broker/edgeship",
    "mqtt://broker?tls=1",
    "mqtt://broker#x",
    "mqtt://[::1",
]


@pytest.mark.parametrize("url", BAD)
def test_anything_else_is_refused_naming_the_setting_and_the_form(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^--broker .* must be mqtt://HOST\[:PORT\]"):
        BrokerUrl.parse(url, setting="--broker")


@pytest.mark.parametrize(
    "url", ["mqtt://alice:s3cr3t@broker", "mqtts://alice@broker:8883", "mqtt://:s3cr3t@broker"]
)
def test_credentials_in_a_url_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerUrl.parse(url, setting="broker.url")
    message = str(caught.value)
    assert "s3cr3t" not in message
    assert "alice" not in message
    assert "--username" in message
    assert "--password-file" in message
    assert "broker.password_file" in message


def test_the_password_comes_from_its_file_without_surrounding_white_space(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("  s3cr3t\n")
    config = BrokerConfig(BrokerUrl.parse("mqtt://b"), username="u", password_file=tmp_path / "pw")
    assert config.password() == "s3cr3t"
    assert BrokerConfig(BrokerUrl.parse("mqtt://b")).password() is None


def test_an_unreadable_password_file_is_a_config_error_naming_both_settings(
    tmp_path: Path,
) -> None:
    config = BrokerConfig(BrokerUrl.parse("mqtt://b"), username="u", password_file=tmp_path / "no")
    with pytest.raises(ConfigError, match=r"broker\.password_file.*--password-file"):
        config.password()


def test_tls_is_used_exactly_for_mqtts(tmp_path: Path) -> None:
    assert BrokerConfig(BrokerUrl.parse("mqtt://b")).ssl_context() is None
    assert BrokerConfig(BrokerUrl.parse("mqtts://b")).ssl_context() is not None
    missing = TlsConfig(ca_file=tmp_path / "missing-ca.crt")
    with pytest.raises(ConfigError, match="broker TLS files are unusable"):
        BrokerConfig(BrokerUrl.parse("mqtts://b"), tls=missing).ssl_context()
