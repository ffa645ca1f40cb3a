"""The rough edges of ``edgeship build`` / ``inspect`` / ``verify``: one-line errors that
say what to do, no overwriting by accident, no tool noise, numbers people can read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sdk.cli import main
from tests.support.models import make_onnx_mlp
from tests.support.shape_models import make_onnx_stateful

PASS_ENV = "EDGESHIP_TEST_PASSPHRASE"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PASS_ENV, "correct horse")
    monkeypatch.chdir(tmp_path)
    make_onnx_mlp(tmp_path / "mlp.onnx")
    return tmp_path


def _keygen(name: str) -> None:
    assert main(["keygen", name, "--passphrase-env", PASS_ENV]) == 0


def _build(out: str, key: str, sequence: int = 1) -> list[str]:
    return [
        *("build", "mlp.onnx", "--out", out, "--name", "mlp", "--version", "1.0"),
        *("--sequence", str(sequence), "--passphrase-env", PASS_ENV, "--key", key, "--json"),
    ]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one-line error a failed command prints for people."""
    assert main([a for a in argv if a != "--json"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert "\n" not in err
    return err


def test_an_existing_bundle_is_replaced_only_with_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    assert main(_build("mlp.edgeship", "release")) == 0
    before = (workdir / "mlp.edgeship").read_bytes()
    capsys.readouterr()
    assert "already exists; pass --force" in _error(capsys, _build("mlp.edgeship", "release"))
    assert (workdir / "mlp.edgeship").read_bytes() == before
    assert main([*_build("mlp.edgeship", "release", sequence=2), "--force"]) == 0


def test_a_version_with_a_space_is_refused_before_building(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    argv = _build("mlp.edgeship", "release")
    argv[argv.index("1.0")] = "1.0 beta"
    assert "without spaces (e.g. 1.2.0" in _error(capsys, argv)
    assert not (workdir / "mlp.edgeship").exists()


def test_an_unknown_metadata_key_suggests_the_nearest_one(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    (workdir / "meta.toml").write_text('[model_card]\nlicence = "MIT"\n')
    err = _error(capsys, [*_build("mlp.edgeship", "release"), "--metadata", "meta.toml"])
    assert "unknown field 'model_card.licence'; did you mean 'license'?" in err


def test_verify_with_a_public_key_as_trust_says_how_to_make_a_policy(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    assert main(_build("mlp.edgeship", "release")) == 0
    capsys.readouterr()
    err = _error(capsys, ["verify", "mlp.edgeship", "--trust", "release.pub"])
    assert "is a key, not a trust policy; write one with `edgeship trust release.pub" in err


def test_a_golden_input_of_the_wrong_shape_names_the_input_and_its_shape(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    np.save(workdir / "golden.npy", np.zeros((4, 63), np.float32))
    err = _error(capsys, [*_build("mlp.edgeship", "release"), "--golden-inputs", "golden.npy"])
    assert "'x'" in err
    assert "64" in err


def test_synthesis_hints_from_the_command_line_build_a_stateful_model(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    make_onnx_stateful(workdir / "vad.onnx")
    argv = _build("vad.edgeship", "release")
    argv[argv.index("mlp.onnx")] = "vad.onnx"
    assert "--input-value" in _error(capsys, argv)
    assert main([*argv, "--input-value", "sr=16000"]) == 0


def test_quantizing_prints_no_onnxruntime_log_noise(
    workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    argv = [*_build("mlp.edgeship", "release"), "--quantize", "dynamic"]
    assert main([*argv, "--max-latency-ratio", "off"]) == 0
    assert "WARNING:root" not in capfd.readouterr().err


def test_inspect_shows_measured_numbers_with_four_significant_digits(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    np.savez(workdir / "val.npz", x=np.random.default_rng(0).standard_normal((16, 64)).astype("f4"))
    argv = [*_build("mlp.edgeship", "release"), "--quantize", "dynamic", "--validation", "val.npz"]
    assert main([*argv, "--max-latency-ratio", "off"]) == 0
    capsys.readouterr()
    assert main(["inspect", "mlp.edgeship"]) == 0
    out = capsys.readouterr().out
    assert "size vs fp32" in out
    assert "of float weights int8" in out
    five_significant = r"(?<![\d.])(?:0\.0*[1-9]\d{4,}|[1-9]\d*\.\d{4,})"
    assert not re.search(five_significant, out)


def test_a_missed_gate_with_json_prints_one_error_document_with_the_report(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    np.savez(workdir / "val.npz", x=np.random.default_rng(0).standard_normal((16, 64)).astype("f4"))
    argv = [*_build("mlp.edgeship", "release"), "--quantize", "dynamic", "--validation", "val.npz"]
    capsys.readouterr()
    assert main([*argv, "--max-size-mb", "0.000001", "--max-latency-ratio", "off"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["code"] == "gate"
    assert "max_size_mb" in doc["error"]["message"]
    assert doc["error"]["evaluation"]["gates"][0]["passed"] is False
