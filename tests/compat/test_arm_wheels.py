"""The agent's dependencies resolve on ARM from PyPI, and its gaps are the known ones.

Every requirement of the core and the runtime extras is resolved by pip for aarch64 and
armv7l on each supported Python (tests/compat/arm_wheels.py). A requirement without a
wheel where none is listed below fails the test (a new dependency without ARM wheels, a
release that dropped a platform), and so does one listed that gained a wheel: the README's
device table says what works, and must stay true.

Needs PyPI. Without it the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import os

import pytest
from packaging.requirements import Requirement

from tests.compat.arm_wheels import PYTHONS, Resolution, resolve_all, table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OLD = ("3.9",)
NEW = ("3.12", "3.13")
# (extra, package, arch) -> the Pythons on which PyPI has no wheel for it (README:
# "Device support"). armv7l devices take numpy (and with it onnxruntime's and LiteRT's
# absence) from piwheels or apt, which this check does not reach.
NO_WHEEL: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("core", "numpy", "armv7l"): PYTHONS,
    ("core", "cryptography", "armv7l"): OLD,
    ("onnx", "onnxruntime", "armv7l"): PYTHONS,
    ("litert", "ai-edge-litert", "armv7l"): PYTHONS,
    ("tflite", "tflite-runtime", "aarch64"): NEW,
    ("tflite", "tflite-runtime", "armv7l"): NEW,
    ("tflite", "numpy", "aarch64"): ("3.13",),
}


def _key(r: Resolution) -> tuple[str, str, str]:
    return r.group, Requirement(r.requirement).name, r.arch


@pytest.fixture(scope="module")
def resolutions() -> list[Resolution]:
    results = resolve_all()
    if all(r.error for r in results if r.group == "core"):
        reason = next(r.error for r in results)
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot resolve from PyPI (CI=true): {reason}")
        pytest.skip(f"PyPI unreachable: {reason}")
    return results


def test_every_supported_python_and_arm_arch_was_resolved(
    resolutions: list[Resolution],
) -> None:
    assert {(r.python, r.arch) for r in resolutions} == {
        (p, a) for p in PYTHONS for a in ("aarch64", "armv7l")
    }


def test_only_the_known_gaps_lack_arm_wheels(resolutions: list[Resolution]) -> None:
    missing: dict[tuple[str, str, str], set[str]] = {}
    for r in resolutions:
        if not r.version:
            missing.setdefault(_key(r), set()).add(r.python)
    expected = {k: set(v) for k, v in NO_WHEEL.items()}
    errors = {_key(r): r.error for r in resolutions if r.error}
    assert missing == expected, f"{table(resolutions)}\n\npip said: {errors}"
