"""Where a bundle's model came from, through the command line: the provenance every build
records, a source model's OpenSSF signature checked before anything else runs, and the
bundled model signed with OpenSSF Model Signing for anyone to check with its own tool."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import model_signing
import pytest

from agent.bundle.signing import PublicKey
from sdk.build.provenance import OMS_SIGNATURE_PATH, PROVENANCE_PATH
from sdk.cli import main
from tests.support.models import make_onnx_mlp

PASS_ENV = "EDGESHIP_TEST_PASSPHRASE"
PASSPHRASE = "correct horse"
MODEL_SIGNING_CLI = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PASS_ENV, PASSPHRASE)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    monkeypatch.setenv("EDGESHIP_BUILDER_ID", "https://ci.example/edgeship/build/17")
    monkeypatch.chdir(tmp_path)
    make_onnx_mlp(tmp_path / "mlp.onnx")
    for name, kind in (("release", "ed25519"), ("publisher", "ecdsa-p256")):
        assert main(["keygen", name, "--type", kind, "--passphrase-env", PASS_ENV]) == 0
    assert main(["trust", "release.pub", "--out", "trust.toml"]) == 0
    return tmp_path


def _build(*extra: str, out: str = "mlp.edgeship", key: str = "release") -> int:
    return main(
        [
            *("build", "mlp.onnx", "--out", out, "--name", "mlp", "--version", "1.0"),
            *("--sequence", "1", "--passphrase-env", PASS_ENV, "--key", key, *extra),
        ]
    )


def _verify(capsys: pytest.CaptureFixture[str], bundle: str = "mlp.edgeship") -> dict[str, Any]:
    capsys.readouterr()
    code = main(["verify", bundle, "--trust", "trust.toml", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def _publisher_signs(model: Path, signature: Path) -> None:
    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=model.parent / "publisher", password=PASSPHRASE.encode()
    ).sign(model, signature)


def test_every_bundle_records_where_its_model_came_from(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "meta.toml").write_text(
        '[training]\ndata_version = "digits-2026-03"\ncode_revision = "4f2a9c1"\n'
        "[training.hyperparameters]\nlearning_rate = 0.001\nepochs = 40\n"
    )
    assert _build("--metadata", "meta.toml") == 0
    statement = _verify(capsys)["provenance"]
    model = statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    assert model["uri"] == "file:mlp.onnx"
    assert (
        model["digest"]["sha256"] == hashlib.sha256((workdir / "mlp.onnx").read_bytes()).hexdigest()
    )
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    assert external["training"]["hyperparameters"] == {"learning_rate": 0.001, "epochs": 40}
    with tarfile.open(workdir / "mlp.edgeship") as tar:
        bundled = tar.extractfile("model/model.onnx").read()  # type: ignore[union-attr]
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["model/model.onnx"] == hashlib.sha256(bundled).hexdigest()
    builder = statement["predicate"]["runDetails"]["builder"]
    assert builder["id"] == "https://ci.example/edgeship/build/17"


def test_inspect_shows_the_provenance(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _build() == 0
    capsys.readouterr()
    assert main(["inspect", "mlp.edgeship", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["_type"].startswith("https://in-toto")
    assert main(["inspect", "mlp.edgeship"]) == 0
    text = capsys.readouterr().out
    assert "provenance" in text
    assert "file:mlp.onnx" in text


def test_a_signed_source_model_is_accepted_and_its_signer_recorded(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publisher_signs(workdir / "mlp.onnx", workdir / "mlp.sig")
    assert _build("--model-signature", "mlp.sig", "--model-key", "publisher.pub") == 0
    model = _verify(capsys)["provenance"]["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    signature = model["annotations"]["signature"]
    assert signature["signer"] == PublicKey.from_pem((workdir / "publisher.pub").read_bytes()).keyid
    assert signature["standard"] == "OpenSSF Model Signing v1.0"


@pytest.mark.parametrize("attack", ["changed-byte", "other-signer"])
def test_a_model_that_does_not_match_its_signature_stops_the_build_before_quantization(
    workdir: Path, capsys: pytest.CaptureFixture[str], attack: str
) -> None:
    _publisher_signs(workdir / "mlp.onnx", workdir / "mlp.sig")
    key = "publisher.pub"
    if attack == "changed-byte":
        data = bytearray((workdir / "mlp.onnx").read_bytes())
        data[-5] ^= 1  # a weight: the model still loads, it computes something else
        (workdir / "mlp.onnx").write_bytes(bytes(data))
    else:
        assert main(["keygen", "other", "--type", "ecdsa-p256", "--passphrase-env", PASS_ENV]) == 0
        key = "other.pub"
    capsys.readouterr()
    argv = ("--model-signature", "mlp.sig", "--model-key", key, "--quantize", "dynamic")
    assert _build(*argv) == 1
    err = capsys.readouterr().err
    assert "the model signature mlp.sig does not verify" in err
    assert err.count("\n") == 1
    assert not (workdir / "mlp.edgeship").exists()


def test_provenance_changed_after_signing_fails_verification(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build() == 0
    raw = bytearray((workdir / "mlp.edgeship").read_bytes())
    with tarfile.open(workdir / "mlp.edgeship") as tar:
        member = tar.getmember(PROVENANCE_PATH)
    text = raw[member.offset_data : member.offset_data + member.size]
    at = member.offset_data + text.index(b"file:mlp.onnx") + len(b"file:")
    raw[at : at + 3] = b"evl"  # the same length: only the digest can tell
    (workdir / "forged.edgeship").write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", "forged.edgeship", "--trust", "trust.toml"]) == 1
    assert "provenance/build.intoto.json" in capsys.readouterr().err


def test_with_oms_the_extracted_model_verifies_with_the_model_signing_cli(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build("--oms", key="publisher") == 0
    extracted = workdir / "extracted"
    with tarfile.open(workdir / "mlp.edgeship") as tar:
        for name in ("model/model.onnx", OMS_SIGNATURE_PATH):
            target = extracted / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
    verify = [
        *(MODEL_SIGNING_CLI, "verify", "key", str(extracted / "model" / "model.onnx")),
        *("--signature", str(extracted / OMS_SIGNATURE_PATH)),
        *("--public_key", str(workdir / "publisher.pub")),
    ]
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    model = extracted / "model" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0


def test_oms_needs_an_ecdsa_key(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _build("--oms") == 1
    assert "--oms signs with an ECDSA P-256 key" in capsys.readouterr().err


def test_two_builds_with_the_same_inputs_are_byte_identical_with_provenance(
    workdir: Path,
) -> None:
    assert _build(out="a.edgeship") == 0
    assert _build(out="b.edgeship") == 0
    a, b = (workdir / "a.edgeship").read_bytes(), (workdir / "b.edgeship").read_bytes()
    assert a == b
    assert PROVENANCE_PATH.encode() in a
