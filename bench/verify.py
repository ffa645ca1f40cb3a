"""Bundle verification speed and memory, as JSON.

Builds a bundle with a large payload (default 1 GiB) on disk with ``write_bundle`` and
compares, in the same run and from the same page-cache-warm file:

* ``verify_bundle`` (streaming, every member hashed) against
* a plain ``hashlib.sha256`` over the same file, read with a 1 MiB buffer.

``throughput_ratio`` = sha256 time / verify time (best of N, and median of N); the target
is >= 0.8. Peak RSS growth during verification is measured in a child process from
/proc/self/status VmHWM before and after (target < 64 MiB), without and with extraction.

Usage: python bench/verify.py [--size-mib 1024] [--runs 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.bundle import Limits, verify_bundle, write_bundle
from agent.bundle.manifest import (
    PAYLOAD_TYPE,
    Compatibility,
    FileEntry,
    Health,
    Manifest,
    ModelSpec,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.bundle.signing import TrustPolicy
from bench._machine import machine
from sdk.build.keys import SigningKey, sign_envelope

CHUNK = 1024**2
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _policy(workdir: Path) -> TrustPolicy:
    return TrustPolicy.from_toml((workdir / "policy.toml").read_bytes())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _verify(path: Path, policy: TrustPolicy, extract_to: Path | None = None) -> None:
    with path.open("rb") as f:
        verify_bundle(
            f, policy, now=NOW, limits=Limits(max_bundle_bytes=2**40), extract_to=extract_to
        )


def _build(workdir: Path, size: int) -> Path:
    payload_file = workdir / "model.bin"
    block = os.urandom(CHUNK)
    with payload_file.open("wb") as f:
        for _ in range(size // CHUNK):
            f.write(block)
        f.write(block[: size % CHUNK])
    (workdir / "g.npz").write_bytes(b"g")
    (workdir / "e.npz").write_bytes(b"e")
    payload = {
        "health/expected_outputs.npz": workdir / "e.npz",
        "health/golden_inputs.npz": workdir / "g.npz",
        "model/model.onnx": payload_file,
    }
    files = tuple(FileEntry(p, f.stat().st_size, _sha256_file(f)) for p, f in payload.items())
    manifest = Manifest(
        name="bench",
        version="1.0.0",
        sequence=1,
        created=NOW,
        compatibility=Compatibility(runtimes=(RuntimeRequirement("onnxruntime"),)),
        model=ModelSpec(
            "onnx",
            "model/model.onnx",
            (TensorSpec("x", "float32", (None, 4)),),
            (TensorSpec("y", "float32", (None, 2)),),
        ),
        health=Health("health/golden_inputs.npz", "health/expected_outputs.npz", Tolerance(1e-4)),
        files=files,
    ).to_bytes()
    key = SigningKey(ed25519.Ed25519PrivateKey.generate())
    (workdir / "policy.toml").write_bytes(TrustPolicy.of([key.public]).to_toml())
    envelope = sign_envelope(PAYLOAD_TYPE, manifest, [key]).to_bytes()
    bundle = workdir / "bundle.tar"
    with bundle.open("wb") as out:
        write_bundle(out, manifest, envelope, payload)
    payload_file.unlink()  # only the bundle is needed from here on
    return bundle


def _child(bundle: Path, extract: bool) -> None:
    """Run in a fresh process: report VmHWM growth over one verification."""
    policy = _policy(bundle.parent)  # loaded before the baseline: not part of verification
    before = _vm_hwm_kib()
    if extract:
        with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:
            target = Path(tmp) / "x"
            _verify(bundle, policy, target)
            for p in [target, *target.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
    else:
        _verify(bundle, policy)
    after = _vm_hwm_kib()
    print(json.dumps({"before_kib": before, "after_kib": after}))


def _rss_growth_mib(bundle: Path, extract: bool) -> float:
    cmd = [sys.executable, __file__, "--child", str(bundle)] + (["--extract"] if extract else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    return (result["after_kib"] - result["before_kib"]) / 1024


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--extract", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.extract)
        return

    workdir = Path(tempfile.mkdtemp(prefix="edgeship-bench-", dir=args.dir))
    try:
        bundle = _build(workdir, args.size_mib * CHUNK)
        policy = _policy(workdir)
        _sha256_file(bundle)  # warm the page cache once, for both contenders
        sha_times, verify_times = [], []
        for _ in range(args.runs):  # interleaved, so drift affects both alike
            t0 = time.perf_counter()
            _sha256_file(bundle)
            sha_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _verify(bundle, policy)
            verify_times.append(time.perf_counter() - t0)
        size = bundle.stat().st_size
        best_ratio = min(sha_times) / min(verify_times)
        median_ratio = statistics.median(sha_times) / statistics.median(verify_times)
        report = {
            "payload_mib": args.size_mib,
            "bundle_bytes": size,
            "runs": args.runs,
            "sha256_seconds": [round(t, 3) for t in sha_times],
            "verify_seconds": [round(t, 3) for t in verify_times],
            "sha256_mib_per_s_best": round(size / CHUNK / min(sha_times), 1),
            "verify_mib_per_s_best": round(size / CHUNK / min(verify_times), 1),
            "throughput_ratio_best": round(best_ratio, 3),
            "throughput_ratio_median": round(median_ratio, 3),
            "throughput_ratio_target": 0.8,
            "peak_rss_growth_mib_verify": round(_rss_growth_mib(bundle, extract=False), 1),
            "peak_rss_growth_mib_verify_extract": round(_rss_growth_mib(bundle, extract=True), 1),
            "peak_rss_growth_target_mib": 64,
            "machine": machine(),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
