"""Hot swap under constant load: p99 latency during swaps vs steady state, failed calls, RSS.

Client threads call ``ModelSlot.predict`` without pause: steady phases (no swaps),
then ``--swaps`` swaps (steady and swapping phases alternate in rounds), each the
agent's real activation path, ``load_and_check`` with the agent's defaults: the health
gate (golden outputs, latency runs) in a child process at idle priority, then
``load_model`` of the candidate here in an idle thread (alternating between two versions,
each verified and extracted once), then ``ModelSlot.swap``. ``--gate thread`` runs the
gate in a thread of this process instead. The ratio compares
the p99 of calls that ran during swaps with the steady p99 measured in the same run.
RSS is read after 10 swaps and after all of them.

Targets (issue 4): p99 during swaps <= 2x steady; 0 failed calls; RSS growth from swap
10 to swap 200 under 10%.

    python bench/swap.py [--swaps 200] [--threads 2] [--steady-seconds 3] [--hidden 2048]
                         [--priority idle|normal|N]
                         [--gate process|thread]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest
from agent.errors import EdgeshipError
from agent.install import ChildGate, load_and_check
from agent.install._gate_worker import GateWorkers
from agent.install._health import HealthReport
from agent.plumbing.sched import GatePriority
from agent.serve._slot import ModelSlot, ServingModel
from agent.serve.runtimes import load_model
from bench._machine import machine
from tests.support.bundles import NOW
from tests.support.lifecycle import POLICY, golden_inputs, make_model_bundle


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# Latencies go into fixed histograms (1 us .. 10 s, bins 0.5% wide) so that recording
# them allocates nothing: the RSS measured is the agent's, not the benchmark's.
EDGES = [float(e) for e in np.geomspace(1e-6, 10.0, 3300)]


def new_histogram() -> list[int]:
    return [0] * (len(EDGES) + 1)


def p99_ms(histograms: list[list[int]]) -> float:
    """Upper edge of the bin holding the 99th percentile."""
    counts = np.sum(np.asarray(histograms), axis=0)
    total = int(counts.sum())
    if not total:
        return float("nan")
    index = int(np.searchsorted(np.cumsum(counts), 0.99 * total))
    return EDGES[min(index, len(EDGES) - 1)] * 1000


# Where an activation's time goes: the gate (up to the first load here), the load(s) here,
# what follows them in load_and_check, the swap; and the whole.
PARTS = ("gate", "load", "rest", "swap", "total", "loads")


def activate(
    slot: ModelSlot,
    version: tuple[Manifest, Path, str],
    priority: GatePriority,
    gate: ChildGate | None,
) -> tuple[HealthReport, dict[str, float]]:
    """The agent's activation path, timed: ``load_and_check``, then the swap."""
    manifest, target, digest = version
    loads: list[tuple[float, float]] = []

    def load() -> ServingModel:
        start = time.perf_counter()
        try:
            return load_model(manifest, target, "onnxruntime")
        finally:
            loads.append((start, time.perf_counter()))

    t0 = time.perf_counter()
    model, report = load_and_check(load, manifest, target, runs=5, priority=priority, child=gate)
    t1 = time.perf_counter()
    slot.swap(model, digest)
    t2 = time.perf_counter()
    times = {
        "gate": loads[0][0] - t0,
        "load": sum(b - a for a, b in loads),
        "rest": t1 - loads[-1][1],
        "swap": t2 - t1,
        "total": t2 - t0,
        "loads": len(loads),
    }
    return report, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--swaps-per-round", type=int, default=20)
    parser.add_argument("--steady-seconds", type=float, default=3.0, help="in all rounds")
    parser.add_argument("--hidden", type=int, default=2048, help="MLP hidden width")
    parser.add_argument(
        "--priority",
        type=lambda v: v if v in ("idle", "normal") else int(v),
        default="idle",
        help="health-gate priority: idle (the agent's default), normal, or a nice increment",
    )
    parser.add_argument(
        "--gate",
        choices=("process", "thread"),
        default="process",
        help="health gate in a child process (the agent's default) or in a thread here",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="each gate starts its own child process (no worker started ahead)",
    )
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="do not wait for the worker started ahead to be ready before an activation",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run (Python's default is 5 ms)",
    )
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)

    with tempfile.TemporaryDirectory() as tmp:
        versions: list[tuple[Manifest, Path, str]] = []
        for seed in (1, 2):
            bundle = make_model_bundle(
                Path(tmp) / "src", seed=seed, sequence=seed, n_hidden=args.hidden
            )
            target = Path(tmp) / f"v{seed}"
            with bundle.path.open("rb") as f:
                verified = verify_bundle(f, POLICY, now=NOW, extract_to=target)
            versions.append((verified.manifest, target, verified.digest))

        slot = ModelSlot()
        manifest, target, digest = versions[0]
        slot.swap(load_model(manifest, target, "onnxruntime"), digest)
        x = golden_inputs()

        phase = ["warmup"]
        histograms: dict[str, list[list[int]]] = {
            name: [new_histogram() for _ in range(args.threads)]
            for name in ("warmup", "steady", "swapping")
        }
        failures: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            while not stop.is_set():
                current = phase[0]
                start = time.perf_counter()
                try:
                    slot.predict(x)
                except EdgeshipError as exc:
                    failures.append(str(exc))
                    continue
                histograms[current][n][bisect.bisect(EDGES, time.perf_counter() - start)] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        rss: dict[str, float] = {"before_swaps": rss_mib()}
        tasks = {"before_swaps": os_threads()}
        parts: dict[str, list[float]] = {k: [] for k in PARTS}
        warm_up_seconds: list[float] = []
        workers = None if args.gate != "process" or args.cold else GateWorkers()
        gate = None
        if args.gate == "process":
            gate = ChildGate("onnxruntime", workers=workers)
        if workers is not None:
            workers.warm_up("onnxruntime", args.priority)
        gate_p95_ms: list[float] = []
        swapping_seconds = 0.0
        # Steady and swapping phases alternate in short rounds, so load from elsewhere on
        # the machine hits both alike instead of skewing the ratio.
        rounds = max(1, args.swaps // args.swaps_per_round)
        i = 0
        for _ in range(rounds):
            phase[0] = "steady"
            time.sleep(args.steady_seconds / rounds)
            phase[0] = "swapping"
            started = time.perf_counter()
            for _ in range(args.swaps_per_round):
                i += 1
                if workers is not None and not args.back_to_back:
                    # Activations are minutes apart in the agent: the next one finds the
                    # worker started after the last one ready. Its start-up runs now, in
                    # the swapping phase, so the p99 during swaps includes it.
                    t = time.perf_counter()
                    workers.wait_ready(120)
                    warm_up_seconds.append(time.perf_counter() - t)
                report, times = activate(slot, versions[i % 2], args.priority, gate)
                gate_p95_ms.append(report.p95_ms)
                for k, v in times.items():
                    parts[k].append(v)
                if i == 10:
                    rss["after_10"] = rss_mib()
            swapping_seconds += time.perf_counter() - started
        rss[f"after_{i}"] = rss_mib()
        tasks[f"after_{i}"] = os_threads()
        stop.set()
        for t in threads:
            t.join()
        slot.clear()
        if workers is not None:
            workers.close()

    steady = p99_ms(histograms["steady"])
    during = p99_ms(histograms["swapping"])
    after_10 = rss.get("after_10", float("nan"))
    result: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "health_gate": args.gate,
        "health_gate_priority": args.priority,
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "swaps": i,
        "calls": {k: int(np.sum(v)) for k, v in histograms.items()},
        "failed_calls": len(failures),
        "hidden": args.hidden,
        "p99_ms_steady": round(steady, 4),
        "p99_ms_during_swaps": round(during, 4),
        "p99_ratio": round(during / steady, 3),
        # An activation: load_and_check (the gate, then the load here) and the swap.
        "swap_ms_median": round(float(np.median(parts["total"])) * 1000, 3),
        "activation_ms": {
            "median": round(float(np.median(parts["total"])) * 1000, 3),
            "p90": round(float(np.percentile(parts["total"], 90)) * 1000, 3),
            "max": round(float(np.max(parts["total"])) * 1000, 3),
            # The median of each part (they need not add up to the median activation).
            "parts_median": {
                k: round(float(np.median(parts[k])) * 1000, 3)
                for k in PARTS
                if k not in ("total", "loads")
            },
            "local_loads_mean": round(float(np.mean(parts["loads"])), 2),
        },
        "gate_workers": None
        if workers is None
        else {
            "started_ahead_used": workers.warm_served,
            "started_on_demand": workers.started_on_demand,
            # How long the worker started after an activation took to be ready, under
            # this load (waited for between activations, outside their time).
            "warm_up_ms_median": round(float(np.median(warm_up_seconds)) * 1000, 1)
            if warm_up_seconds
            else None,
        },
        # What the gate measured (wall time minus its wait for a CPU), for comparison with
        # the steady p99 of the serving threads.
        "gate_p95_ms_median": round(float(np.median(gate_p95_ms)), 4),
        "swapping_seconds": round(swapping_seconds, 2),
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "os_threads": tasks,
        "rss_growth_10_to_end": round(rss[f"after_{i}"] / after_10 - 1, 4),
        # The largest gate child process (it exits after each check).
        "gate_child_peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "targets": {"p99_ratio": 2.0, "failed_calls": 0, "rss_growth_10_to_end": 0.10},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
