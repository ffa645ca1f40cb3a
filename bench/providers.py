"""Execution providers and delegates: each one's latency against the CPU path, in the same
run, and what a provider that fails costs the health gate before it falls back.

Latency: the agent's ``Model.predict`` (``load_model`` pinned to one provider, exactly as
the gate's winner serves) on a 64-32-10 MLP and a 3x64x64 conv net, batch 1 and 32,
after a warm-up; p50 and p95 over ``--runs`` calls. onnxruntime: every provider of the
onnxruntime that runs the worker (OpenVINO's needs the ``onnxruntime-openvino`` venv of
tests/support/openvino_venv.py, given by ``--openvino-python``); LiteRT: ``xnnpack``
against ``cpu`` (builtin kernels) in this process.

Fallback: ``ModelLoading.gate`` (child process at idle priority, golden check, load here)
with the preference [OpenVINO, CPU] when OpenVINO fails to start (an FP16 precision its
CPU plugin refuses) and when it misses a zero tolerance, against the gate with the CPU
provider alone; the median of ``--gates`` gates each.

    python bench/providers.py [--runs 300] [--gates 3] [--openvino-python PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import DeviceInfo
from agent.bundle.manifest import Manifest, Tolerance
from agent.install._config import UpdaterConfig
from agent.install._loading import ModelLoading
from agent.serve.runtimes import RuntimeOptions, installed_runtimes, load_model
from bench._machine import machine

OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
REFUSED = {OPENVINO: {"device_type": "CPU", "precision": "FP16"}}  # fails to start on CPU


def _latency(manifest: Manifest, model_dir: Path, runtime: str, provider: str, runs: int) -> Any:
    options = RuntimeOptions(threads=1).pinned(runtime, provider)
    shape = manifest.model.inputs[0].shape[1:]
    out = {}
    with load_model(manifest, model_dir, runtime, options) as model:
        for batch in (1, 32):
            x = {"x": np.random.default_rng(0).standard_normal((batch, *shape)).astype("float32")}
            for _ in range(20):
                model.predict(x)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                model.predict(x)
                times.append((time.perf_counter() - start) * 1e3)
            q = statistics.quantiles(times, n=20)
            out[f"batch{batch}"] = {"p50_ms": round(q[9], 4), "p95_ms": round(q[18], 4)}
    return out


def _gate_s(manifest: Manifest, model_dir: Path, options: RuntimeOptions, gates: int) -> Any:
    loading = ModelLoading(
        UpdaterConfig(runtime=options), lambda: DeviceInfo(runtimes=installed_runtimes())
    )
    seconds, provider = [], None
    for _ in range(gates):
        start = time.perf_counter()
        passed = loading.gate(manifest, model_dir)
        seconds.append(time.perf_counter() - start)
        provider = passed.provider
        passed.model.close()
    return {"median_s": round(statistics.median(seconds), 3), "served_on": provider}


def _exact(manifest: Manifest, model_dir: Path) -> tuple[Manifest, Path]:
    """A copy whose golden outputs are this onnxruntime's CPU answers, with zero tolerance:
    only the CPU provider passes it."""
    copy = model_dir.with_name(model_dir.name + "-exact")
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    health = manifest.health
    with np.load(model_dir / health.golden_inputs) as golden:
        feed = dict(golden)
    with load_model(manifest, model_dir, "onnxruntime") as model:
        np.savez(copy / health.expected_outputs, **model.predict(feed))
    return replace(manifest, health=replace(health, tolerance=Tolerance(atol=0.0))), copy


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Latency per provider of each model, and gate times, in this interpreter."""
    import onnxruntime as ort  # noqa: PLC0415 - this interpreter's onnxruntime

    providers = [p for p in ort.get_available_providers() if p in (OPENVINO, CPU)]
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "latency": {}}
    for name, spec in job["models"].items():
        manifest, model_dir = Manifest.from_json(spec["manifest"]), Path(spec["dir"])
        out["latency"][name] = {
            p: _latency(manifest, model_dir, "onnxruntime", p, job["runs"]) for p in providers
        }
    if OPENVINO not in providers:
        return out
    mlp = job["models"]["mlp"]
    manifest, model_dir = Manifest.from_json(mlp["manifest"]), Path(mlp["dir"])
    exact, exact_dir = _exact(manifest, model_dir)
    chain = RuntimeOptions(providers=(OPENVINO, CPU))
    out["gate"] = {
        "cpu_only": _gate_s(manifest, model_dir, RuntimeOptions(), job["gates"]),
        "openvino_passes": _gate_s(manifest, model_dir, chain, job["gates"]),
        "openvino_fails_to_start": _gate_s(
            manifest, model_dir, replace(chain, provider_options=REFUSED), job["gates"]
        ),
        "openvino_misses_tolerance": _gate_s(exact, exact_dir, chain, job["gates"]),
    }
    return out


def _extract(directory: Path, model: Path, n_in: int | tuple[int, ...], answer: Any) -> Any:
    """An extracted bundle (the gate reads the manifest, model and golden files only)
    whose golden outputs are ``answer`` on its golden request."""
    from tests.support.provider_bundles import golden_batch, provider_payload  # noqa: PLC0415

    expected = answer(golden_batch(n_in))
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)  # onnxruntime releases differ by ~1e-7
    manifest, payload = provider_payload(model, expected=expected, tolerance=tolerance, n_in=n_in)
    for name, data in payload.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return {"manifest": manifest.to_json(), "dir": str(directory)}


def _models(d: Path) -> dict[str, Any]:
    import onnxruntime as ort  # noqa: PLC0415

    from tests.support.models import make_onnx_conv, make_onnx_mlp  # noqa: PLC0415

    out = {}
    for name, model, n_in in (
        ("mlp", make_onnx_mlp(d / "mlp.onnx"), 64),
        ("conv64", make_onnx_conv(d / "conv.onnx", size=64), (3, 64, 64)),
    ):
        session = ort.InferenceSession(str(model), providers=[CPU])
        out[name] = _extract(
            d / name, model, n_in, lambda feed, s=session: s.run(["probs"], feed)[0]
        )
    return out


def _litert(d: Path, runs: int) -> dict[str, Any]:
    from tests.support.models import make_tflite_mlp  # noqa: PLC0415

    model = make_tflite_mlp(d / "mlp.tflite")
    bundle = _extract(d / "tflite", model, 64, lambda feed: np.zeros((5, 10), np.float32))
    manifest = Manifest.from_json(bundle["manifest"])
    return {
        "mlp": {p: _latency(manifest, d / "tflite", "litert", p, runs) for p in ("xnnpack", "cpu")}
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--gates", type=int, default=3)
    parser.add_argument("--openvino-python", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    print(json.dumps(_measure(args), indent=2))


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.openvino_venv import _cache_dir  # noqa: PLC0415 - the tests' venv

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        job = {"runs": args.runs, "gates": args.gates, "models": _models(d)}
        (d / "job.json").write_text(json.dumps(job))
        here = worker(job)
        here["litert"] = _litert(d, args.runs)
        python = args.openvino_python or _cache_dir() / "bin" / "python"
        openvino: Any = "not measured: no onnxruntime-openvino venv (--openvino-python)"
        if Path(python).exists():
            out = subprocess.run(
                [str(python), __file__, "--worker", str(d / "job.json")],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            openvino = json.loads(out.stdout)
    return {"machine": machine(), "this_venv": here, "openvino_venv": openvino}


if __name__ == "__main__":
    main()
