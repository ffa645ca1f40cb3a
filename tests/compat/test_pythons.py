"""The agent on the real CPythons devices ship: 3.9 to 3.13, from their OS's archive.

scripts/python.sh unpacks an interpreter from Debian's or Ubuntu's archive into
~/.cache/edgeship (never installed system-wide) and gives it a venv with the agent's
dependencies as pyproject.toml declares them, as pip resolves them for that Python:
Debian 11's 3.9 (Raspberry Pi OS bullseye), Ubuntu 22.04's 3.10 (JetPack 6), Ubuntu
24.04's 3.12 and Debian 13's 3.13, the last two on their own glibc. There the agent's
tests that need no SDK (tests/compat/agent_tests.py picks them) run for real, the agent
is type-checked against the numpy that Python gets, a bundle the SDK builds here installs
through the agent's command line, and the project resolves with its extras.

3.9, the oldest, runs every test here on every run. The others run everything when
EDGESHIP_PYTHONS names them (EDGESHIP_PYTHONS="3.10 3.12 3.13"; about a minute each once
cached); otherwise 3.13, the newest, runs only the cheap checks (what it is, and the
bundle install: about 35 s on a fresh machine, download included), and the rest is
deselected (tests/compat/conftest.py). Without network the tests skip, except under
CI=true, where they fail: the Pythons the agent supports are a promise the project makes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.compat._interpreters import install_bundle, run, set_up
from tests.compat.agent_tests import ROOT, agent_only_test_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "python.sh"
VERSIONS = ("3.9", "3.10", "3.12", "3.13")
# The Pythons without tomllib, on which the SDK's extras install nothing.
BEFORE_3_11 = ("3.9", "3.10")
# The glibc of the OS each interpreter comes from, where it is not this machine's: the
# interpreter (and the agent's child processes, started as sys.executable) must run on
# its own, through the prefix's loader.
OWN_GLIBC = {"3.12": "2.39", "3.13": "2.41"}
# numpy 2.0 (the last for 3.9) types less of its API than the numpy of the strict run;
# what this run adds is each Python's standard library, syntax and numpy, so these stay
# with that run.
LOOSER_STUBS = ("no-any-return", "no-untyped-call", "unused-ignore")

_Test = TypeVar("_Test", bound=Callable[..., None])


def cheap(test: _Test) -> _Test:
    """A check that also runs on 3.13 when EDGESHIP_PYTHONS does not name it (conftest)."""
    test.cheap = True  # type: ignore[attr-defined]
    return test


def on(*versions: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("version", versions)


@pytest.fixture
def python(version: str) -> Path:
    """The launcher of ``version``'s venv (a version nobody asked for is deselected)."""
    launcher, failure = set_up(str(SCRIPT), version)
    if launcher is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot set up CPython {version} (CI=true): {failure}")
        pytest.skip(f"CPython {version} unavailable: {failure}")
    return launcher


def test_edgeship_pythons_names_only_pythons_tested_here() -> None:
    # A typo ("3.1") or a Python without an archive here ("3.11") would run nothing.
    named = os.environ.get("EDGESHIP_PYTHONS", "").split()
    assert set(named) <= set(VERSIONS), f"EDGESHIP_PYTHONS={named}: the choices are {VERSIONS}"


@on(*VERSIONS)
@cheap
def test_the_interpreter_is_the_oss_cpython_with_the_agents_dependencies(
    python: Path, version: str
) -> None:
    imports = "numpy, cryptography, paho.mqtt, onnxruntime" + (
        ", tomli" if version in BEFORE_3_11 else ""
    )
    child = "import platform; print(*platform.libc_ver())"
    done = run(
        python,
        "-c",
        f"import platform, subprocess, sys, {imports};"
        "print(sys.implementation.name, *sys.version_info[:2]);"
        "print(*platform.libc_ver());"
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)",
        timeout_s=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["cpython", *version.split(".")]
    if version in OWN_GLIBC:
        assert lines[1:] == [f"glibc {OWN_GLIBC[version]}"] * 2


@pytest.mark.parametrize(
    ("version", "target"),
    # Each against the numpy pip gives that Python (2.0 on 3.9, 2.5 on 3.12 and 3.13; the
    # strict run has 3.11's); on 3.9's interpreter for 3.10 too, as it has always run.
    [("3.9", "3.9"), ("3.9", "3.10"), ("3.10", "3.10"), ("3.12", "3.12"), ("3.13", "3.13")],
)
def test_the_agent_type_checks_with_each_pythons_numpy(
    python: Path, version: str, target: str
) -> None:
    disabled = [arg for code in LOOSER_STUBS for arg in ("--disable-error-code", code)]
    done = run(
        python,
        "-m",
        "mypy",
        "--python-version",
        target,
        "--cache-dir",
        os.devnull,  # mypy 1.x must not share the strict run's cache
        *disabled,
        "agent",
        timeout_s=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@on(*VERSIONS)
def test_the_agents_tests_pass(python: Path, version: str) -> None:
    files = [str(p.relative_to(ROOT)) for p in agent_only_test_files()]
    done = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, timeout_s=280)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary, summary
    if os.environ.get("CI") == "true":  # a missing broker or oracle fails under CI, as here
        assert "skipped" not in summary, done.stdout[-3000:]


@on(*VERSIONS)
def test_the_project_installs_with_its_extras_and_the_sdks_packages_only_from_3_11(
    python: Path, version: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    done = run(
        python,
        *("-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"),
        *("--disable-pip-version-check", "--report", str(report)),
        f"{ROOT}[onnx,sdk,oms,postgres]",
        timeout_s=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = {i["metadata"]["name"] for i in json.loads(report.read_text())["install"]}
    assert {"edgeship", "numpy", "cryptography", "paho-mqtt", "onnxruntime"} <= names
    sdk = {"onnx", "rich", "scikit-learn", "model-signing", "psycopg"}
    if version in BEFORE_3_11:
        assert "tomli" in names
        assert not names & sdk
    else:
        assert sdk <= names


@on(*BEFORE_3_11)
def test_the_edgeship_command_says_in_one_line_that_it_needs_python_3_11(
    python: Path, version: str
) -> None:
    patch = run(python, "-c", "import platform; print(platform.python_version())", timeout_s=60)
    # What the console script does: import the entry point, call it.
    done = run(python, "-c", "import sys; from sdk.cli import main; sys.exit(main())", timeout_s=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"edgeship: the SDK needs Python 3.11 or later, not {patch.stdout.strip()}; "
        "on a device, use edgeship-agent (Python 3.9 or later)"
    ]


@on(*VERSIONS)
@cheap
def test_a_bundle_built_here_installs_and_passes_its_health_check(
    python: Path, version: str, tmp_path: Path
) -> None:
    # Built by the SDK on this Python; verified, staged, health-checked in a child process
    # (onnxruntime's answers against the golden outputs) and committed by the agent there.
    assert install_bundle(python, tmp_path)["current"]["sequence"] == 1
