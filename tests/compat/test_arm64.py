"""The agent on aarch64, under emulation: Debian 12's arm64 CPython 3.11 run by qemu.

Most devices are ARM, and tests/compat/test_arm_wheels.py only shows that pip finds
aarch64 wheels. scripts/arm64.sh unpacks qemu-aarch64-static and an arm64 sysroot from
Debian's archive into ~/.cache/edgeship (never installed system-wide) and gives the
aarch64 interpreter a venv with the agent's dependencies and its onnx and litert extras
as pip resolves them on aarch64. There the wheels' native code (onnxruntime's and
LiteRT's C++, cryptography's Rust, numpy's kernels) runs a model for real, and a bundle
the SDK builds here installs through the agent's command line, its health gate in an
aarch64 child process.

Emulation costs a minute here, and the first set-up two more (the downloads, and pip
under emulation): more than CI's budget allows, so these run only when asked,
EDGESHIP_ARM64=1 pytest tests/compat/test_arm64.py (otherwise tests/compat/conftest.py
deselects them). Asked, a set-up that fails (no network) fails the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.compat._interpreters import install_bundle, run, set_up
from tests.compat.agent_tests import ROOT
from tests.support.models import make_onnx_mlp, make_tflite_mlp, mlp_reference, mlp_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "arm64.sh"
# Two of the agent's own test files, of the 25 that need no SDK (all of which pass under
# emulation, in about 150 s together here, five times their native time): the bundle's
# .npz arrays through the aarch64 numpy and zlib, and manual acknowledgement with paho's
# threads against the host's mosquitto. About 20 s each.
AGENT_TEST_FILES = ("tests/agent/bundle/test_arrays.py", "tests/agent/plumbing/test_mqtt_ack.py")


@pytest.fixture
def arm64() -> Path:
    """The launcher of the aarch64 venv's python (deselected unless EDGESHIP_ARM64=1)."""
    launcher, failure = set_up(str(SCRIPT))
    if launcher is None:
        pytest.fail(f"cannot set up aarch64 under qemu (EDGESHIP_ARM64=1): {failure}")
    return launcher


def test_the_interpreter_is_aarch64_and_so_is_a_child_started_as_sys_executable(
    arm64: Path,
) -> None:
    # The agent starts its health-gate worker as sys.executable: a child that ran natively
    # (or as the sysroot's binary, outside the venv) would test nothing of aarch64.
    child = "import platform, sys; print(platform.machine(), sys.prefix)"
    done = run(
        arm64,
        "-c",
        "import platform, subprocess, sys;"
        "print(sys.executable);"
        "print(platform.machine(), sys.prefix);"
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)",
        timeout_s=60,
    )
    assert done.returncode == 0, done.stderr
    venv = str(arm64.parent.parent)
    assert done.stdout.splitlines() == [str(arm64), f"aarch64 {venv}", f"aarch64 {venv}"]


# The aarch64 side: every native dependency of the agent loaded, both runtimes run.
_INFER = """
import sys
import cryptography.hazmat.primitives.asymmetric.ed25519
import numpy as np
import onnxruntime
import paho.mqtt.client
from ai_edge_litert.interpreter import Interpreter

d = sys.argv[1]
x = np.load(d + "/x.npy")
session = onnxruntime.InferenceSession(d + "/mlp.onnx", providers=["CPUExecutionProvider"])
lite = Interpreter(model_path=d + "/mlp.tflite")
lite.resize_tensor_input(lite.get_input_details()[0]["index"], x.shape)
lite.allocate_tensors()
lite.set_tensor(lite.get_input_details()[0]["index"], x)
lite.invoke()
np.savez(
    d + "/out.npz",
    onnx=session.run(["probs"], {"x": x})[0],
    litert=lite.get_tensor(lite.get_output_details()[0]["index"]),
)
print(session.get_providers()[0])
"""


def test_onnxruntime_and_litert_answer_as_numpy_does_on_aarch64(
    arm64: Path, tmp_path: Path
) -> None:
    # The aarch64 wheels' kernels (NEON, and what qemu's CPU adds) against numpy's x86
    # answer for the same MLP, a batch of 8.
    make_onnx_mlp(tmp_path / "mlp.onnx", seed=3)
    make_tflite_mlp(tmp_path / "mlp.tflite", seed=3)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = run(arm64, "-c", _INFER, str(tmp_path), timeout_s=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["CPUExecutionProvider"]
    expected = mlp_reference(x, mlp_weights(64, 32, 10, seed=3))
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["onnx"], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["litert"], expected, rtol=1e-4, atol=1e-6)


def test_a_bundle_built_here_installs_and_passes_its_health_check_on_aarch64(
    arm64: Path, tmp_path: Path
) -> None:
    # Built by the SDK on this machine; verified, staged, health-checked in an aarch64
    # child process (onnxruntime's answers against the golden outputs) and committed by
    # the agent under emulation: the cross-architecture path a real rollout takes.
    status = install_bundle(arm64, tmp_path)
    assert status["current"]["sequence"] == 1
    assert status["serving"]["runtime"] == "onnxruntime"


def test_some_of_the_agents_own_tests_pass_on_aarch64(arm64: Path) -> None:
    done = run(
        arm64, "-m", "pytest", "-q", "-p", "no:cacheprovider", *AGENT_TEST_FILES, timeout_s=280
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary, summary
    assert "skipped" not in summary, done.stdout[-3000:]
