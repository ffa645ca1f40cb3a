"""Overhead of the agent's ``Model.predict`` over the raw runtime call, printed as JSON.

Same model, same session/interpreter, same process: the raw baseline calls the very
session (or interpreter) the agent loaded, so only the agent's own work differs:
validation, the output dictionary and (TFLite) the lock. Raw and agent batches alternate,
so drift in the machine's speed hits both; each figure is the median over repetitions.

Targets (issue 3): at most 5 microseconds per call on the 64-32-10 MLP, at most 2% on the
conv model (examples/conv, 0.8 G multiply-adds; a toy conv is reported too).
A third section measures single-threaded against the runtime's default
threading, the evidence for ``RuntimeOptions``' automatic thread choice. A fourth,
``contention``, times each call of the MLP and the conv nets with one thread, every core
and the automatic choice, alone and beside a busy process (a spin loop started before the
models load), in interleaved rounds: target (issue 17) the automatic choice's p95 at most
1.1x the best fixed choice's, in each case.

    python bench/predict.py [--reps 15] [--quick] [--only contention] [--rounds 40]
        [--round-s 0.3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle.manifest import Compatibility, ModelSpec, RuntimeRequirement, TensorSpec
from agent.serve._validation import InputPolicy
from agent.serve.runtimes import RuntimeOptions, load_model
from agent.serve.runtimes._base import threads_for
from bench._machine import machine
from tests.support.bundles import make_manifest
from tests.support.models import make_onnx_conv, make_onnx_mlp, make_tflite_mlp


def _conv_example() -> Any:
    """examples/conv/conv.py as a module (examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "conv" / "conv.py"
    spec = importlib.util.spec_from_file_location("edgeship_conv_example", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def compare(
    raw: Callable[[], object], agent: Callable[[], object], calls: int, reps: int
) -> dict[str, Any]:
    for fn in (raw, agent):  # warm up: arenas, caches, branch predictors
        per_call_us(fn, max(calls // 10, 1))
    raw_t, agent_t, diffs = [], [], []
    for _ in range(reps):
        r = per_call_us(raw, calls)
        a = per_call_us(agent, calls)
        raw_t.append(r)
        agent_t.append(a)
        diffs.append(a - r)
    raw_med = statistics.median(raw_t)
    diff_med = statistics.median(diffs)  # paired: each agent batch against its neighbour
    return {
        "calls_per_rep": calls,
        "reps": reps,
        "raw_us": round(raw_med, 3),
        "agent_us": round(statistics.median(agent_t), 3),
        "overhead_us": round(diff_med, 3),
        "overhead_pct": round(100 * diff_med / raw_med, 2),
    }


def manifest_for(
    fmt: str,
    file: str,
    runtime: str,
    x_shape: tuple[int | None, ...],
    output: TensorSpec | None = None,
) -> Any:
    return make_manifest(
        {},
        files=(),
        compatibility=Compatibility(runtimes=(RuntimeRequirement(runtime),)),
        model=ModelSpec(
            format=fmt,  # type: ignore[arg-type]
            file=file,
            inputs=(TensorSpec("x", "float32", x_shape),),
            outputs=(output or TensorSpec("probs", "float32", (None, 10)),),
        ),
    )


def ort_raw(model: Any, x: np.ndarray) -> Callable[[], object]:
    session = model._backend._session  # the agent's own session: same options, same arena
    feed = {"x": x}
    return lambda: session.run(None, feed)


def tflite_raw(model: Any, x: np.ndarray) -> Callable[[], object]:
    interp = model._backend._interp
    i = model._backend._inputs[0][1]
    o = model._backend._outputs[0]

    def run() -> object:
        interp.set_tensor(i, x)
        interp.invoke()
        return interp.get_tensor(o)

    return run


def _pool_cpus() -> dict[str, str]:
    """Thread id -> the CPUs it may run on, for this process's threads (Linux only)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[task.name] = line.split()[-1]
    return out


def _round_p95_us(model: Any, feed: dict[str, np.ndarray], seconds: float, min_calls: int) -> float:
    """The p95 of the calls made in ``seconds`` (at least ``min_calls``), in microseconds."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        model.predict(feed)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[min(len(times) - 1, int(0.95 * len(times)))] * 1e6


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def contention(
    d: Path, cases: list[tuple[str, Any, np.ndarray]], rounds: int, round_s: float
) -> dict[str, Any]:
    """p95 per call with 1 thread, every core and the automatic choice, alone and beside a
    busy process.

    One p95 per configuration is noise on a small shared VM: the configurations are loaded
    side by side and take turns, ``rounds`` times ``round_s`` seconds each, in an order
    rotated every round, so drift in the machine hits each alike. Reported per
    configuration: the median and quartiles of the per-round p95s; ``ratio``: auto over the
    best fixed choice (the fixed count with the lower median p95), computed within each
    round, then its median and quartiles. The busy neighbour (a spin loop) starts before
    the models load and runs through the phase.
    """
    cores = os.cpu_count() or 1
    configs = (
        ("1_thread", RuntimeOptions(threads=1)),
        (f"{cores}_threads", RuntimeOptions(threads=cores)),
        ("auto", RuntimeOptions()),
    )
    out: dict[str, Any] = {"rounds": rounds, "round_s": round_s}
    for neighbour in (False, True):
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
        try:
            time.sleep(0.5 if spin else 0)  # let it take its core
            for label, manifest, x in cases:
                feed = {"x": x}
                models: dict[str, Any] = {}
                row: dict[str, Any] = {}
                for name, options in configs:
                    before = _pool_cpus()
                    models[name] = load_model(manifest, d, "onnxruntime", options)
                    for _ in range(5):  # warm up: arena, pool threads started
                        models[name].predict(feed)
                    so = models[name]._backend._session.get_session_options()
                    # intra_op_num_threads 0: onnxruntime's default, which pins its pool
                    # threads to cores; an explicit count leaves them free to migrate.
                    row[name] = {
                        "intra_op_num_threads": so.intra_op_num_threads,
                        "pool_thread_cpus": sorted(
                            v for k, v in _pool_cpus().items() if k not in before
                        ),
                    }
                p95s: dict[str, list[float]] = {name: [] for name, _ in configs}
                neighbour_cpus: dict[str, int] = {}
                for r in range(rounds):
                    for i in range(len(configs)):
                        name = configs[(r + i) % len(configs)][0]
                        p95s[name].append(_round_p95_us(models[name], feed, round_s, 5))
                    if spin is not None:  # which core the spin loop ran on last
                        cpu = Path(f"/proc/{spin.pid}/stat").read_text().rsplit(")", 1)[1]
                        key = cpu.split()[36]
                        neighbour_cpus[key] = neighbour_cpus.get(key, 0) + 1
                if neighbour_cpus:
                    row["neighbour_last_cpu_rounds"] = dict(sorted(neighbour_cpus.items()))
                for model in models.values():
                    model.close()
                for name, values in p95s.items():
                    q1, median, q3 = _quartiles(values)
                    row[name]["p95_us"] = round(median, 1)
                    row[name]["p95_us_iqr"] = [round(q1, 1), round(q3, 1)]
                # The best fixed choice is one configuration: the fixed count with the lower
                # median p95 over the phase. auto is compared with it round by round.
                best = min(("1_thread", f"{cores}_threads"), key=lambda n: row[n]["p95_us"])
                q1, median, q3 = _quartiles(
                    [a / b for a, b in zip(p95s["auto"], p95s[best], strict=True)]
                )
                row["best_fixed"] = best
                row["ratio"] = round(median, 3)
                row["ratio_iqr"] = [round(q1, 3), round(q3, 3)]
                # Against the faster of the two in each round instead: an oracle that
                # switches every round, which no fixed choice is; where the two tie, the
                # minimum of two noisy figures leans low and this ratio leans high.
                q1, median, q3 = _quartiles(
                    [
                        a / min(one, many)
                        for a, one, many in zip(
                            p95s["auto"], p95s["1_thread"], p95s[f"{cores}_threads"], strict=True
                        )
                    ]
                )
                row["ratio_vs_round_min"] = [round(q1, 3), round(median, 3), round(q3, 3)]
                # Each fixed choice against the other, per round: which one wins, and how
                # often (the verdict a policy would have to get right).
                wins = sum(
                    one < many
                    for one, many in zip(p95s["1_thread"], p95s[f"{cores}_threads"], strict=True)
                )
                row["1_thread_wins_rounds"] = f"{wins}/{rounds}"
                row["ratio_of_medians"] = round(
                    row["auto"]["p95_us"]
                    / min(row["1_thread"]["p95_us"], row[f"{cores}_threads"]["p95_us"]),
                    3,
                )
                # "auto" runs exactly one fixed configuration's settings when it picks a
                # count: the two must agree within the spread.
                same = threads_for(manifest.model, RuntimeOptions())
                if same is not None:
                    fixed = "1_thread" if same == 1 else f"{same}_threads"
                    q1, median, q3 = _quartiles(
                        [a / f for a, f in zip(p95s["auto"], p95s[fixed], strict=True)]
                    )
                    row[f"auto_vs_{fixed}"] = [round(q1, 3), round(median, 3), round(q3, 3)]
                out[f"{label}/{'busy_neighbour' if neighbour else 'alone'}"] = row
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
    out["target_ratio"] = 1.1
    out["met"] = all(r["ratio"] <= 1.1 for r in out.values() if isinstance(r, dict))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
    parser.add_argument("--only", choices=["contention"], help="run one section")
    parser.add_argument(
        "--rounds", type=int, default=40, help="contention: rounds per model and phase"
    )
    parser.add_argument(
        "--round-s", type=float, default=0.3, help="contention: seconds per configuration"
    )
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    rng = np.random.default_rng(0)
    x_mlp = rng.standard_normal((1, 64)).astype(np.float32)
    x_conv = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    results: dict[str, Any] = {
        "machine": machine(),
        "targets": {"mlp_overhead_us": 5.0, "conv_overhead_pct": 2.0},
        "overhead": {},
        "threads": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        d = Path(tmp)
        make_onnx_mlp(d / "mlp.onnx")
        make_onnx_conv(d / "conv.onnx")
        make_tflite_mlp(d / "mlp.tflite")
        _conv_example().make_model(d / "convnet.onnx")
        convnet_onnx = manifest_for(
            "onnx",
            "convnet.onnx",
            "onnxruntime",
            (None, 3, 224, 224),
            TensorSpec("logits", "float32", (None, 1000)),
        )
        calls_convnet = int(30 * scale) or 1
        mlp_onnx = manifest_for("onnx", "mlp.onnx", "onnxruntime", (None, 64))
        conv_onnx = manifest_for("onnx", "conv.onnx", "onnxruntime", (None, 3, 224, 224))
        mlp_tfl = manifest_for("tflite", "mlp.tflite", "litert", (None, 64))
        calls_mlp = int(4000 * scale) or 1
        calls_conv = int(200 * scale) or 1
        results["contention"] = contention(
            d,
            [
                ("mlp", mlp_onnx, x_mlp),
                ("conv", conv_onnx, x_conv),
                ("convnet", convnet_onnx, x_conv),
            ],
            max(int(args.rounds * scale), 4),
            args.round_s,
        )
        if args.only == "contention":
            json.dump(results, sys.stdout, indent=2)
            print()
            return
        overhead = results["overhead"]
        for label, manifest, runtime, x, calls, raw_fn in (
            ("mlp_onnxruntime", mlp_onnx, "onnxruntime", x_mlp, calls_mlp, ort_raw),
            ("mlp_litert", mlp_tfl, "litert", x_mlp, calls_mlp, tflite_raw),
            ("conv_onnxruntime", conv_onnx, "onnxruntime", x_conv, calls_conv, ort_raw),
            ("convnet_onnxruntime", convnet_onnx, "onnxruntime", x_conv, calls_convnet, ort_raw),
        ):
            for policy_label, policy in (
                ("default_policy", InputPolicy()),
                ("nonfinite_allowed", InputPolicy(allow_nonfinite=True)),
            ):
                model = load_model(manifest, d, runtime, policy=policy)
                feed = {"x": x}
                overhead[f"{label}/{policy_label}"] = compare(
                    raw_fn(model, x), lambda m=model, f=feed: m.predict(f), calls, args.reps
                )
                model.close()
        x_mlp64 = rng.standard_normal((64, 64)).astype(np.float32)
        threads = results["threads"]
        for label, manifest, runtime, x, calls in (
            ("mlp_onnxruntime_batch1", mlp_onnx, "onnxruntime", x_mlp, calls_mlp),
            ("mlp_onnxruntime_batch64", mlp_onnx, "onnxruntime", x_mlp64, calls_mlp // 4),
            ("mlp_litert_batch64", mlp_tfl, "litert", x_mlp64, calls_mlp // 4),
            ("conv_onnxruntime_batch1", conv_onnx, "onnxruntime", x_conv, calls_conv),
        ):
            row: dict[str, float] = {}
            for n in (1, os.cpu_count() or 1):
                model = load_model(manifest, d, runtime, RuntimeOptions(threads=n))
                feed = {"x": x}
                per_call_us(lambda m=model, f=feed: m.predict(f), max(calls // 10, 1))
                row[f"{n}_thread_us"] = round(
                    statistics.median(
                        per_call_us(lambda m=model, f=feed: m.predict(f), calls)
                        for _ in range(max(args.reps // 3, 3))
                    ),
                    2,
                )
                model.close()
            threads[label] = row
    mlp = overhead["mlp_onnxruntime/default_policy"]["overhead_us"]
    conv = overhead["convnet_onnxruntime/default_policy"]["overhead_pct"]
    results["verdict"] = {
        "mlp_overhead_us": mlp,
        "mlp_within_target": mlp <= 5.0,
        # The conv model: examples/conv (0.8 G multiply-adds on 1x3x224x224). The
        # toy conv above (~10 M multiply-adds) is reported for the record: on it the
        # NaN/inf scan of the 150k input values alone is several percent.
        "conv_model": "examples/conv/conv.py",
        "conv_overhead_pct": conv,
        "conv_within_target": conv <= 2.0,
        "toy_conv_overhead_pct": overhead["conv_onnxruntime/default_policy"]["overhead_pct"],
    }
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
