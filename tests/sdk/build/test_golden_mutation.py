"""The golden tolerance has teeth: the device's real health gate (the child process the
agent runs) fails a bundle whose model was damaged a little, and passes the original.

A damaged bundle is the signed bundle with its model file replaced by the same build of
a mutated float model (a few weights perturbed, or one layer zeroed), which is what a
corrupted download, a wrong export or a bad merge looks like to the device.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.errors import HealthCheckError
from agent.install import ChildGate, check_in_child
from sdk.build import BuildMetadata, QuantizeOptions, SigningKey, build_bundle, generate_key
from sdk.build import quantize as run_quantizer
from sdk.build.datasets import Dataset
from tests.support.models import make_onnx_mlp
from tests.support.mutations import perturb_weights, zero_largest_layer

Built = tuple[Path, Path, Path, Manifest]  # float model, calibration, extracted, manifest
Mutation = Callable[[Path, Path], Path]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """(float model, calibration file, extracted static-int8 bundle, its manifest)."""
    d = tmp_path_factory.mktemp("mutation")
    key: SigningKey = generate_key(d / "release", b"secret")
    model = make_onnx_mlp(d / "mlp.onnx")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.standard_normal((64, 64)).astype(np.float32))
    np.save(d / "golden.npy", rng.standard_normal((8, 64)).astype(np.float32))
    result = build_bundle(
        model,
        d / "b.edgeship",
        metadata=BuildMetadata(name="mlp", version="1", sequence=1),
        keys=[key],
        golden_inputs=d / "golden.npy",
        # int8 does not pay on a model this small; the gate is not what is tested here.
        quantize=QuantizeOptions("static", calibration=d / "calib.npy", max_latency_ratio=None),
    )
    with result.path.open("rb") as f:
        verify_bundle(f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=d / "x")
    return model, d / "calib.npy", d / "x", result.manifest


def test_the_original_bundle_passes_the_device_gate(built: Built) -> None:
    _, _, extracted, manifest = built
    check_in_child(manifest, extracted, ChildGate("onnxruntime"), runs=1)


@pytest.mark.parametrize("mutate", [perturb_weights, zero_largest_layer])
def test_a_bundle_with_damaged_weights_fails_the_device_gate(
    built: Built, tmp_path: Path, mutate: Mutation
) -> None:
    model, calibration, extracted, manifest = built
    target = tmp_path / "x"
    shutil.copytree(extracted, target)
    damaged = mutate(model, tmp_path / "damaged.onnx")
    requantized = run_quantizer(
        damaged,
        tmp_path / "damaged_q.onnx",
        scheme="static",
        calibration=Dataset({"x": np.load(calibration)}),
    )
    shutil.copyfile(requantized.path, target / manifest.model.file)
    with pytest.raises(HealthCheckError, match="golden outputs do not match"):
        check_in_child(manifest, target, ChildGate("onnxruntime"), runs=1)
