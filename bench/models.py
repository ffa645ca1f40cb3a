"""Two models served at once: each model's predict overhead against one model's, as JSON.

Three in-process agents (no broker, no HTTP): one serving one model (the configuration
without ``[models]``), one serving two (``[models.a]``, ``[models.b]``), each model a
real bundle installed and committed through the agent's own updater. Per call, the
baseline is the very onnxruntime session the single-model agent loaded, run raw; the
figures are ``Agent.predict`` of the single model, of model ``a`` and of model ``b``
(the two-model agent), in alternating batches, each the median over repetitions. The
overhead is the agent's time minus the raw call's.

Target (issue 14): each model's overhead in the two-model agent within 1 µs of the
single-model agent's.

    python bench/models.py [--reps 21] [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import parse_config
from agent.daemon import Agent
from bench._machine import machine
from tests.support.lifecycle import N_IN, POLICY, make_model_bundle


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def start_agent(root: Path, trust: Path, models: tuple[str, ...], bundle: Path) -> Agent:
    tables = "".join(f"[models.{m}]\n" for m in models)
    config = parse_config(
        f'device_id = "bench"\nstate_dir = "{root}"\ntrust_policy = "{trust}"\n'
        f"[update]\nhealth_runs = 3\n[runtime]\nthreads = 1\n{tables}"
    )
    agent = Agent(config)
    agent.start()
    for name in agent.models:
        host = agent.host(name)
        host.updater.install(str(bundle))
        host.updater.commit()  # probation over: no monitor on the serving path
    return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = make_model_bundle(d / "bundles", seed=1, sequence=1).path
        trust = d / "trust.toml"
        trust.write_bytes(POLICY.to_toml())
        one = start_agent(d / "one", trust, (), bundle)
        two = start_agent(d / "two", trust, ("a", "b"), bundle)
        try:
            results = measure(one, two, args.reps, args.calls)
        finally:
            one.stop()
            two.stop()
    print(json.dumps({"machine": machine(), **results}, indent=2))


def measure(one: Agent, two: Agent, reps: int, calls: int) -> dict[str, Any]:
    x = {"x": np.random.default_rng(0).standard_normal((1, N_IN)).astype(np.float32)}
    entry = one.slot._entry
    assert entry is not None
    session = entry.model._backend._session  # type: ignore[attr-defined]
    run = session.run
    cases: dict[str, Callable[[], object]] = {
        "raw": lambda: run(None, x),
        "one_model": lambda: one.predict(x),
        "two_models_a": lambda: two.predict(x, model="a"),
        "two_models_b": lambda: two.predict(x, model="b"),
    }
    for fn in cases.values():  # warm up
        per_call_us(fn, calls // 4)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():  # alternating: drift hits every case alike
            samples[name].append(per_call_us(fn, calls))
    med = {name: statistics.median(v) for name, v in samples.items()}
    overhead = {name: med[name] - med["raw"] for name in med if name != "raw"}
    worst = max(overhead["two_models_a"], overhead["two_models_b"]) - overhead["one_model"]
    return {
        "per_call_us": {k: round(v, 3) for k, v in med.items()},
        "overhead_us": {k: round(v, 3) for k, v in overhead.items()},
        "two_vs_one_overhead_us": round(worst, 3),
        "target_us": 1.0,
        "met": worst <= 1.0,
    }


if __name__ == "__main__":
    main()
