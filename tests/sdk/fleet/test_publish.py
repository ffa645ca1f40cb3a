"""Publishing desired state: the payload, device groups, and the command on a real broker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.bundle.manifest import PAYLOAD_TYPE
from agent.errors import ConfigError, ManifestMismatchError, UntrustedSignerError
from sdk.build.keys import sign_envelope
from sdk.cli import main
from sdk.fleet.groups import load_groups, parse_where, select_devices
from sdk.fleet.publish import bundle_ref, desired_payload
from tests.support.broker import Broker, Subscriber
from tests.support.bundles import NOW, BundleParts, make_key, make_manifest, make_policy
from tests.support.fake_device import start_devices

URL = "http://127.0.0.1:8000/digits-1.1.0.edgeship"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "digits-1.1.0.edgeship"
    path.write_bytes(BundleParts(manifest=make_manifest(sequence=7)).to_bytes())
    return path


def test_bundle_ref_has_the_file_hash_and_the_signed_manifest_digest(bundle: Path) -> None:
    parts = BundleParts(manifest=make_manifest(sequence=7))
    ref = bundle_ref(bundle, URL)
    assert ref.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert ref.digest == hashlib.sha256(parts.manifest_member()).hexdigest()
    assert ref.sequence == 7


def test_with_a_trust_policy_the_digest_is_the_verified_one(bundle: Path) -> None:
    ref = bundle_ref(bundle, URL, policy=make_policy(make_key()), now=NOW)
    assert ref.digest == bundle_ref(bundle, URL).digest


def test_a_bundle_signed_by_an_untrusted_key_is_refused_with_a_policy(bundle: Path) -> None:
    with pytest.raises(UntrustedSignerError):
        bundle_ref(bundle, URL, policy=make_policy(make_key("other")), now=NOW)


def test_a_signature_over_another_manifest_is_refused(tmp_path: Path) -> None:
    other = make_manifest(sequence=99).to_bytes()
    envelope = sign_envelope(PAYLOAD_TYPE, other, [make_key()]).to_bytes()
    path = tmp_path / "b.edgeship"
    path.write_bytes(BundleParts(envelope_bytes=envelope).to_bytes())
    with pytest.raises(ManifestMismatchError, match="signed"):
        bundle_ref(path, URL)


def test_a_non_http_url_is_refused(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="http"):
        bundle_ref(bundle, "file:///etc/passwd")


def test_the_desired_payload_follows_the_contract(bundle: Path) -> None:
    ref = bundle_ref(bundle, URL)
    doc = json.loads(desired_payload("f", "d1", ref, rollout="r1", ts=12.5))
    assert doc == {
        "v": 1, "fleet": "f", "device": "d1", "ts": 12.5, "rollout": "r1",
        "bundle": {"url": URL, "sha256": ref.sha256, "digest": ref.digest, "sequence": 7,
                   "name": ref.name, "version": ref.version},
    }  # fmt: skip


def test_groups_come_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "groups.toml"
    path.write_text('[groups]\ncanary = ["d2", "d1", "d2"]\nrest = ["d3"]\n')
    groups = load_groups(path)
    assert groups == {"canary": ("d2", "d1"), "rest": ("d3",)}
    assert select_devices(group="canary", groups=groups, devices=["d3"]) == ["d1", "d2", "d3"]


@pytest.mark.parametrize(
    "text", ['canary = ["d1"]', '[groups]\ncanary = "d1"', '[groups]\nc = ["a/b"]', "[groups"]
)
def test_bad_groups_files_are_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "groups.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_groups(path)


def test_where_selects_devices_by_birth_attributes() -> None:
    known = {
        "d1": {"attributes": {"arch": "aarch64"}},
        "d2": {"attributes": {"arch": "x86_64"}},
        "d3": {"status": "offline"},
    }
    assert select_devices(where=parse_where(["arch=aarch64"]), known=known) == ["d1"]
    with pytest.raises(ConfigError, match="no device"):
        select_devices(where={"arch": "riscv"}, known=known)


def test_an_unknown_group_names_the_defined_ones() -> None:
    with pytest.raises(ConfigError, match="canary"):
        select_devices(group="nope", groups={"canary": ("d1",)})


@pytest.mark.integration
def test_publish_sets_a_retained_desired_state_per_device(
    broker: Broker, bundle: Path, tmp_path: Path
) -> None:
    devices = start_devices(broker.host, broker.port, "f", ["d1", "d2", "d3"])
    devices[0].transport.stop()  # offline devices get the retained state when they return
    devices += start_devices(broker.host, broker.port, "f", ["a1"], attributes={"arch": "aarch64"})
    groups = tmp_path / "groups.toml"
    groups.write_text('[groups]\ncanary = ["d1", "d2"]\n')
    url = f"mqtt://{broker.host}:{broker.port}"
    try:
        common = ["--url", URL, "--fleet", "f", "--broker", url, "--groups", str(groups)]
        assert main(["publish", str(bundle), *common, "--group", "canary"]) == 0
        assert main(["publish", str(bundle), *common, "--where", "arch=aarch64"]) == 0
        with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
            assert sub.wait_for(lambda m: len(m) == 3)
            got = {m.topic.split("/")[3]: json.loads(m.payload) for m in sub.snapshot()}
        assert sorted(got) == ["a1", "d1", "d2"]
        assert all(m["bundle"]["url"] == URL for m in got.values())
        assert devices[1].desired_seen[-1] == got["d2"]
    finally:
        for d in devices[1:]:
            d.stop()
