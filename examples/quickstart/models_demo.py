"""Steps 10-12 of the fleet demo (fleet_demo.py): two models on each device, and rollouts
gated by what the devices see on live traffic.

10. each device serves a second model, ``lite``: the same digits weights as a TFLite
    flatbuffer, run by LiteRT beside the ONNX model (agent.toml ``[models.lite]``), with
    its own desired state, rollout, state and telemetry;
11. a retrain gone wrong (labels out of step with their images) builds, signs and passes
    its own health gate, since its golden outputs are its own; rolled out with a shadow
    stage, each device runs it on a copy of live requests, finds it disagreeing with what
    serves and rejects it: the rollout halts, and it never answered a request;
12. a sound v7 under the same shadow stage is promoted by the devices' verdicts, wave by
    wave.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHADOW = (
    "--shadow", "--shadow-min-samples", "60", "--shadow-sample-rate", "1.0",
    "--shadow-min-agreement", "0.95",
    # A 10 µs MLP beside HTTP: its latency is noise; agreement is what this step shows.
    "--shadow-max-latency-ratio", "10",
)  # fmt: skip


def predict(port: int, token: str, path: str, x: np.ndarray) -> tuple[str, list[int]]:
    """The version that answered and the predicted digits, through the device's HTTP."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps({"inputs": {"x": x.tolist()}}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        doc: dict[str, Any] = json.loads(answer.read())
    probs = doc["outputs"]["probabilities"]
    labels = np.reshape(probs["data"], probs["shape"]).argmax(axis=1)
    return doc["model"], [int(v) for v in labels]


def models_and_shadow(
    out: Path,
    *,
    data: Path,
    trust: Path,
    http: tuple[int, str],
    run: Callable[..., subprocess.CompletedProcess[str]],
    say: Callable[[str], None],
    rollout: Callable[..., None],
    build: Callable[..., None],
) -> None:
    root = Path(__file__).resolve().parents[2]
    edgeship = str(Path(sys.executable).parent / "edgeship")

    say("10. a second model on each device: the TFLite twin, served by LiteRT beside ONNX")
    build(data / "digits.tflite", "1.0.0", "1", "digits-lite-v1.edgeship", "--name", "digits-lite")
    rollout("lite-v1", trust, waves="100%", model="lite")
    port, token = http
    x = np.load(data / "validation.npz")["x"][:8]
    for path in ("/v1/predict", "/v1/models/lite/predict"):
        version, labels = predict(port, token, path, x)
        print(f"POST {path} -> {labels} (version {version[:12]})")

    say("11. a retrain gone wrong passes its own health gate; the devices' shadow rejects it")
    bad = out / "digits-bad"
    run(sys.executable, root / "examples" / "digits" / "train.py", "--out", bad,
        "--shuffle-labels")  # fmt: skip
    build(bad / "digits.onnx", "6.0.0", "6", "digits-v6.edgeship")
    rollout("v6", trust, waves="50%,100%", expect_halt=True, extra=SHADOW)

    say("12. v7 under the same shadow stage: promoted by the devices' verdicts, wave by wave")
    build(data / "digits.onnx", "7.0.0", "7", "digits-v7.edgeship")
    rollout("v7", trust, waves="50%,100%", extra=SHADOW)
    run(edgeship, "fleet", "status", "--db", out / "fleet.sqlite")
