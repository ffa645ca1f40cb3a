"""The health gate's child process (see :func:`agent.install._gate.check_in_child`).

It reads one JSON request on stdin, lowers its own CPU priority before it imports numpy
or a runtime (whose threads inherit it), loads the candidate the way the agent will,
runs the gate, writes one JSON line on stdout and exits. It exits on its own if the
agent that started it dies.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from agent.install._sched import lower_this_thread
from agent.install.faults import gate_fault


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)  # the agent is gone; nobody will read the answer

    threading.Thread(target=watch, name="edgeship-gate-watchdog", daemon=True).start()


def _answer(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main() -> None:
    request = json.loads(sys.stdin.readline())
    lower_this_thread(request["priority"])  # before any thread exists: all inherit it
    _exit_with_parent(request["parent"])
    fault = gate_fault()  # a test seam (agent.install.faults); None in real use

    from pathlib import Path  # noqa: PLC0415 - imported at the lowered priority

    from agent.bundle.crypto import DeviceKey  # noqa: PLC0415
    from agent.bundle.manifest import Manifest  # noqa: PLC0415
    from agent.errors import EdgeshipError, HealthCheckError  # noqa: PLC0415
    from agent.install._health import check_health  # noqa: PLC0415
    from agent.install._sched import model_clocks  # noqa: PLC0415
    from agent.serve.runtimes import RuntimeOptions, load_model  # noqa: PLC0415

    try:
        manifest = Manifest.from_json(request["manifest"])
        model_dir = Path(request["model_dir"])
        options = RuntimeOptions(**request["options"])
        key = None if request["key_file"] is None else DeviceKey.load(Path(request["key_file"]))
        if fault == "crash":
            os.abort()
        if fault == "hang":
            time.sleep(3600)
        while fault == "spin":
            pass
        try:
            model = load_model(manifest, model_dir, request["runtime"], options, key=key)
        except EdgeshipError as exc:
            raise HealthCheckError(f"the candidate cannot be loaded: {exc}") from None
        with model:
            report = check_health(
                model, manifest, model_dir, runs=request["runs"], clocks=model_clocks(), key=key
            )
    except HealthCheckError as exc:
        _answer({"error": str(exc)})
        return
    except EdgeshipError as exc:
        _answer({"error": f"the health check failed: {exc}"})
        return
    _answer(
        {
            "worst_output": report.worst_output,
            "max_abs_deviation": report.max_abs_deviation,
            "p95_ms": report.p95_ms,
            "runs": report.runs,
        }
    )


if __name__ == "__main__":
    main()
