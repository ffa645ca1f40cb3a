"""What the runs on other interpreters share: setting one up with its script, running a
command on it, installing a bundle through its agent, and which runs were asked for.

The interpreters come from scripts/python.sh (the CPythons devices ship) and
scripts/arm64.sh (aarch64 under qemu). 3.9 runs every time, 3.13's cheap checks too; the
rest only when asked (EDGESHIP_PYTHONS, EDGESHIP_ARM64=1): tests/compat/conftest.py
deselects the others rather than skipping them, so a run's skips are only ever missing
requirements.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.compat.agent_tests import ROOT
from tests.support.lifecycle import POLICY, make_model_bundle

ALWAYS = "3.9"  # the oldest: the one that finds most of what breaks
CHEAP_BY_DEFAULT = "3.13"  # the newest: deprecations and removals show first there
_AGENT = "import sys; from agent.cli import main; sys.exit(main())"


def python_selected(version: str, *, cheap: bool) -> bool:
    named = os.environ.get("EDGESHIP_PYTHONS", "").split()
    return version == ALWAYS or version in named or (cheap and version == CHEAP_BY_DEFAULT)


def arm64_requested() -> bool:
    return os.environ.get("EDGESHIP_ARM64") == "1"


@functools.cache
def set_up(*script: str) -> tuple[Path | None, str]:
    """The launcher ``bash SCRIPT ARGS`` prints, or None and why not: once per run."""
    # The venv's scripts (pip, the host python3 that reads pyproject.toml) come first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        done = subprocess.run(
            # Within pytest's own 300 s per test: a slow mirror fails with pip's words.
            ["bash", *script],
            capture_output=True,
            text=True,
            timeout=270,
            env=env,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = exc.stderr if isinstance(exc.stderr, str) else repr(exc.stderr)
        return None, f"{' '.join(script)} failed: {stderr[-2000:]}"
    return Path(done.stdout.strip().splitlines()[-1]), ""


def run(python: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def install_bundle(python: Path, tmp_path: Path) -> dict[str, Any]:
    """Install a bundle the SDK builds here through the agent's CLI on ``python`` (its
    health gate in a child process there); returns ``status --json`` after it."""
    trust = tmp_path / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    bundle = make_model_bundle(tmp_path / "bundles", seed=1, sequence=1)
    state = tmp_path / "state"
    done = run(
        python,
        *("-c", _AGENT, "install", str(bundle.path)),
        *("--state-dir", str(state), "--trust", str(trust)),
        timeout_s=240,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert "installed: mlp 1.1 (sequence 1)" in done.stdout
    done = run(python, "-c", _AGENT, "status", "--state-dir", str(state), "--json", timeout_s=60)
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status
