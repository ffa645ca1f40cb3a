"""Encrypted bundles end to end: built by the SDK, installed and served by the agent.

Real ONNX model, real onnxruntime, the agent's real install path (health gate in its
child process); the CLIs in-process.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.crypto import DeviceKey
from agent.bundle.signing import TrustPolicy
from agent.cli import main as agent_main
from agent.errors import ConfigError, HealthCheckError, NotForThisDeviceError
from agent.install import ChildGate, check_in_child
from agent.install._store import Store
from agent.install._updater import Updater, UpdaterConfig
from agent.serve._slot import ModelSlot
from agent.serve.runtimes import RuntimeOptions, load_model
from sdk.build import BuildMetadata, SigningKey, build_bundle, generate_key
from sdk.cli import main as sdk_main
from tests.support.models import make_onnx_mlp, make_tflite_mlp

PASS_ENV = "EDGESHIP_TEST_PASSPHRASE"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("encrypted")
    signing: SigningKey = generate_key(d / "release", b"pw")
    (d / "trust.toml").write_bytes(TrustPolicy.of([signing.public]).to_toml())
    model = make_onnx_mlp(d / "mlp.onnx")
    for name in ("device-a", "device-b"):
        DeviceKey.generate().save(d / f"{name}.key")
    build_bundle(
        model,
        d / "plain.edgeship",
        metadata=BuildMetadata(name="mlp", version="1.0", sequence=1),
        keys=[signing],
    )
    build_bundle(
        model,
        d / "sealed.edgeship",
        metadata=BuildMetadata(name="mlp", version="1.1", sequence=2),
        keys=[signing],
        encrypt_for=[DeviceKey.load(d / "device-a.key").public],
    )
    return {"dir": d, "model": model}


def _policy(world: dict[str, Path]) -> TrustPolicy:
    return TrustPolicy.from_toml((world["dir"] / "trust.toml").read_bytes())


def _model_bytes(world: dict[str, Path], tmp_path: Path) -> bytes:
    with (world["dir"] / "plain.edgeship").open("rb") as f:
        v = verify_bundle(f, _policy(world), now=datetime.now(UTC), extract_to=tmp_path / "plain")
    return (tmp_path / "plain" / v.manifest.model.file).read_bytes()


def _contains_plaintext(root: Path, plaintext: bytes) -> list[Path]:
    probe = plaintext[len(plaintext) // 2 : len(plaintext) // 2 + 64]
    return [p for p in root.rglob("*") if p.is_file() and probe in p.read_bytes()]


def test_anyone_verifies_an_encrypted_bundle_but_its_payload_is_ciphertext(
    world: dict[str, Path], tmp_path: Path
) -> None:
    plaintext = _model_bytes(world, tmp_path)
    with (world["dir"] / "sealed.edgeship").open("rb") as f:
        v = verify_bundle(f, _policy(world), now=datetime.now(UTC), extract_to=tmp_path / "x")
    assert v.manifest.encryption is not None
    assert set(_contains_plaintext(world["dir"], plaintext)) == {
        world["dir"] / "plain.edgeship",
        world["model"],
    }
    assert _contains_plaintext(tmp_path / "x", plaintext) == []


def test_the_device_it_is_for_installs_and_serves_it_and_never_writes_the_plaintext(
    world: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "ref").mkdir()
    plaintext = _model_bytes(world, tmp_path / "ref")
    slot = ModelSlot()
    state = tmp_path / "state"
    u = Updater(
        state,
        _policy(world),
        config=UpdaterConfig(decryption_key=world["dir"] / "device-a.key"),
        slot=slot,
    )
    result = u.install(str(world["dir"] / "sealed.edgeship"))
    assert result.outcome == "probation"
    assert result.health is not None
    assert result.health.max_abs_deviation <= 1e-5  # golden files decrypted in the child
    u.commit()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    plain_slot = ModelSlot()
    plain = Updater(tmp_path / "plain-state", _policy(world), slot=plain_slot)
    plain.install(str(world["dir"] / "plain.edgeship"))
    np.testing.assert_allclose(
        slot.predict({"x": x})["probs"], plain_slot.predict({"x": x})["probs"]
    )
    assert _contains_plaintext(state, plaintext) == []


@pytest.mark.parametrize("key", [None, "device-b.key"])
def test_other_devices_refuse_it_before_staging_and_keep_serving(
    world: dict[str, Path], tmp_path: Path, key: str | None
) -> None:
    slot = ModelSlot()
    u = Updater(
        tmp_path,
        _policy(world),
        config=UpdaterConfig(decryption_key=key and world["dir"] / key),
        slot=slot,
    )
    u.install(str(world["dir"] / "plain.edgeship"))
    u.commit()
    before = u.status()
    match = "no device key" if key is None else "not for this device"
    with pytest.raises(NotForThisDeviceError, match=match):
        u.install(str(world["dir"] / "sealed.edgeship"))
    after = u.status()
    assert (after.current, after.pending, after.floor) == (before.current, None, before.floor)
    assert after.attempts == before.attempts  # refused before the loop budget counts it
    assert Store(tmp_path).versions() == [before.current]
    assert slot.digest == before.current


def test_the_command_lines(
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASS_ENV, "pw")
    monkeypatch.chdir(tmp_path)
    assert agent_main(["keygen", "--out", "device.key", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key_id"] == DeviceKey.load(tmp_path / "device.key").key_id
    assert agent_main(["keygen", "--out", "device.key"]) != 0  # never overwrites
    assert "exists" in capsys.readouterr().err

    build = ["build", str(world["model"]), "--out", "b.edgeship", "--name", "mlp"]
    build += ["--version", "2.0", "--sequence", "2", "--key", str(world["dir"] / "release")]
    build += ["--passphrase-env", PASS_ENV, "--encrypt-for", "device.key.pub", "--json"]
    assert sdk_main(build) == 0
    capsys.readouterr()
    assert sdk_main(["inspect", "b.edgeship"]) == 0
    assert f"for device key id(s): {doc['key_id']}" in capsys.readouterr().out.replace("\n", "")

    trust = str(world["dir"] / "trust.toml")
    install = ["install", "b.edgeship", "--state-dir", "state", "--trust", trust]
    assert agent_main(install) != 0
    assert "no device key" in capsys.readouterr().err
    assert agent_main([*install, "--decryption-key", "device.key"]) == 0
    assert "installed: mlp 2.0" in capsys.readouterr().out

    version = Store(tmp_path / "state").load().current
    assert version is not None
    np.save(tmp_path / "in.npy", np.zeros((2, 64), np.float32))
    predict = ["predict", "--bundle-dir", str(Store(tmp_path / "state").version_dir(version))]
    predict += ["--input", "in.npy", "--output", "out.npy"]
    assert agent_main(predict) != 0
    assert "no device key" in capsys.readouterr().err
    assert agent_main([*predict, "--decryption-key", "device.key"]) == 0
    assert np.load(tmp_path / "out.npy").shape == (2, 10)


def test_load_model_decrypts_in_memory_only(world: dict[str, Path], tmp_path: Path) -> None:
    with (world["dir"] / "sealed.edgeship").open("rb") as f:
        v = verify_bundle(f, _policy(world), now=datetime.now(UTC), extract_to=tmp_path / "x")
    key = DeviceKey.load(world["dir"] / "device-a.key")
    with load_model(v.manifest, tmp_path / "x", "onnxruntime", key=key) as model:
        assert model.predict({"x": np.zeros((1, 64), np.float32)})["probs"].shape == (1, 10)
    with pytest.raises(ConfigError, match="load_from_memory"):
        load_model(
            v.manifest,
            tmp_path / "x",
            "onnxruntime",
            RuntimeOptions(load_from_memory=False),
            key=key,
        )
    with pytest.raises(NotForThisDeviceError):
        load_model(v.manifest, tmp_path / "x", "onnxruntime")


def test_an_encrypted_tflite_bundle_passes_the_gate_in_its_child_process(
    world: dict[str, Path], tmp_path: Path
) -> None:
    signing = generate_key(tmp_path / "k", b"pw")
    device = DeviceKey.load(world["dir"] / "device-a.key")
    result = build_bundle(
        make_tflite_mlp(tmp_path / "m.tflite"),
        tmp_path / "t.edgeship",
        metadata=BuildMetadata(name="t", version="1", sequence=1),
        keys=[signing],
        encrypt_for=[device.public],
    )
    with result.path.open("rb") as f:
        v = verify_bundle(
            f, TrustPolicy.of([signing.public]), now=datetime.now(UTC), extract_to=tmp_path / "x"
        )
    gate = ChildGate("litert", key_file=world["dir"] / "device-a.key")
    report = check_in_child(v.manifest, tmp_path / "x", gate, runs=3)
    assert report.max_abs_deviation <= 1e-5
    with pytest.raises(HealthCheckError, match="no device key"):
        check_in_child(v.manifest, tmp_path / "x", ChildGate("litert"), runs=1)
