"""``edgeship-agent`` conventions: JSON errors, the default state directory, progress."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import _lifecycle, main
from tests.agent.cli.test_lifecycle import _install, _run, env  # noqa: F401 - fixture


def test_rollback_failure_with_json_is_a_json_error_on_stdout(
    tmp_path: Path,
    env: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    _install(capsys, env, tmp_path, "v1")
    code, out, err = _run(capsys, "rollback", "--state-dir", str(tmp_path), "--json")
    assert (code, err) == (1, "")
    error = json.loads(out)["error"]
    assert "no previous version" in error["message"]


def test_a_command_line_error_with_json_is_a_json_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--json", "--no-such-option"])
    assert exit_.value.code == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "usage"


def test_status_reads_the_state_dir_of_the_given_config(
    tmp_path: Path,
    env: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    _install(capsys, env, tmp_path / "state", "v1")
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "d1"\nstate_dir = "state"\ntrust_policy = "{env["trust"]}"\n')
    code, out, _ = _run(capsys, "status", "--config", str(config), "--json")
    assert code == 0
    assert json.loads(out)["current"]["sequence"] == 1


def test_status_without_options_reads_the_default_state_dir(
    tmp_path: Path,
    env: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install(capsys, env, tmp_path, "v1")
    monkeypatch.setattr(_lifecycle, "DEFAULT_CONFIG", tmp_path / "no-agent.toml")
    monkeypatch.setattr(_lifecycle, "DEFAULT_STATE_DIR", tmp_path)
    code, out, _ = _run(capsys, "status", "--json")
    assert code == 0
    assert json.loads(out)["current"]["sequence"] == 1


def test_status_of_a_missing_state_dir_names_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "status", "--state-dir", str(tmp_path / "nowhere"))
    assert code == 1
    assert "--state-dir" in err
    assert "--config" in err


def test_install_shows_download_progress_on_a_terminal_only(
    tmp_path: Path,
    env: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["install", str(env["v1"]), "--trust", str(env["trust"])]
    code, _, err = _run(capsys, *argv, "--state-dir", str(tmp_path / "piped"))
    assert (code, err) == (0, "")
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        monkeypatch.setattr(sys, "stderr", tty)
        assert main([*argv, "--state-dir", str(tmp_path / "tty")]) == 0
        tty.flush()
    shown = ""
    while select.select([master], [], [], 1.0)[0]:  # until the terminal has nothing more
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side is closed and drained
            break
        if not chunk:
            break
        shown += chunk.decode()
    os.close(master)
    assert "downloaded " in shown
    assert "MiB" in shown
    assert "installed: mlp 1.1" in shown


@pytest.mark.parametrize(
    "argv",
    [
        ["edgeship-agent", "status", "--json", "--state-dir", "/nonexistent"],
        ["edgeship", "fleet", "status", "--json", "--db", "/nonexistent/fleet.db"],
    ],
)
def test_a_reader_that_goes_away_ends_the_cli_quietly(argv: list[str]) -> None:
    # `... --json | head -1` where the reader is gone before the CLI writes.
    read, write = os.pipe()
    os.close(read)
    script = Path(sys.executable).parent / argv[0]
    done = subprocess.run(
        [str(script), *argv[1:]], stdout=write, stderr=subprocess.PIPE, timeout=60, check=False
    )
    os.close(write)
    assert (done.returncode, done.stderr) == (141, b"")
