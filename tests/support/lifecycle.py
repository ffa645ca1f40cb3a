"""Real bundles for lifecycle tests: a real ONNX MLP, golden inputs, onnxruntime outputs."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.bundle.manifest import Health, ModelSpec, Probation, TensorSpec, Tolerance
from agent.bundle.signing import TrustPolicy
from sdk.build.keys import SigningKey
from tests.support.bundles import (
    EXPECTED_PATH,
    GOLDEN_PATH,
    MODEL_PATH,
    BundleParts,
    make_key,
    make_manifest,
    make_policy,
)
from tests.support.models import make_onnx_mlp

N_IN = 8
N_OUT = 4
KEY = make_key("lifecycle")
POLICY: TrustPolicy = make_policy(KEY)
# Commit at once: most tests drive probation explicitly.
NO_WAIT = Probation(requests=0, seconds=0.0, max_error_rate=0.0)


def golden_inputs() -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((5, N_IN)).astype(np.float32)}


def _npz(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def reference_outputs(model: Path, inputs: dict[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    result: npt.NDArray[Any] = session.run(["probs"], inputs)[0]
    return result


@dataclass(frozen=True)
class LifecycleBundle:
    path: Path  # the bundle file
    seed: int  # which weights: answers differ between seeds
    sequence: int
    outputs: npt.NDArray[Any]  # what the model answers on golden_inputs()


def make_model_bundle(
    directory: Path,
    *,
    seed: int,
    sequence: int,
    probation: Probation = NO_WAIT,
    latency_budget_p95_ms: float | None = None,
    expected_shift: float = 0.0,
    key: SigningKey = KEY,
    n_hidden: int = 16,
    model: Path | None = None,
    **overrides: Any,
) -> LifecycleBundle:
    """A signed bundle of a real MLP (or of ``model``, an ONNX file with ``x`` in and
    ``probs`` out); ``expected_shift`` makes its golden outputs wrong."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = make_onnx_mlp(
            directory / f"model-{seed}.onnx", n_in=N_IN, n_hidden=n_hidden, n_out=N_OUT, seed=seed
        )
    inputs = golden_inputs()
    outputs = reference_outputs(model, inputs)
    payload = {
        MODEL_PATH: model.read_bytes(),
        GOLDEN_PATH: _npz(inputs),
        EXPECTED_PATH: _npz({"probs": outputs + np.float32(expected_shift)}),
    }
    manifest = make_manifest(
        payload,
        name="mlp",
        version=f"1.{sequence}",
        sequence=sequence,
        model=ModelSpec(
            format="onnx",
            file=MODEL_PATH,
            inputs=(TensorSpec("x", "float32", (None, N_IN)),),
            outputs=(TensorSpec("probs", "float32", (None, N_OUT)),),
        ),
        health=Health(
            GOLDEN_PATH,
            EXPECTED_PATH,
            Tolerance(atol=1e-5, rtol=1e-4),
            latency_budget_p95_ms=latency_budget_p95_ms,
            probation=probation,
        ),
        **overrides,
    )
    path = directory / f"bundle-{seed}-{sequence}-{expected_shift}.bundle"
    path.write_bytes(BundleParts(manifest=manifest, payload=payload, keys=(key,)).to_bytes())
    return LifecycleBundle(path, seed, sequence, outputs)
