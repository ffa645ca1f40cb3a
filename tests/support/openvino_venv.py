"""A virtual environment with ``onnxruntime-openvino``, for the execution-provider tests.

``onnxruntime-openvino`` installs the ``onnxruntime`` module itself (with the OpenVINO
execution provider next to the CPU one), so it cannot live in the main venv beside the
plain ``onnxruntime``. It is built once, under the user's cache directory, with the agent
installed without dependencies (editable, so it runs this tree) and its light
dependencies. Creating it needs PyPI: without it the caller skips, except under CI=true,
where it fails, because the fallback tests must run somewhere.

Run ``python -m tests.support.openvino_venv`` to build it and print how long it took and
how large it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

__all__ = ["OPENVINO_REQUIREMENTS", "openvino_python"]

ROOT = Path(__file__).resolve().parents[2]
# Pinned: the OpenVINO runtime comes bundled in the wheel (67 MiB for 1.23.0 on CPython
# 3.11 x86_64, against 81 MiB for 1.24.1), and its kernels must stay the ones the
# tolerance test was written against.
OPENVINO_REQUIREMENTS = ("onnxruntime-openvino==1.23.0", "numpy<3", "cryptography", "paho-mqtt")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return Path(base) / "edgeship-tests" / f"venv-openvino-{tag}"


def _setup_failed(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot set up the onnxruntime-openvino venv (CI=true): {reason}")
    pytest.skip(f"onnxruntime-openvino venv unavailable: {reason}")


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=900)


def _build(venv: Path) -> Path:
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "venv", "--clear", str(venv))
    pip = (str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, "--no-cache-dir", *OPENVINO_REQUIREMENTS)
    _run(*pip, "--no-deps", "-e", str(ROOT))
    return python


def openvino_python() -> Path:
    """The venv's interpreter, building the venv first if it is missing or stale.

    Raises:
        pytest.fail.Exception: under CI=true, the venv cannot be built.
        pytest.skip.Exception: elsewhere, the venv cannot be built.
    """
    venv = _cache_dir()
    python = venv / "bin" / "python"
    ready = venv / ".edgeship-ready"  # written last: an interrupted build is rebuilt
    stamp = f"{ROOT}\n" + "\n".join(OPENVINO_REQUIREMENTS)
    if ready.exists() and ready.read_text() == stamp and python.exists():
        return python
    try:
        _build(venv)
    except subprocess.CalledProcessError as exc:
        _setup_failed(f"{' '.join(map(str, exc.cmd))} failed: {exc.stderr[-2000:]}")
    except subprocess.TimeoutExpired as exc:
        _setup_failed(f"{exc.cmd} timed out")
    except OSError as exc:
        _setup_failed(str(exc))
    ready.write_text(stamp)
    return python


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


if __name__ == "__main__":
    target = _cache_dir()
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    openvino_python()
    print(f"built {target} in {time.monotonic() - started:.1f} s, {_size_mib(target):.0f} MiB")
