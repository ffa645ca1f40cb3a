"""A candidate in shadow under constant load: served-path p99 with and without it, failed
calls, samples the shadow ran and dropped, RSS with one and two versions resident.

Client threads call a real ``ModelSlot`` (a real onnxruntime MLP) without pause, through
the wrapper the agent uses: time the served call, then ``ShadowRunner.offer`` (as
``ObservedPredictor.predict_versioned`` does). Phases alternate in short rounds, so load
from elsewhere on the machine hits them alike: no shadow, shadow at ``sample_rate`` 0.1,
shadow at 1.0; the candidate is a second copy of the serving model, handed from one
round's runner to the next with ``take_model``. The latency ratio the shadow measured for
this identical candidate shows whether its timing is fair (it should be near 1).

Targets (issue 14): p99 with shadow at 10% and at 100% at most 1.1x of no shadow; 0 failed
calls.

    python bench/shadow.py [--rounds 40] [--seconds 10] [--threads 2] [--hidden 2048]
                           [--priority idle|normal|N] [--queue 8] [--min-gap-ms 50]
                           [--no-reference]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import verify_bundle
from agent.errors import EdgeshipError
from agent.messages.desired import PromotionRule
from agent.serve._shadow import MIN_GAP_S, Comparison, ShadowRunner
from agent.serve._slot import ModelSlot
from agent.serve.runtimes import load_model
from bench._machine import machine
from bench.swap import EDGES, new_histogram, rss_mib
from tests.support.bundles import NOW
from tests.support.lifecycle import POLICY, golden_inputs, make_model_bundle

PHASES = ("none", "shadow_0.1", "shadow_1.0")


def quantile_ms(histograms: list[Any], q: float) -> float:
    """Upper edge of the bin holding the ``q`` quantile (as bench/swap.py's p99)."""
    counts = np.sum(np.asarray(histograms), axis=0)
    total = int(counts.sum())
    if not total:
        return float("nan")
    index = int(np.searchsorted(np.cumsum(counts), q * total))
    return EDGES[min(index, len(EDGES) - 1)] * 1000


def p99_ms(histograms: list[Any]) -> float:
    return quantile_ms(histograms, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase, over all rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="MLP hidden width")
    parser.add_argument("--queue", type=int, default=8, help="the shadow's queue size")
    parser.add_argument(
        "--priority",
        type=lambda v: v if v in ("idle", "normal") else int(v),
        default="idle",
        help="the shadow worker's priority: idle (the default), normal, or a nice increment",
    )
    parser.add_argument(
        "--min-gap-ms", type=float, default=None, help="the worker's pause between samples"
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="time the candidate against the served calls' wall time, not the serving version"
        " run beside it",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_model_bundle(Path(tmp) / "src", seed=1, sequence=1, n_hidden=args.hidden)
        with bundle.path.open("rb") as f:
            verified = verify_bundle(f, POLICY, now=NOW, extract_to=Path(tmp) / "v1")
        manifest, digest = verified.manifest, verified.digest
        slot = ModelSlot()
        slot.swap(load_model(manifest, Path(tmp) / "v1", "onnxruntime"), digest)
        x = golden_inputs()
        slot.predict(x)
        rss = {"one_version": rss_mib()}
        candidate = load_model(manifest, Path(tmp) / "v1", "onnxruntime")
        candidate.predict(x)
        rss["two_versions"] = rss_mib()
        comparison = Comparison.from_manifest(manifest)

        phase = ["warmup"]
        runner: list[ShadowRunner | None] = [None]
        histograms = {
            p: [new_histogram() for _ in range(args.threads)]
            for p in ("warmup", "stopping", *PHASES)
        }
        stop_ms: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            while not stop.is_set():
                current, shadow = phase[0], runner[0]
                start = time.perf_counter()
                try:
                    _, outputs = slot.predict_versioned(x)
                except EdgeshipError as exc:
                    failures.append(str(exc))
                    continue
                latency = time.perf_counter() - start
                if shadow is not None:
                    shadow.offer(x, outputs, latency)
                elapsed = time.perf_counter() - start  # what the caller waited for
                histograms[current][n][bisect.bisect(EDGES, elapsed)] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        shadow_stats: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES[1:]}
        rounds_p99: dict[str, list[float]] = {p: [] for p in PHASES}
        for _ in range(args.rounds):
            for name in PHASES:
                if name != "none":
                    rate = float(name.split("_")[1])
                    rule = PromotionRule(min_samples=10**7, min_agreement=0.0, sample_rate=rate)
                    runner[0] = ShadowRunner(
                        candidate,
                        digest,
                        rule,
                        comparison,
                        queue_size=args.queue,
                        priority=args.priority,
                        reference=None if args.no_reference else slot.predict,
                        **({} if args.min_gap_ms is None else {"min_gap_s": args.min_gap_ms / 1e3}),
                    )
                before = np.sum(np.asarray(histograms[name]), axis=0)
                phase[0] = name
                time.sleep(args.seconds / args.rounds)
                phase[0] = "stopping"
                time.sleep(0.01)  # calls that started in the phase are counted in it
                rounds_p99[name].append(
                    p99_ms([np.sum(np.asarray(histograms[name]), axis=0) - before])
                )
                shadow, runner[0] = runner[0], None
                if shadow is not None:
                    start = time.perf_counter()
                    candidate = shadow.take_model()  # type: ignore[assignment]
                    stop_ms.append((time.perf_counter() - start) * 1000)
                    shadow_stats[name].append(shadow.stats())
                    shadow.close()
        rss["two_versions_after"] = rss_mib()
        stop.set()
        for t in threads:
            t.join()
        candidate.close()
        slot.clear()

    base = p99_ms(histograms["none"])
    seconds = args.seconds
    result: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "hidden": args.hidden,
        "shadow_priority": args.priority,
        "queue_size": args.queue,
        "min_gap_ms": args.min_gap_ms or MIN_GAP_S * 1000,
        "seconds_per_phase": seconds,
        "rounds": args.rounds,
        "failed_calls": len(failures),
        "calls_per_s": {p: round(int(np.sum(histograms[p])) / seconds) for p in PHASES},
        "p99_ms": {p: round(p99_ms(histograms[p]), 4) for p in PHASES},
        "p99_ratio": {p: round(p99_ms(histograms[p]) / base, 3) for p in PHASES[1:]},
        # Each round's p99 against the same round's without shadow: the median of those
        # ratios shrugs off load that comes and goes on the machine (a round where the
        # clients got no CPU at all has no p99).
        "p99_ratio_round_median": {
            p: round(float(np.nanmedian(np.divide(rounds_p99[p], rounds_p99["none"]))), 3)
            for p in PHASES[1:]
        },
        "p50_ms": {p: round(quantile_ms(histograms[p], 0.5), 4) for p in PHASES},
        "p999_ms": {p: round(quantile_ms(histograms[p], 0.999), 4) for p in PHASES},
        "shadow": {p: summarize(s) for p, s in shadow_stats.items()},
        # take_model: the worker, starved at idle priority, must run to see the stop.
        "take_model_ms": {
            "median": round(float(np.median(stop_ms)), 3),
            "max": round(max(stop_ms), 3),
        },
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "targets": {"p99_ratio": 1.1, "failed_calls": 0},
    }
    print(json.dumps(result, indent=2))


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples run and dropped over all rounds; the median of each round's latency figures."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return round(float(np.median(values)), 4) if values else None

    return {
        "samples": sum(r["samples"] for r in rounds),
        "dropped": sum(r["dropped"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "agreement": min(
            (r["agreement"] for r in rounds if r["agreement"] is not None), default=None
        ),
        "served_ms": median("served_ms"),
        "shadow_ms": median("shadow_ms"),
        "latency_ratio": median("latency_ratio"),
    }


if __name__ == "__main__":
    main()
