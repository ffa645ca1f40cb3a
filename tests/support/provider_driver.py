"""Installs bundles with an execution-provider preference, run inside another venv.

The OpenVINO tests (tests/agent/install/test_openvino_providers.py) run this module with
the interpreter of the onnxruntime-openvino venv (tests/support/openvino_venv.py), which
has the agent and its light dependencies only: it imports nothing from the SDK or pytest.

``python -m tests.support.provider_driver outputs MODEL X.npy OUT.npz``: the model's
answers on the CPU and OpenVINO execution providers.
``python -m tests.support.provider_driver install JOBS.json``: for each job (state
directory, trust policy, bundle, runtime options), install and commit the bundle, then
start a second updater on the same state directory as a restarted agent would; print
what happened as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.signing import TrustPolicy
from agent.errors import EdgeshipError
from agent.install import Updater, UpdaterConfig
from agent.serve._slot import ModelSlot
from agent.serve.runtimes import RuntimeOptions


def _outputs(model: str, inputs: str, out: str) -> None:
    import onnxruntime as ort  # noqa: PLC0415 - the venv's own onnxruntime

    x = np.load(inputs)
    answers = {}
    for provider in ("CPUExecutionProvider", "OpenVINOExecutionProvider"):
        session = ort.InferenceSession(model, providers=[provider])
        answers[provider] = session.run(["probs"], {"x": x})[0]
    np.savez(out, **answers)


def _provider(slot: ModelSlot) -> str | None:
    entry: Any = slot._entry  # private: what really serves, from the adapter itself
    return None if entry is None else str(entry.model._backend.provider)


def _install(job: Mapping[str, Any]) -> dict[str, Any]:
    options = RuntimeOptions(**job["options"])
    config = UpdaterConfig(runtime=options)
    policy = TrustPolicy.load(Path(job["policy"]))
    events: list[tuple[str, dict[str, Any]]] = []
    slot = ModelSlot()
    u = Updater(
        Path(job["state_dir"]),
        policy,
        config=config,
        slot=slot,
        events=lambda kind, fields: events.append((kind, dict(fields))),
    )
    result: dict[str, Any] = {"error": None}
    try:
        digest = u.install(job["bundle"]).digest
        u.commit()
        result["serving"] = u.models.serving(digest)
    except EdgeshipError as exc:
        result["error"] = str(exc)
    result["events"] = events
    result["provider"] = _provider(slot)
    again = ModelSlot()
    restarted = Updater(Path(job["state_dir"]), policy, config=config, slot=again)
    restarted.start_serving()
    result["restarted_provider"] = _provider(again)
    return result


def main(argv: list[str]) -> None:
    if argv[0] == "outputs":
        _outputs(*argv[1:4])
        return
    jobs = json.loads(Path(argv[1]).read_text())
    print(json.dumps({name: _install(job) for name, job in jobs.items()}))


if __name__ == "__main__":
    main(sys.argv[1:])
