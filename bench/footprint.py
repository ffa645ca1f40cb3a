"""Resident memory of an idle agent against a bare process running the same model.

The baseline is what any application serving this model pays: a Python process that
imports onnxruntime, loads the model into an InferenceSession and runs it once. The
agent is a real ``edgeship-agent run`` subprocess serving the same model from an
installed bundle, measured idle: once with no broker configured, once with a broker
(a private mosquitto on a free loopback port) and telemetry every second. Each RSS is
the largest of several readings over a few seconds once the process is up; the agent's
cost is its RSS minus the baseline's, both measured in this run.

Targets (issue 11): idle agent at most +10 MiB over bare with no broker, at most +15 MiB
with a broker and telemetry on.

    python bench/footprint.py [--settle-s 3] [--hidden 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.install import Updater
from bench._machine import machine
from tests.support.broker import Broker
from tests.support.lifecycle import POLICY, golden_inputs, make_model_bundle

TARGETS_MIB = {"no_broker": 10.0, "broker": 15.0}

_BARE = """
import sys, time
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
session.run(None, {"x": x})
print("ready", flush=True)
time.sleep(3600)
"""
_AGENT = "from agent.cli import main; raise SystemExit(main())"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def idle_rss_mib(proc: subprocess.Popen[str], ready: str, settle_s: float) -> float:
    """Wait for ``ready`` on the process's output, then the peak RSS over ``settle_s``."""
    stream = proc.stdout if proc.stdout is not None else proc.stderr
    assert stream is not None
    deadline = time.monotonic() + 60
    for line in stream:
        if ready in line:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {ready!r} within 60 s")
    else:
        raise RuntimeError(f"the process exited before {ready!r}")
    peak = 0.0
    end = time.monotonic() + settle_s
    while time.monotonic() < end:
        peak = max(peak, rss_mib(proc.pid))
        time.sleep(0.2)
    return peak


def measure(cmd: list[str], ready: str, settle_s: float, *, stderr: bool) -> float:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL if stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
        text=True,
    )
    try:
        return idle_rss_mib(proc, ready, settle_s)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def write_config(root: Path, broker: str | None) -> Path:
    (root / "trust.toml").write_bytes(POLICY.to_toml())
    lines = [
        'device_id = "bench-1"',
        f'state_dir = "{root / "state"}"',
        f'trust_policy = "{root / "trust.toml"}"',
    ]
    if broker is not None:
        lines += ["", "[broker]", f'url = "{broker}"', "", "[telemetry]", "interval_s = 1.0"]
    config = root / ("agent-broker.toml" if broker else "agent.toml")
    config.write_text("\n".join(lines) + "\n")
    return config


def run(settle_s: float, hidden: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeship-footprint-") as tmp:
        root = Path(tmp)
        bundle = make_model_bundle(root / "src", seed=1, sequence=1, n_hidden=hidden)
        updater = Updater(root / "state", POLICY)
        result = updater.install(str(bundle.path))
        updater.commit()
        updater.models.close()  # no warm gate worker beside what is measured
        manifest = updater.store.manifest(result.digest)
        model_file = updater.store.version_dir(result.digest) / manifest.model.file
        inputs = root / "x.npy"
        import numpy as np  # noqa: PLC0415 - the bench's own use, after the set-up

        np.save(inputs, golden_inputs()["x"][:1])

        bare = measure(
            [sys.executable, "-c", _BARE, str(model_file), str(inputs)],
            "ready",
            settle_s,
            stderr=False,
        )
        agent = [sys.executable, "-c", _AGENT, "run", "--config"]
        no_broker = measure(
            [*agent, str(write_config(root, None))], "agent started", settle_s, stderr=True
        )
        broker = Broker(root / "broker")
        broker.start()
        try:
            config = write_config(root, str(broker.url))
            # Telemetry every second: the settle window covers reports and outbox writes.
            with_broker = measure([*agent, str(config)], "agent started", settle_s + 2, stderr=True)
        finally:
            broker.stop()
    deltas = {"no_broker": no_broker - bare, "broker": with_broker - bare}
    return {
        "benchmark": "footprint",
        "model": f"MLP 8-{hidden}-4 (ONNX, onnxruntime)",
        "rss_mib": {
            "bare_onnxruntime": round(bare, 1),
            "agent_no_broker": round(no_broker, 1),
            "agent_broker_telemetry": round(with_broker, 1),
        },
        "over_bare_mib": {k: round(v, 1) for k, v in deltas.items()},
        "ratio_to_bare": {
            "no_broker": round(no_broker / bare, 3),
            "broker": round(with_broker / bare, 3),
        },
        "targets_mib": TARGETS_MIB,
        "met": {k: deltas[k] <= TARGETS_MIB[k] for k in TARGETS_MIB},
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=16, help="MLP hidden width")
    args = parser.parse_args()
    print(json.dumps(run(args.settle_s, args.hidden), indent=2))


if __name__ == "__main__":
    main()
