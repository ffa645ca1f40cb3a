"""The OpenVINO execution provider for real: it serves, or the gate falls back to the CPU.

``onnxruntime-openvino`` replaces the ``onnxruntime`` module, so these run in a venv of
their own (tests/support/openvino_venv.py, built once under the user's cache directory;
under CI=true a failure to build it fails the test). The agent there installs real
bundles with ``providers = [OpenVINOExecutionProvider, CPUExecutionProvider]``
(tests/support/provider_driver.py): OpenVINO's CPU plugin is a second implementation
with kernels of its own, whose float answers differ from the CPU execution provider's
by a few 1e-8 on this MLP, so a zero tolerance makes it miss for real.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle.manifest import Tolerance
from tests.support.lifecycle import POLICY
from tests.support.models import make_onnx_mlp
from tests.support.openvino_venv import ROOT, openvino_python
from tests.support.provider_bundles import golden_batch, make_provider_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_IN = 64
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
OPTIONS = {OPENVINO: {"device_type": "CPU"}}


def _driver(python: Path, *args: str) -> str:
    cmd = [str(python), "-m", "tests.support.provider_driver", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three installs in the OpenVINO venv: within tolerance, missing it, failing to start."""
    python = openvino_python()
    d = tmp_path_factory.mktemp("openvino")
    model = make_onnx_mlp(d / "mlp.onnx", n_in=N_IN)
    np.save(d / "x.npy", golden_batch(N_IN)["x"])
    _driver(python, "outputs", str(model), str(d / "x.npy"), str(d / "answers.npz"))
    with np.load(d / "answers.npz") as answers:
        cpu, openvino = answers[CPU], answers[OPENVINO]
    # The premise of the tolerance job: OpenVINO's kernels round differently.
    assert 0 < np.abs(openvino - cpu).max() < 1e-5
    exact = Tolerance(atol=0.0, rtol=0.0)
    loose = Tolerance(atol=1e-5, rtol=1e-4)
    (d / "policy.toml").write_bytes(POLICY.to_toml())
    jobs = {}
    for name, tolerance, options in (
        ("passes", loose, OPTIONS),
        ("misses", exact, OPTIONS),
        # OpenVINO's CPU plugin refuses FP16; onnxruntime then quietly runs on the CPU EP.
        ("fails-to-start", loose, {OPENVINO: {"device_type": "CPU", "precision": "FP16"}}),
    ):
        bundle = make_provider_bundle(
            d / f"{name}.bundle", model, expected=cpu, tolerance=tolerance, n_in=N_IN
        )
        jobs[name] = {
            "state_dir": str(d / name),
            "policy": str(d / "policy.toml"),
            "bundle": str(bundle),
            "options": {"providers": [OPENVINO, CPU], "provider_options": options},
        }
    (d / "jobs.json").write_text(json.dumps(jobs))
    result: dict[str, Any] = json.loads(_driver(python, "install", str(d / "jobs.json")))
    return result


def _of(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [fields for k, fields in result["events"] if k == kind]


def _served_on(r: dict[str, Any]) -> str:
    """The provider that serves, after checking that every report names it: the gate's
    event, the state's ``serving``, the session itself, and the session after a restart."""
    assert r["error"] is None
    provider: str = r["provider"]
    assert _of(r, "health-check-passed")[0]["provider"] == provider
    assert r["serving"]["provider"] == r["restarted_provider"] == provider
    return provider


def test_openvino_within_tolerance_serves_and_is_reported(installs: dict[str, Any]) -> None:
    assert _served_on(installs["passes"]) == OPENVINO
    assert _of(installs["passes"], "provider-fallback") == []


def test_openvino_missing_the_tolerance_falls_back_to_cpu(installs: dict[str, Any]) -> None:
    r = installs["misses"]
    (fallback,) = _of(r, "provider-fallback")
    assert (fallback["provider"], fallback["next"]) == (OPENVINO, CPU)
    assert "golden outputs do not match" in fallback["reason"]
    # Never on the provider that missed: neither now nor after a restart.
    assert _served_on(r) == CPU


def test_openvino_failing_to_start_falls_back_to_cpu(installs: dict[str, Any]) -> None:
    (fallback,) = _of(installs["fails-to-start"], "provider-fallback")
    assert fallback["provider"] == OPENVINO
    assert f"did not start {OPENVINO}" in fallback["reason"]
    assert _served_on(installs["fails-to-start"]) == CPU
