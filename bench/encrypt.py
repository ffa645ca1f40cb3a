"""What payload encryption costs at activation: load time and peak memory, plain vs encrypted.

A large ONNX MLP (``--hidden`` inputs and hidden units: about 4 * hidden^2 bytes of
weights) is bundled twice
by the SDK, plain and ``--encrypt-for`` one device key; each bundle is verified and
extracted once. Then, alternating, ``load_model`` of each (the encrypted one reads the
ciphertext, unwraps the data key and decrypts in memory) is timed, median of ``--runs``;
peak RSS of one load is measured in a fresh child process per variant. The baseline is
the plain load in the same run.

    python bench/encrypt.py [--hidden 4096] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import verify_bundle
from agent.bundle.crypto import DeviceKey
from agent.bundle.signing import TrustPolicy
from agent.serve.runtimes import load_model
from bench._machine import machine
from sdk.build._bundle import BuildMetadata, build_bundle
from sdk.build.keys import generate_key
from tests.support.models import make_onnx_mlp

_PEAK = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from agent.bundle.manifest import Manifest
from agent.bundle.crypto import DeviceKey
from agent.serve.runtimes import load_model
d = Path({directory!r})
m = Manifest.from_bytes((d / "manifest.json").read_bytes())
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
import onnxruntime  # imported before the baseline: only the load is measured
before = status("VmRSS:")
key = DeviceKey.load(Path({key!r})) if {encrypted!r} else None
model = load_model(m, d, "onnxruntime", key=key)
print(status("VmHWM:") - before)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        signing = generate_key(t / "release", b"bench")
        device = DeviceKey.generate()
        device.save(t / "device.key")
        model = make_onnx_mlp(t / "mlp.onnx", n_in=args.hidden, n_hidden=args.hidden)
        policy = TrustPolicy.of([signing.public])
        dirs = {}
        for variant, recipients in (("plain", []), ("encrypted", [device.public])):
            result = build_bundle(
                model,
                t / f"{variant}.edgeship",
                metadata=BuildMetadata(name="bench", version="1", sequence=1),
                keys=[signing],
                encrypt_for=recipients,
            )
            with result.path.open("rb") as f:
                v = verify_bundle(f, policy, now=datetime.now(UTC), extract_to=t / variant)
            dirs[variant] = (v.manifest, t / variant)
        times: dict[str, list[float]] = {"plain": [], "encrypted": []}
        for _ in range(args.runs):
            for variant, (manifest, directory) in dirs.items():
                key = device if variant == "encrypted" else None
                start = time.perf_counter()
                loaded = load_model(manifest, directory, "onnxruntime", key=key)
                times[variant].append(time.perf_counter() - start)
                loaded.close()
        peak = {}
        for variant, (_, directory) in dirs.items():
            code = _PEAK.format(
                root=root,
                directory=str(directory),
                key=str(t / "device.key"),
                encrypted=variant == "encrypted",
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            peak[variant] = round(float(out.stdout.strip().splitlines()[-1]), 1)
        size = (dirs["plain"][1] / dirs["plain"][0].model.file).stat().st_size
    plain, encrypted = statistics.median(times["plain"]), statistics.median(times["encrypted"])
    print(
        json.dumps(
            {
                "machine": machine(),
                "model_mib": round(size / 2**20, 1),
                "load_ms_median": {
                    "plain": round(plain * 1000, 1),
                    "encrypted": round(encrypted * 1000, 1),
                },
                "load_time_ratio": round(encrypted / plain, 3),
                "decrypt_mib_per_s": round(size / 2**20 / max(encrypted - plain, 1e-9), 1),
                "peak_rss_growth_mib_one_load": peak,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
