"""Every fuzz target replays its corpus (seeds and past crashes) and fuzzes for a few seconds.

The same runner as by hand (``python -m tests.fuzz.<name>``, see ``_fuzz.py``), in a child
process: libFuzzer owns the process it runs in. Without atheris these tests skip, except
with ``CI=true``: then they fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
TARGETS = [
    "codec_json",
    "codec_binary",
    "http_request",
    "bundle",
    "signed_manifest",
    "envelope",
    "config",
    "desired",
    "telemetry",
    "state",
    "root",
    "golden_cases",
]
SECONDS = 3  # per target: the twelve stay near a minute with their start-up


@pytest.fixture(scope="module", autouse=True)
def _atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        message = "atheris is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("name", TARGETS)
def test_the_corpus_passes_and_fuzzing_finds_no_crash(name: str, tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"tests.fuzz.{name}",
            f"--seconds={SECONDS}",
            f"--keep={tmp_path / 'found'}",
            f"--artifacts={crashes}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = sorted(p.name for p in crashes.iterdir())
    assert (done.returncode, found) == (0, []), done.stderr[-4000:]
    assert "DONE" in done.stderr  # it fuzzed, not just started
