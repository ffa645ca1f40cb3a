"""``edgeship-agent install | resume | status | rollback | recover-state``, in-process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.cli import main
from tests.agent.install.test_fetch import (  # noqa: F401 - fixture
    BundleServer,
    serve_bundles,
    server,
    tls_server_context,
)
from tests.support.broker import Pki
from tests.support.lifecycle import POLICY, LifecycleBundle, make_model_bundle


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    v1: LifecycleBundle = make_model_bundle(d, seed=1, sequence=1)
    v2: LifecycleBundle = make_model_bundle(d, seed=2, sequence=2)
    return {"trust": trust, "v1": v1.path, "v2": v2.path}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _install(
    capsys: pytest.CaptureFixture[str], env: dict[str, Path], state: Path, name: str
) -> str:
    code, out, err = _run(
        capsys, "install", str(env[name]), "--state-dir", str(state), "--trust", str(env["trust"])
    )
    assert (code, err) == (0, "")
    return out


def _status(capsys: pytest.CaptureFixture[str], state: Path) -> dict[str, object]:
    code, out, _ = _run(capsys, "status", "--state-dir", str(state), "--json")
    assert code == 0
    doc: dict[str, object] = json.loads(out)
    return doc


def test_install_commits_and_status_shows_the_version(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = _install(capsys, env, tmp_path, "v1")
    assert "installed: mlp 1.1 (sequence 1)" in out
    assert "p95" in out
    code, out, _ = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.split()[0] != "last")
    assert lines["current"].startswith("mlp 1.1 (sequence 1,")
    assert lines["previous"].strip() == "-"
    assert lines["floor"].strip() == "1"
    assert lines["serves"].split() == ["on", "onnxruntime", "CPUExecutionProvider"]
    doc = _status(capsys, tmp_path)
    assert doc["current"]["sequence"] == 1  # type: ignore[index]
    assert doc["pending"] is None
    assert doc["serving"] == {
        "digest": doc["current"]["digest"],  # type: ignore[index]
        "runtime": "onnxruntime",
        "provider": "CPUExecutionProvider",
    }


def test_install_from_a_url_checks_the_given_sha256(
    tmp_path: Path,
    env: dict[str, Path],
    server: BundleServer,  # noqa: F811 - fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = env["v1"].read_bytes()
    server.behaviour.content = data
    common = ["--state-dir", str(tmp_path), "--trust", str(env["trust"])]
    code, _, err = _run(capsys, "install", server.url(), *common, "--sha256", "0" * 64)
    assert code == 1
    assert err.startswith("error: ")
    assert "sha256" in err
    assert "Traceback" not in err
    sha = hashlib.sha256(data).hexdigest()
    code, out, err = _run(capsys, "install", server.url(), *common, "--sha256", sha, "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["result"]["outcome"] == "committed"
    assert doc["state"]["current"]["sequence"] == 1


def test_rollback_returns_to_the_previous_version_and_refuses_when_there_is_none(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _install(capsys, env, tmp_path, "v1")
    _install(capsys, env, tmp_path, "v2")
    code, out, _ = _run(capsys, "rollback", "--state-dir", str(tmp_path))
    assert code == 0
    assert "mlp 1.1 (sequence 1" in out
    doc = _status(capsys, tmp_path)
    assert doc["last_failure"]["outcome"] == "rolled-back"  # type: ignore[index]
    assert doc["floor"] == 2
    code, _, err = _run(capsys, "rollback", "--state-dir", str(tmp_path))
    assert code == 1
    assert "no previous version" in err


def test_refused_install_shows_as_the_last_failure(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _install(capsys, env, tmp_path, "v2")
    code, _, err = _run(
        capsys,
        "install",
        str(env["v1"]),
        "--state-dir",
        str(tmp_path),
        "--trust",
        str(env["trust"]),
    )
    assert code == 1
    assert "below this device's floor 2" in err
    code, out, _ = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert "failed in verifying" in out


def test_corrupt_state_is_reported_and_recovered_keeping_the_floor(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _install(capsys, env, tmp_path, "v2")
    (tmp_path / "state.json").write_bytes(b"\0\0\0")
    code, _, err = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 1
    assert "recover-state" in err
    code, out, _ = _run(capsys, "recover-state", "--state-dir", str(tmp_path))
    assert code == 0
    assert "floor 2" in out
    assert _status(capsys, tmp_path)["floor"] == 2


def test_unreadable_trust_policy_is_a_config_error(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "install", str(env["v1"]), "--state-dir", str(tmp_path), "--trust", "/nonexistent"
    )
    assert code == 1
    assert "cannot read trust policy" in err


def test_resume_with_nothing_pending_says_so(
    tmp_path: Path, env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(
        capsys, "resume", "--state-dir", str(tmp_path), "--trust", str(env["trust"])
    )
    assert (code, out.strip()) == (0, "nothing to resume")


def test_install_from_an_https_url_trusts_the_given_ca(
    tmp_path: Path, env: dict[str, Path], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_bundles(tls_server_context(pki, client_certs=False)) as s:
        s.behaviour.content = env["v1"].read_bytes()
        argv = ["install", s.url(), "--state-dir", str(tmp_path), "--trust", str(env["trust"])]
        code, _, err = _run(capsys, *argv)
        assert code != 0
        assert "does not trust" in err
        code, out, err = _run(capsys, *argv, "--ca-file", str(pki.ca_file))
        assert (code, err) == (0, "")
        assert "installed: mlp 1.1" in out
