"""Signed bundles whose golden outputs come from a chosen implementation, for the
execution-provider tests: with expected outputs computed on the CPU path and a zero
tolerance, an accelerator whose kernels round differently misses the tolerance for real.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle import manifest as m
from tests.support.bundles import EXPECTED_PATH, GOLDEN_PATH, BundleParts, make_manifest
from tests.support.lifecycle import KEY, NO_WAIT

__all__ = ["golden_batch", "make_provider_bundle", "provider_payload"]


def golden_batch(n_in: int | tuple[int, ...]) -> dict[str, npt.NDArray[np.float32]]:
    """Five samples of ``n_in`` features (or of that shape)."""
    shape = (n_in,) if isinstance(n_in, int) else n_in
    return {"x": np.random.default_rng(7).standard_normal((5, *shape)).astype(np.float32)}


def _npz(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def provider_payload(
    model: Path,
    *,
    expected: npt.NDArray[Any],
    tolerance: m.Tolerance,
    n_in: int | tuple[int, ...],
    sequence: int = 1,
) -> tuple[m.Manifest, dict[str, bytes]]:
    """The manifest and files of a bundle of the float MLP or conv net ``model`` (ONNX or
    TFLite, ``x`` -> ``probs``) whose golden request is :func:`golden_batch` and whose
    expected output is ``expected``.
    """
    onnx = model.suffix == ".onnx"
    member = "model/model.onnx" if onnx else "model/model.tflite"
    payload = {
        member: model.read_bytes(),
        GOLDEN_PATH: _npz(golden_batch(n_in)),
        EXPECTED_PATH: _npz({"probs": expected}),
    }
    runtime = (
        m.RuntimeRequirement("onnxruntime", "1.17") if onnx else m.RuntimeRequirement("litert")
    )
    manifest = make_manifest(
        payload,
        name="mlp",
        version=f"1.{sequence}",
        sequence=sequence,
        compatibility=m.Compatibility(runtimes=(runtime,)),
        model=m.ModelSpec(
            format="onnx" if onnx else "tflite",
            file=member,
            inputs=(m.TensorSpec("x", "float32", (None, *golden_batch(n_in)["x"].shape[1:])),),
            outputs=(m.TensorSpec("probs", "float32", (None, expected.shape[1])),),
        ),
        health=m.Health(GOLDEN_PATH, EXPECTED_PATH, tolerance, probation=NO_WAIT),
    )
    return manifest, payload


def make_provider_bundle(
    path: Path,
    model: Path,
    *,
    expected: npt.NDArray[Any],
    tolerance: m.Tolerance,
    n_in: int,
    sequence: int = 1,
) -> Path:
    """Write the signed bundle of :func:`provider_payload` to ``path``."""
    manifest, payload = provider_payload(
        model, expected=expected, tolerance=tolerance, n_in=n_in, sequence=sequence
    )
    path.write_bytes(BundleParts(manifest=manifest, payload=payload, keys=(KEY,)).to_bytes())
    return path
