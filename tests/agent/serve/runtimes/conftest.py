"""Real models on disk and manifests describing them, shared by the runtime tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import (
    Compatibility,
    Manifest,
    ModelSpec,
    QuantParams,
    RuntimeRequirement,
    TensorSpec,
)
from agent.serve.runtimes import installed_runtimes
from tests.support.bundles import EXPECTED_PATH, GOLDEN_PATH, make_manifest
from tests.support.models import (
    make_onnx_conv,
    make_onnx_int8_mlp,
    make_onnx_mlp,
    make_tflite_int8_mlp,
    make_tflite_mlp,
    mlp_reference,
    mlp_weights,
)

CONV_SIZE = 32  # the conv net at 32x32: same graph as the 224 one, fast to run
IN_Q = QuantParams(scale=0.05, zero_point=0)
OUT_Q = QuantParams(scale=1 / 256, zero_point=-128)
UINT8_IN_Q = QuantParams(scale=0.05, zero_point=128)
UINT8_OUT_Q = QuantParams(scale=1 / 256, zero_point=0)


def require_runtime(name: str) -> None:
    """Skip when ``name`` is not installed, but fail under CI, where it must be."""
    if name not in installed_runtimes():
        if os.environ.get("CI") == "true":
            pytest.fail(f"runtime {name} is not installed, and CI=true requires it")
        pytest.skip(f"runtime {name} is not installed")


def mlp_spec(
    fmt: str,
    file: str,
    dtype: str = "float32",
    q_in: QuantParams | None = None,
    q_out: QuantParams | None = None,
) -> ModelSpec:
    return ModelSpec(
        format=fmt,  # type: ignore[arg-type]
        file=file,
        inputs=(TensorSpec("x", dtype, (None, 64), q_in),),
        outputs=(TensorSpec("probs", dtype, (None, 10), q_out),),
    )


def manifest_for(spec: ModelSpec, model_dir: Path) -> Manifest:
    """A manifest that parses back from its bytes: its files list the model in ``model_dir``."""
    runtime = "onnxruntime" if spec.format == "onnx" else "litert"
    payload = {spec.file: model_dir / spec.file, GOLDEN_PATH: b"golden", EXPECTED_PATH: b"exp"}
    return make_manifest(
        payload,
        model=spec,
        compatibility=Compatibility(
            runtimes=(RuntimeRequirement(runtime), RuntimeRequirement("tflite-runtime"))
            if runtime == "litert"
            else (RuntimeRequirement(runtime),)
        ),
    )


@dataclass(frozen=True)
class Models:
    dir: Path
    onnx_mlp: Manifest
    tflite_mlp: Manifest
    onnx_conv: Manifest
    onnx_int8: Manifest
    tflite_int8: Manifest
    tflite_uint8: Manifest


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("models")
    make_onnx_mlp(d / "model/mlp.onnx")
    make_tflite_mlp(d / "model/mlp.tflite")
    make_onnx_conv(d / "model/conv.onnx", size=CONV_SIZE)
    make_onnx_int8_mlp(d / "model/int8.onnx")
    make_tflite_int8_mlp(d / "model/int8.tflite")
    make_tflite_int8_mlp(
        d / "model/uint8.tflite", io_type="uint8", in_zero_point=128, out_zero_point=0
    )
    conv = ModelSpec(
        format="onnx",
        file="model/conv.onnx",
        inputs=(TensorSpec("x", "float32", (None, 3, CONV_SIZE, CONV_SIZE)),),
        outputs=(TensorSpec("probs", "float32", (None, 10)),),
    )
    return Models(
        dir=d,
        onnx_mlp=manifest_for(mlp_spec("onnx", "model/mlp.onnx"), d),
        tflite_mlp=manifest_for(mlp_spec("tflite", "model/mlp.tflite"), d),
        onnx_conv=manifest_for(conv, d),
        onnx_int8=manifest_for(mlp_spec("onnx", "model/int8.onnx", "int8", IN_Q, OUT_Q), d),
        tflite_int8=manifest_for(mlp_spec("tflite", "model/int8.tflite", "int8", IN_Q, OUT_Q), d),
        tflite_uint8=manifest_for(
            mlp_spec("tflite", "model/uint8.tflite", "uint8", UINT8_IN_Q, UINT8_OUT_Q), d
        ),
    )


def reference(x: np.ndarray) -> np.ndarray:
    """What the default-seed MLP must answer for ``x``."""
    return mlp_reference(x, mlp_weights(64, 32, 10, 0))


def batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)
