"""``edgeship`` conventions: JSON errors, defaults in --help, hints that name a command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdk.cli import main


def json_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, str]:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert err == ""
    error: dict[str, str] = json.loads(out)["error"]
    return error


def test_serve_failure_with_json_is_a_json_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = json_error(capsys, ["serve", str(tmp_path / "missing"), "--port", "0", "--json"])
    assert error["code"] == "config"
    assert "missing" in error["message"]


def test_fleet_report_without_out_with_json_is_a_json_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.sqlite")
    error = json_error(capsys, ["fleet", "report", "--db", db, "--json"])
    assert error == {"code": "config", "message": "fleet report needs --out FILE.html"}


def test_rollout_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 1%,10%,50%,100%)", "(default: 60.0)", "(default: 600.0)"):
        assert default in text


def test_an_empty_fleet_status_names_the_collect_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.sqlite")
    assert main(["fleet", "status", "--db", db]) == 0
    assert f"edgeship collect --db {db}" in " ".join(capsys.readouterr().out.split())
