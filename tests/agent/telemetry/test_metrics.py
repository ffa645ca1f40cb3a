import math
import threading

import numpy as np
import pytest

from agent.telemetry._metrics import MAX_ERROR_KINDS, LogHistogram, Metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_histogram_quantiles_are_within_the_relative_accuracy_of_numpy(seed: int, q: float) -> None:
    rng = np.random.default_rng(seed)
    data = rng.lognormal(mean=-5, sigma=1.5, size=5000)  # latencies around 7 ms
    hist = LogHistogram(relative_accuracy=0.01)
    for v in data:
        hist.add(float(v))
    (estimate,) = hist.quantiles((q,)) or [math.nan]
    true = float(np.quantile(data, q, method="lower"))
    assert abs(estimate - true) <= 0.01 * true * (1 + 1e-9)


def test_histogram_clamps_values_outside_its_range_to_the_bounds() -> None:
    hist = LogHistogram(min_value=1e-6, max_value=1.0)
    for v in (0.0, -1.0, float("nan"), 5.0):
        hist.add(v)
    assert hist.quantiles((0.0, 1.0)) == [1e-6, 1.0]


def test_empty_histogram_has_no_quantiles() -> None:
    assert LogHistogram().quantiles((0.5,)) is None


def test_histogram_memory_is_fixed_by_its_range_not_by_samples() -> None:
    hist = LogHistogram()
    size = len(hist.counts)
    for v in np.random.default_rng(0).random(10_000):
        hist.add(float(v))
    assert len(hist.counts) == size


def test_snapshot_counts_requests_errors_and_throughput_of_its_window() -> None:
    now = [100.0]
    m = Metrics(clock=lambda: now[0])
    m.set_model("digits", "1.2.0", 7)
    for i in range(10):
        m.record(0.002 * (i + 1), "timeout" if i % 5 == 0 else None)
    m.record(0.001, "invalid-input")
    now[0] += 2.0
    snap = m.snapshot()
    assert snap.requests == 11
    assert snap.errors == {"timeout": 2, "invalid-input": 1}
    assert snap.throughput_rps == pytest.approx(5.5)
    assert snap.latency is not None
    assert snap.latency.max_ms == pytest.approx(20.0)
    assert snap.latency.p50_ms == pytest.approx(10.0, rel=0.011)
    doc = snap.to_json()
    assert doc["model"] == {"name": "digits", "version": "1.2.0", "sequence": 7}
    assert doc["error_count"] == 3


def test_each_snapshot_starts_a_new_window() -> None:
    m = Metrics()
    m.record(0.01)
    m.snapshot()
    snap = m.snapshot()
    assert snap.requests == 0
    assert snap.latency is None
    assert snap.to_json()["latency_ms"] is None


def test_error_kinds_beyond_the_limit_fold_into_other() -> None:
    m = Metrics()
    for i in range(MAX_ERROR_KINDS + 10):
        m.record(0.001, f"kind-{i}")
    errors = m.snapshot().errors
    assert len(errors) == MAX_ERROR_KINDS + 1
    assert errors["other"] == 10


def test_concurrent_records_are_all_counted_across_snapshots() -> None:
    m = Metrics()
    total = 0
    stop = threading.Event()

    def snapshots() -> None:
        nonlocal total
        while not stop.is_set():
            total += m.snapshot().requests

    def work() -> None:
        for _ in range(20_000):
            m.record(0.001)

    snapper = threading.Thread(target=snapshots)
    snapper.start()
    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    snapper.join()
    total += m.snapshot().requests
    assert total == 80_000
