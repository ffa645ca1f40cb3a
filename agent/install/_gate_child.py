"""The health gate's worker process (see :mod:`agent.install._gate_worker`).

Started as ``python -c <bootstrap> PRIORITY RUNTIME PARENT_PID``, it lowers its own CPU
priority before it imports numpy or a runtime (whose threads inherit it), imports them,
writes ``ready`` on stdout and waits for one JSON request on stdin
(:func:`agent.install._gate.check_in_child`). It then loads the candidate the way the agent
will, runs the gate, writes one JSON line on stdout and exits. It exits on its own if the
agent that started it dies (its stdin ends, or its parent changes).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import threading
import time
from datetime import datetime
from typing import Any

from agent.plumbing.sched import lower_this_thread

# What a worker imports ahead for a runtime; agent.serve.runtimes imports the same.
_RUNTIME_MODULES = {
    "onnxruntime": "onnxruntime",
    "litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)  # the agent is gone; nobody will read the answer

    threading.Thread(target=watch, name="edgeship-gate-watchdog", daemon=True).start()


def _answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _warm_up(runtime: str) -> None:
    """Import what a check needs, at the lowered priority, before the request comes.

    On a busy device a worker at idle priority gets a few percent of a CPU: each
    millisecond of CPU left for the check costs tens of milliseconds of activation.
    """
    import numpy  # noqa: F401, PLC0415

    import agent.bundle.manifest  # noqa: PLC0415
    import agent.install._health  # noqa: PLC0415
    import agent.serve.runtimes  # noqa: F401, PLC0415

    # A manifest's timestamps: strptime imports and compiles its parser on first use.
    datetime.strptime("2000-01-01T00:00:00Z", "%Y-%m-%dT%H:%M:%SZ")
    module = _RUNTIME_MODULES.get(runtime)
    if module is not None:
        with contextlib.suppress(ImportError, OSError):  # loading the candidate says why
            importlib.import_module(module)


def _check(request: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict on the requested candidate, as the JSON answer."""
    from pathlib import Path  # noqa: PLC0415 - imported at the lowered priority

    from agent.bundle.manifest import Manifest  # noqa: PLC0415
    from agent.errors import EdgeshipError, HealthCheckError  # noqa: PLC0415
    from agent.install._health import check_health  # noqa: PLC0415
    from agent.plumbing.sched import model_clocks  # noqa: PLC0415
    from agent.serve.runtimes import RuntimeOptions, load_model  # noqa: PLC0415

    fault = request.get("fault")  # a test seam (agent.install.faults); None in real use
    try:
        manifest = Manifest.from_json(request["manifest"])
        model_dir = Path(request["model_dir"])
        options = RuntimeOptions(**request["options"])
        key = None
        if request["key_file"] is not None:  # cryptography: imported only for a key
            from agent.bundle.crypto import DeviceKey  # noqa: PLC0415

            key = DeviceKey.load(Path(request["key_file"]))
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
        return {"error": str(exc)}
    except EdgeshipError as exc:
        return {"error": f"the health check failed: {exc}"}
    return {
        "worst_output": report.worst_output,
        "max_abs_deviation": report.max_abs_deviation,
        "p95_ms": report.p95_ms,
        "runs": report.runs,
    }


def main() -> None:
    priority, runtime, parent = sys.argv[1:4]
    # Before any thread exists: every thread the runtime starts inherits it.
    lower_this_thread(int(priority) if priority.isdigit() else priority)
    _exit_with_parent(int(parent))
    _warm_up(runtime)
    _answer("ready")
    line = sys.stdin.readline()
    if not line:  # the agent stopped the worker, or died
        return
    _answer(json.dumps(_check(json.loads(line))))
    # The agent waits for the worker's end: skip tearing the interpreter and the runtime
    # down, tens of milliseconds of CPU, which at idle priority on a busy device take
    # seconds. Nothing is left to flush or close.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
