"""``edgeship trust init | rotate | revoke | sign | show | publish`` and ``edgeship heartbeat``,
called in-process, with keys made by ``edgeship keygen``; and ``edgeship-agent trust``.

Threshold signing across machines is played with copies of one file: each key holder
signs their copy, the copies are merged, and only then is the root ready.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.bundle.heartbeat import read_heartbeat
from agent.bundle.root import read_root
from agent.bundle.trust import verify_bootstrap, verify_root
from agent.cli import main as agent_main
from sdk.cli import main
from tests.support.models import make_onnx_mlp

PASS_ENV = "EDGESHIP_TEST_PASSPHRASE"
PASS = ["--passphrase-env", PASS_ENV]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PASS_ENV, "correct horse")
    monkeypatch.chdir(tmp_path)
    for name in ("root-a", "root-b", "root-c", "release", "release-2", "online"):
        assert main(["keygen", name, *PASS]) == 0
    return tmp_path


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def _init(capsys: pytest.CaptureFixture[str], *extra: str) -> Any:
    return _json(
        capsys, "trust", "init", "--root-key", "root-a.pub", "--root-key", "root-b.pub",
        "--root-threshold", "2", "--bundle-key", "release.pub", "--freshness-key", "online.pub",
        "--fleet", "f", "--out", "root-1.json", *extra,
    )  # fmt: skip


def test_threshold_signing_across_machines_merges_copies_of_one_file(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drafted = _init(capsys)
    assert (drafted["ready"], drafted["signed_by"]) == (False, [])
    # Each key holder signs a copy on their own machine.
    _json(capsys, "trust", "sign", "root-1.json", "--sign", "root-a", *PASS, "--out", "a.json")
    one = _json(
        capsys, "trust", "sign", "root-1.json", "--sign", "root-b", *PASS, "--out", "b.json"
    )
    assert (one["ready"], len(one["own_root_keys"]["signed"])) == (False, 1)
    merged = _json(capsys, "trust", "sign", "a.json", "--merge", "b.json", "--out", "root.json")
    assert merged["ready"]
    assert len(merged["signed_by"]) == 2
    root = verify_bootstrap(Path("root.json").read_bytes())
    assert (root.version, root.fleet, root.root.threshold) == (1, "f", 2)
    shown = _json(capsys, "trust", "show", "root.json")
    assert shown["roles"]["freshness"]["threshold"] == 1
    assert shown["report"]["ready"]


def test_merging_copies_of_different_roots_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _init(capsys)
    _init(capsys, "--out", "other.json", "--min-sequence", "mlp=3")
    assert main(["trust", "sign", "root-1.json", "--merge", "other.json"]) == 1
    assert "different roots" in capsys.readouterr().err


def test_rotate_revoke_and_publish_check_what_a_device_will_check(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _init(capsys, "--sign", "root-a", "--sign", "root-b", *PASS)
    Path("root-1.json").rename("root.json")
    # Root key b out, c in: the new root needs 2 of a, b (old) and 2 of a, c (new).
    only_new = _json(
        capsys, "trust", "rotate", "root.json", "--add-root-key", "root-c.pub",
        "--remove", "root-b.pub", "--sign", "root-a", "--sign", "root-c", *PASS,
        "--out", "root-2.json",
    )  # fmt: skip
    assert only_new["previous_root_keys"]["signed"] == [only_new["signed_by"][0]]
    assert not only_new["ready"]
    assert main(["trust", "publish", "root-2.json", "--dir", "srv", "--no-mqtt", "--fleet", "f"])
    assert "root/1.json" in capsys.readouterr().err  # nothing to check it against yet
    assert main(["trust", "publish", "root.json", "--dir", "srv", "--no-mqtt", "--fleet", "f"]) == 0
    assert main(["trust", "publish", "root-2.json", "--dir", "srv", "--no-mqtt", "--fleet", "f"])
    assert "not signed by enough root keys of its predecessor" in capsys.readouterr().err
    both = _json(capsys, "trust", "sign", "root-2.json", "--sign", "root-b", *PASS,
                 "--previous", "root.json")  # fmt: skip
    assert both["ready"]
    published = _json(
        capsys, "trust", "publish", "root-2.json", "--dir", "srv", "--no-mqtt", "--fleet", "f"
    )
    assert published["version"] == 2
    assert Path("srv/root/2.json").read_bytes() == Path("root-2.json").read_bytes()
    # Revoke the release key: root 3 lists it nowhere.
    revoked = _json(capsys, "trust", "revoke", "root-2.json", "release.pub",
                    "--add-bundle-key", "release-2.pub", "--sign", "root-a", "--sign", "root-c",
                    *PASS, "--out", "root-3.json")  # fmt: skip
    assert revoked["ready"]
    v2 = read_root(Path("root-2.json").read_bytes())[1]
    v3 = verify_root(Path("root-3.json").read_bytes(), v2, fleet="f")
    release = read_root(Path("root.json").read_bytes())[1].bundles.keyids[0]
    assert release in v2.keys
    assert release not in v3.keys
    # A version is published once: another v2 would fork the fleet's chain.
    Path("root-2b.json").write_bytes(Path("root-3.json").read_bytes())
    forked = Path("srv/root/2.json")
    forked.write_bytes(forked.read_bytes() + b" ")
    assert main(["trust", "publish", "root-2.json", "--dir", "srv", "--no-mqtt", "--fleet", "f"])
    assert "already holds another root of version 2" in capsys.readouterr().err


def test_a_bundle_signed_by_a_revoked_key_fails_verify_against_the_new_root(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _init(capsys, "--bundle-key", "release-2.pub", "--sign", "root-a", "--sign", "root-b", *PASS)
    _json(capsys, "trust", "revoke", "root-1.json", "release.pub", "--sign", "root-a",
          "--sign", "root-b", *PASS, "--out", "root-2.json")  # fmt: skip
    make_onnx_mlp(workdir / "mlp.onnx")
    built = ["build", "mlp.onnx", "--out", "mlp.edgeship", "--name", "mlp", "--version", "1",
             "--sequence", "1", "--key", "release", *PASS]  # fmt: skip
    assert main(built) == 0
    capsys.readouterr()
    assert main(["verify", "mlp.edgeship", "--trust", "root-1.json"]) == 0
    assert main(["verify", "mlp.edgeship", "--trust", "root-2.json"]) == 1
    assert "trust root v2 trusts" in capsys.readouterr().err


def test_heartbeat_is_signed_by_the_online_key_only(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _init(capsys, "--sign", "root-a", "--sign", "root-b", *PASS)
    argv = ["heartbeat", "--online-key", "online", "--root", "root-1.json", "--latest",
            "mlp=4", "--valid-for", "60", "--out", "hb.json", "--dir", "srv", "--no-mqtt",
            "--fleet", "f", *PASS, "--json"]  # fmt: skip
    assert main([*argv, "--every", "1", "--count", "2"]) == 0
    sent = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(sent) == 2
    assert sent[0]["issued"] < sent[1]["issued"]
    sent = _json(capsys, *argv[:-1])
    assert sent["files"] == ["hb.json", "srv/heartbeat.json"]
    beat = read_heartbeat(Path("hb.json").read_bytes())
    assert (beat.latest, beat.root_version, beat.fleet) == ({"mlp": 4}, 1, "f")
    assert (beat.expires - beat.issued).total_seconds() == 60
    code = main(["heartbeat", "--online-key", "release", "--root", "root-1.json", "--no-mqtt",
                 "--fleet", "f", *PASS])  # fmt: skip
    assert code == 1
    assert "is not a freshness key" in capsys.readouterr().err


def test_the_agent_applies_roots_by_hand_and_shows_the_one_in_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _init(capsys, "--sign", "root-a", "--sign", "root-b", *PASS)
    _json(capsys, "trust", "rotate", "root-1.json", "--min-sequence", "mlp=7", "--sign",
          "root-a", "--sign", "root-b", *PASS, "--out", "root-2.json")  # fmt: skip
    _json(
        capsys, "trust", "rotate", "root-2.json", "--sign", "root-a", *PASS, "--out", "root-3.json"
    )  # fmt: skip  (below the threshold: refused)
    state = ["--state-dir", "state", "--trust", "root-1.json"]
    assert agent_main(["trust", "update", *state, "root-2.json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert agent_main(["trust", "update", *state, "root-3.json"]) == 1
    assert "not signed by enough root keys" in capsys.readouterr().err
    assert agent_main(["trust", "show", *state, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["min_sequence"], shown["signatures"]) == (2, {"mlp": 7}, "ok")
