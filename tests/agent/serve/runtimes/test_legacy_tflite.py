"""The legacy runtime for real: tflite-runtime 2.14 with numpy 1.x, in a second venv.

Many devices still run tflite-runtime 2.14, which needs numpy < 2. This test builds (once,
cached in ``.venv-legacy`` at the repository root, git-ignored) a venv with exactly that,
plus the project installed without extras, runs ``edgeship-agent predict`` there on TFLite
models, and compares with LiteRT's answer in this process.

Creating the venv needs PyPI. Without it the test skips, except under CI=true, where it
fails: the legacy environment is a promise the project makes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.serve.runtimes import load_model
from tests.agent.serve.runtimes.conftest import Models, batch, require_runtime

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[4]
VENV = ROOT / ".venv-legacy"
REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2", "cryptography", "paho-mqtt")
# Written last: a venv without it is incomplete (an interrupted setup) and is rebuilt.
READY = VENV / ".edgeship-ready"


def _setup_failed(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot set up the legacy tflite-runtime venv (CI=true): {reason}")
    pytest.skip(f"legacy tflite-runtime venv unavailable: {reason}")


def _pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def legacy_python() -> Path:
    python = VENV / "bin" / "python"
    stamp = "\n".join(REQUIREMENTS)
    if READY.exists() and READY.read_text() == stamp and python.exists():
        return python
    if sys.version_info >= (3, 12):
        _setup_failed("tflite-runtime 2.14 has wheels for Python <= 3.11 only")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(VENV)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        _pip(python, *REQUIREMENTS)
        _pip(python, "--no-deps", "-e", str(ROOT))
    except subprocess.CalledProcessError as exc:
        _setup_failed(f"{' '.join(map(str, exc.cmd))} failed: {exc.stderr}")
    except subprocess.TimeoutExpired as exc:
        _setup_failed(f"{exc.cmd} timed out")
    READY.write_text(stamp)
    return python


def test_legacy_venv_has_numpy_1_and_tflite_runtime_only(legacy_python: Path) -> None:
    code = (
        "import json, numpy, agent.serve.runtimes as r;"
        "print(json.dumps({'numpy': numpy.__version__, 'runtimes': r.installed_runtimes()}))"
    )
    out = subprocess.run(
        [str(legacy_python), "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    found = json.loads(out.stdout)
    assert found["numpy"].startswith("1.")
    assert found["runtimes"] == {"tflite-runtime": "2.14.0"}


@pytest.mark.parametrize("which", ["tflite_mlp", "tflite_int8"])
def test_legacy_runtime_answers_like_litert(
    legacy_python: Path, models: Models, tmp_path: Path, which: str
) -> None:
    require_runtime("litert")
    manifest = getattr(models, which)
    bundle = tmp_path / "bundle"
    (bundle / "model").mkdir(parents=True)
    (bundle / manifest.model.file).write_bytes((models.dir / manifest.model.file).read_bytes())
    (bundle / "manifest.json").write_bytes(manifest.to_bytes())
    x = batch(9)
    np.save(tmp_path / "x.npy", x)

    out = subprocess.run(
        [
            str(VENV / "bin" / "edgeship-agent"),
            "predict",
            "--bundle-dir",
            str(bundle),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npz"),
            "--batch-size",
            "4",  # resizes the interpreter between calls
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runtime"] == "tflite-runtime"  # chosen from the manifest
    with np.load(tmp_path / "y.npz") as got:
        legacy = got["probs"]

    with load_model(manifest, models.dir, "litert") as model:
        expected = model.predict({"x": x})["probs"]
    assert legacy.dtype == np.float32
    # Same kernels, same float arithmetic: the answers agree to float rounding (and on the
    # quantized model, to the same integer steps).
    np.testing.assert_allclose(legacy, expected, atol=1e-6)
