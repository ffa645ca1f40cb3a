"""The `edgeship` CLI, called in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import TrustPolicy
from sdk.cli import main
from tests.support.bundles import BundleParts, make_key, make_manifest
from tests.support.models import make_onnx_mlp

PASS_ENV = "EDGESHIP_TEST_PASSPHRASE"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PASS_ENV, "correct horse")
    monkeypatch.chdir(tmp_path)
    make_onnx_mlp(tmp_path / "mlp.onnx")
    return tmp_path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main(argv) == 0
    doc: dict[str, object] = json.loads(capsys.readouterr().out)
    return doc


def _keygen(name: str) -> None:
    assert main(["keygen", name, "--passphrase-env", PASS_ENV]) == 0


def _build(out: str, *keys: str, sequence: int = 1) -> list[str]:
    argv = [
        "build",
        "mlp.onnx",
        "--out",
        out,
        "--name",
        "mlp",
        "--version",
        "1.0",
        "--sequence",
        str(sequence),
        "--passphrase-env",
        PASS_ENV,
        "--json",
    ]
    for k in keys:
        argv += ["--key", k]
    return argv


def test_keygen_build_verify_and_inspect_round_trip(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    assert main(["trust", "release.pub", "--out", "trust.toml"]) == 0
    capsys.readouterr()
    built = _json(capsys, _build("mlp.edgeship", "release"))
    verified = _json(capsys, ["verify", "mlp.edgeship", "--trust", "trust.toml", "--json"])
    assert verified["ok"] is True
    assert verified["digest"] == built["digest"]
    shown = _json(capsys, ["inspect", "mlp.edgeship", "--json"])
    assert shown["verified"] is False
    assert shown["manifest"]["name"] == "mlp"  # type: ignore[index]


def test_inspect_prints_tables_for_people(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    main(_build("mlp.edgeship", "release"))
    capsys.readouterr()
    assert main(["inspect", "mlp.edgeship"]) == 0
    out = capsys.readouterr().out
    for text in ("NOT verified", "model card", "model/model.onnx", "probs", "float32"):
        assert text in out


def test_verify_of_a_tampered_bundle_exits_nonzero_with_the_reason(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    main(["trust", "release.pub", "--out", "trust.toml"])
    main(_build("mlp.edgeship", "release"))
    data = bytearray((workdir / "mlp.edgeship").read_bytes())
    data[-2048] ^= 0xFF  # inside the last payload member
    (workdir / "mlp.edgeship").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", "mlp.edgeship", "--trust", "trust.toml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_two_of_two_policy_needs_both_signatures(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("a")
    _keygen("b")
    main(["trust", "a.pub", "b.pub", "--threshold", "2", "--out", "trust.toml"])
    main(_build("one.edgeship", "a"))
    main(_build("two.edgeship", "a", "b"))
    capsys.readouterr()
    assert main(["verify", "one.edgeship", "--trust", "trust.toml"]) == 1
    assert "needs 2" in capsys.readouterr().err
    assert main(["verify", "two.edgeship", "--trust", "trust.toml"]) == 0


def test_verify_refuses_a_sequence_below_the_floor(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    main(["trust", "release.pub", "--out", "trust.toml"])
    main(_build("mlp.edgeship", "release", sequence=4))
    capsys.readouterr()
    assert main(["verify", "mlp.edgeship", "--trust", "trust.toml", "--min-sequence", "5"]) == 1
    assert "floor" in capsys.readouterr().err


def test_missing_passphrase_variable_is_a_clear_error(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASS_ENV)
    assert main(["keygen", "k", "--passphrase-env", PASS_ENV]) == 1
    assert PASS_ENV in capsys.readouterr().err


def test_missed_gate_exits_nonzero_prints_the_report_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    np.savez(workdir / "val.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype("f4"))
    argv = [a for a in _build("mlp.edgeship", "release") if a != "--json"]  # people read tables
    argv += ["--quantize", "dynamic", "--validation", "val.npz", "--max-size-mb", "0.000001"]
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "max_size_mb" in captured.err
    assert "FAIL" in captured.err
    assert "margin" in captured.err
    assert not (workdir / "mlp.edgeship").exists()


def test_inspect_shows_the_evaluation_report(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _keygen("release")
    np.savez(workdir / "val.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype("f4"))
    argv = _build("mlp.edgeship", "release")
    tiny = ["--max-latency-ratio", "off"]  # int8 does not pay on a model this small
    assert main([*argv, "--quantize", "dynamic", "--validation", "val.npz", *tiny]) == 0
    capsys.readouterr()
    assert main(["inspect", "mlp.edgeship"]) == 0
    out = capsys.readouterr().out
    assert "evaluation (at build time)" in out
    assert "fidelity: agreement" in out


def test_verify_of_a_fifo_says_so_at_once_instead_of_hanging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "bundle.edgeship"
    os.mkfifo(fifo)
    policy = tmp_path / "trust.toml"
    policy.write_bytes(TrustPolicy.of([make_key("a").public]).to_toml())
    assert main(["verify", str(fifo), "--trust", str(policy)]) == 1
    assert "is a FIFO, not a regular file" in capsys.readouterr().err
    assert main(["inspect", str(fifo)]) == 1
    assert "is a FIFO, not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        (["--shadow", "--split", "0.2"], "a shadow stage (--shadow) or a split (--split)"),
        (["--shadow", "--shadow-min-agreement", "1.5"], "--shadow: min_agreement must be"),
        (["--split", "1.0"], "--split 1.0 must be strictly between 0 and 1"),
    ],
)
def test_a_rollout_stage_that_cannot_be_is_refused_before_anything_is_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: list[str], error: str
) -> None:
    bundle = tmp_path / "b.edgeship"
    bundle.write_bytes(BundleParts(manifest=make_manifest(sequence=7)).to_bytes())
    argv = ["rollout", str(bundle), "--url", "http://127.0.0.1:1/b.edgeship", "--fleet", "f",
            "--device", "d1", "--skip-preflight", "--broker", "mqtt://127.0.0.1:1",
            "--db", str(tmp_path / "fleet.sqlite"), "--model", "ocr", "--json", *stage]  # fmt: skip
    assert main(argv) == 1
    assert error in json.loads(capsys.readouterr().out)["error"]["message"]
    assert not (tmp_path / "fleet.sqlite").exists()
