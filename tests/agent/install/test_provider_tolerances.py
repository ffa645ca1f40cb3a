"""The health gate holds an output to the tolerance measured for the provider it runs on.

Real onnxruntime sessions on the CPU execution provider; only the expected outputs are
chosen: the model's own answers shifted by a known amount, so that the plain tolerance
misses and a recorded per-provider tolerance admits (or does not admit) the shift.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest, Tolerance
from agent.errors import HealthCheckError
from agent.install import check_health
from agent.serve.runtimes import Model, RuntimeOptions, load_model
from tests.support.bundles import NOW, BundleParts
from tests.support.lifecycle import KEY, POLICY, reference_outputs
from tests.support.models import make_onnx_mlp
from tests.support.provider_bundles import golden_batch, provider_payload

CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
PLAIN = Tolerance(atol=1e-5, rtol=1e-4)
SHIFT = 0.01  # what the expected outputs are moved by


def _staged(
    tmp_path: Path, tables: dict[str, dict[str, Tolerance]], shift: float = SHIFT
) -> tuple[Model, Manifest, Path]:
    """A verified, extracted bundle of a real MLP whose expected outputs are its own
    answers plus ``shift``, with ``tables`` as its per-provider tolerances; the model
    loaded on the CPU execution provider."""
    source = make_onnx_mlp(tmp_path / "mlp.onnx", n_in=8, n_out=4)
    expected = reference_outputs(source, golden_batch(8)) + np.float32(shift)
    manifest, payload = provider_payload(source, expected=expected, tolerance=PLAIN, n_in=8)
    manifest = replace(manifest, health=replace(manifest.health, provider_tolerances=tables))
    bundle = BundleParts(manifest=manifest, payload=payload, keys=(KEY,)).to_bytes()
    (tmp_path / "b.bundle").write_bytes(bundle)
    target = tmp_path / "v"
    with (tmp_path / "b.bundle").open("rb") as f:
        verified = verify_bundle(f, POLICY, now=NOW, extract_to=target)
    options = RuntimeOptions(providers=(CPU,))
    return load_model(verified.manifest, target, "onnxruntime", options), verified.manifest, target


def test_a_measured_tolerance_admits_on_its_provider_what_the_plain_one_refuses(
    tmp_path: Path,
) -> None:
    model, manifest, target = _staged(tmp_path, {CPU: {"probs": Tolerance(atol=2 * SHIFT)}})
    with model:
        with pytest.raises(HealthCheckError, match=r"'probs' deviates by 0\.01"):
            # On a provider the table does not name: the plain tolerance.
            check_health(model, manifest, target, runs=1, provider=OPENVINO)
        report = check_health(model, manifest, target, runs=1, provider=CPU)
    assert report.worst_output == "probs"
    assert report.max_abs_deviation == pytest.approx(SHIFT, rel=1e-3)


def test_a_deviation_beyond_the_measured_tolerance_fails_and_says_whose_it_was(
    tmp_path: Path,
) -> None:
    tables = {CPU: {"probs": Tolerance(atol=SHIFT / 2)}}
    model, manifest, target = _staged(tmp_path, tables)
    with (
        model,
        pytest.raises(
            HealthCheckError,
            match=r"deviates by 0\.01\d* where 0\.005 is allowed .*measured for CPUExecution",
        ),
    ):
        check_health(model, manifest, target, runs=1, provider=CPU)


def test_the_tolerance_measured_for_another_provider_does_not_apply(tmp_path: Path) -> None:
    model, manifest, target = _staged(tmp_path, {OPENVINO: {"probs": Tolerance(atol=1.0)}})
    with (
        model,
        pytest.raises(HealthCheckError, match=r"allowed \(atol 1e-05, rtol 0.0001\)") as caught,
    ):
        check_health(model, manifest, target, runs=1, provider=CPU)
    assert "measured for" not in str(caught.value)


def test_the_gate_reads_the_provider_from_the_loaded_model(tmp_path: Path) -> None:
    # What the gate's child does: it passes no provider; the model it loaded knows it.
    model, manifest, target = _staged(tmp_path, {CPU: {"probs": Tolerance(atol=2 * SHIFT)}})
    with model:
        check_health(model, manifest, target, runs=1)
