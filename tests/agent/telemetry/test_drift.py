import math

import numpy as np
import pytest

from agent.bundle.manifest import DriftFeatureRef, DriftReference
from agent.telemetry._drift import DEFAULT_MIN_ROWS_FOR_PSI, DriftMonitor, psi, psi_band
from sdk.build.datasets import Dataset
from sdk.build.drift_reference import drift_reference


def _reference(groups: int = 4, edges: tuple[float, ...] = (-1.0, 0.0, 1.0)) -> DriftReference:
    # Standard normal bins: P(x<=-1)=.1587, P(-1<x<=0)=.3413, ...
    fractions = (0.1587, 0.3413, 0.3413, 0.1587)
    return DriftReference(
        sample_count=1000,
        groups={"x": groups},
        features=tuple(
            DriftFeatureRef("x", i, edges, fractions, mean=0.0, std=1.0) for i in range(groups)
        ),
    )


def test_psi_matches_a_hand_computation() -> None:
    expected = [0.25, 0.25, 0.5]
    counts = [50, 30, 20]  # actual fractions .5, .3, .2
    hand = (
        (0.5 - 0.25) * math.log(0.5 / 0.25)
        + (0.3 - 0.25) * math.log(0.3 / 0.25)
        + (0.2 - 0.5) * math.log(0.2 / 0.5)
    )
    assert psi(expected, counts) == pytest.approx(hand, rel=1e-12)


def test_psi_of_an_identical_distribution_is_zero() -> None:
    assert psi([0.2, 0.3, 0.5], [20, 30, 50]) == pytest.approx(0.0, abs=1e-12)


def test_psi_stays_finite_for_empty_bins() -> None:
    assert math.isfinite(psi([0.5, 0.5, 0.0], [0, 10, 0]))


@pytest.mark.parametrize(
    ("value", "band"),
    [
        (0.0, "stable"),
        (0.099, "stable"),
        (0.1, "moderate"),
        (0.249, "moderate"),
        (0.25, "significant"),
    ],
)
def test_psi_bands_are_the_usual_ones(value: float, band: str) -> None:
    assert psi_band(value) == band


def test_monitor_bins_features_like_the_reference_edges() -> None:
    # Bins are (-inf, -1], (-1, 0], (0, 1], (1, inf): a value equal to an edge goes left.
    mon = DriftMonitor(_reference(groups=1), min_samples_for_psi=1, max_rows_per_sample=100)
    batch = np.array([[-2.0], [-1.0], [-0.5], [0.0], [0.5], [1.0], [3.0], [4.0]])
    mon.observe({"x": batch})
    entry = mon.snapshot()["inputs"][0]
    counts = [1 + 1, 1 + 1, 1 + 1, 2]
    assert entry["psi"][0] == pytest.approx(psi([0.1587, 0.3413, 0.3413, 0.1587], counts), rel=1e-3)
    assert entry["mean"][0] == pytest.approx(batch.mean(), rel=1e-3)
    assert entry["std"][0] == pytest.approx(batch.std(), rel=1e-3)


def test_in_distribution_inputs_are_stable_and_shifted_ones_significant() -> None:
    rng = np.random.default_rng(0)
    now = [0.0]
    mon = DriftMonitor(
        _reference(), max_rows_per_sample=64, max_samples_per_s=1e9, clock=lambda: now[0]
    )
    for _ in range(50):
        mon.observe({"x": rng.standard_normal((64, 4))})
    now[0] += 10  # 5 requests/s: everything stays sampled
    same = mon.snapshot()
    for _ in range(50):
        mon.observe({"x": rng.standard_normal((64, 4)) + 1.5})
    shifted = mon.snapshot()
    assert same["band"] == "stable"
    assert shifted["band"] == "significant"
    assert shifted["inputs"][0]["mean"][0] == pytest.approx(1.5, abs=0.05)


def test_incremental_mean_and_std_match_numpy_over_many_batches() -> None:
    rng = np.random.default_rng(1)
    mon = DriftMonitor(_reference(), max_rows_per_sample=32, max_samples_per_s=1e9)
    seen = []
    for _ in range(40):
        batch = rng.normal(3.0, 2.0, size=(int(rng.integers(1, 32)), 4))
        seen.append(batch)
        mon.observe({"x": batch})
    entry = mon.snapshot()["inputs"][0]
    allx = np.concatenate(seen)
    np.testing.assert_allclose(entry["mean"], allx.mean(axis=0), rtol=1e-3)
    np.testing.assert_allclose(entry["std"], allx.std(axis=0), rtol=1e-3)
    assert entry["n"] == len(allx)


def test_wide_inputs_are_summarised_into_the_reference_groups() -> None:
    mon = DriftMonitor(_reference(groups=4), min_samples_for_psi=1)
    mon.observe({"x": np.arange(16, dtype=np.float32).reshape(1, 4, 4)})
    assert mon.snapshot()["inputs"][0]["mean"] == [1.5, 5.5, 9.5, 13.5]


def test_sampling_adapts_to_about_the_configured_samples_per_second() -> None:
    now = [0.0]
    mon = DriftMonitor(_reference(), max_samples_per_s=10, clock=lambda: now[0])
    x = {"x": np.zeros((1, 4))}

    def run(requests: int, rate_hz: float) -> int:
        sampled = 0
        for _ in range(requests):
            sampled += mon.observe(x)
            now[0] += 1 / rate_hz
        return sampled

    run(2000, 1000.0)  # settle
    mon.snapshot()
    sampled = run(1000, 1000.0)
    sampling = mon.snapshot()["sampling"]
    assert (sampling["every"], sampling["requests"], sampling["sampled"]) == (100, 1000, sampled)
    assert sampled in (9, 10, 11)  # 10/s, give or take where the window cuts the period
    assert sampling["rate"] == sampled / 1000
    run(100, 5.0)  # traffic drops: every request is sampled again
    assert mon.sample_every == 1


def test_the_first_requests_are_sampled_before_any_rate_is_known() -> None:
    mon = DriftMonitor(_reference())
    assert mon.observe({"x": np.zeros((1, 4))})


def test_rows_beyond_the_per_sample_limit_are_not_examined() -> None:
    mon = DriftMonitor(_reference(), max_rows_per_sample=2)
    mon.observe({"x": np.zeros((50, 4))})
    assert mon.snapshot()["inputs"][0]["n"] == 2


def test_psi_is_withheld_below_the_minimum_sample_count() -> None:
    mon = DriftMonitor(_reference(), min_samples_for_psi=30)
    mon.observe({"x": np.zeros((3, 4))})
    entry = mon.snapshot()["inputs"][0]
    assert entry["psi"] is None
    assert entry["band"] is None
    assert entry["mean"] == [0.0, 0.0, 0.0, 0.0]


def test_rows_with_non_finite_features_are_counted_and_skipped() -> None:
    mon = DriftMonitor(_reference(), min_samples_for_psi=1)
    mon.observe({"x": np.array([[0.0, 0, 0, 0], [np.nan, 0, 0, 0]])})
    snap = mon.snapshot()
    assert snap["nonfinite_rows"] == 1
    assert snap["inputs"][0]["n"] == 1


def test_classifier_confidence_is_a_histogram_of_the_top_probability() -> None:
    mon = DriftMonitor(None, classifier=True)
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    mon.observe({}, probs)
    out = mon.snapshot()["outputs"]
    assert out["kind"] == "top_score"
    assert out["histogram"]["counts"] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert out["mean"] == pytest.approx((0.9 + 0.4 + 0.5) / 3, rel=1e-5)


def test_classifier_logits_are_turned_into_probabilities_first() -> None:
    mon = DriftMonitor(None, classifier=True)
    mon.observe({}, np.array([[2.0, 0.0, -1.0]]))
    top = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    assert mon.snapshot()["outputs"]["max"] == pytest.approx(top, rel=1e-5)


def test_regression_outputs_get_summary_statistics() -> None:
    mon = DriftMonitor(None)
    values = np.array([[1.0], [2.0], [3.0], [6.0]])
    mon.observe({}, values)
    out = mon.snapshot()["outputs"]
    assert (out["n"], out["min"], out["max"]) == (4, 1.0, 6.0)
    assert out["mean"] == pytest.approx(3.0)
    assert out["std"] == pytest.approx(values.std(), rel=1e-5)
    assert "histogram" not in out


def test_output_statistics_survive_buffer_folds_and_width_changes() -> None:
    rng = np.random.default_rng(3)
    mon = DriftMonitor(None, max_samples_per_s=1e9, max_rows_per_sample=64)
    seen = []
    for width in (1000, 1000, 3, 3, 1000):  # 64 x 1000 values overflow the buffer
        batch = rng.normal(2.0, 0.5, size=(64, width))
        seen.append(batch.ravel())
        mon.observe({}, batch)
    out = mon.snapshot()["outputs"]
    allv = np.concatenate(seen)
    assert out["n"] == allv.size
    assert out["mean"] == pytest.approx(allv.mean(), rel=1e-5)
    assert out["std"] == pytest.approx(allv.std(), rel=1e-5)


def test_probability_rows_and_logit_rows_are_told_apart_per_row() -> None:
    mon = DriftMonitor(None, classifier=True)
    mon.observe({}, np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 5.0]]))
    out = mon.snapshot()["outputs"]
    logit_top = math.exp(5) / (2 + math.exp(5))
    assert (out["min"], out["max"]) == pytest.approx((0.7, logit_top), rel=1e-5)


def test_rows_below_the_minimum_carry_over_to_the_next_interval() -> None:
    mon = DriftMonitor(_reference(), min_samples_for_psi=5, max_rows_per_sample=100)
    mon.observe({"x": np.zeros((3, 4))})
    assert mon.snapshot()["inputs"][0]["n"] == 3
    mon.observe({"x": np.zeros((3, 4))})
    reported = mon.snapshot()["inputs"][0]
    assert reported["n"] == 6
    assert reported["psi"] is not None
    assert mon.snapshot()["inputs"][0]["n"] == 0  # reported windows start afresh


def test_same_distribution_as_the_reference_reads_stable_at_the_default_minimum() -> None:
    # 64 features, 10 quantile bins, as the SDK builds references: with too few rows the
    # worst feature's sampling noise alone would cross the 0.1 band.
    rng = np.random.default_rng(7)
    reference = drift_reference(Dataset({"x": rng.standard_normal((5000, 64))}))
    mon = DriftMonitor(reference, max_rows_per_sample=100, max_samples_per_s=1e12)
    for _ in range(DEFAULT_MIN_ROWS_FOR_PSI // 100):
        assert mon.observe({"x": rng.standard_normal((100, 64))})
    snap = mon.snapshot()
    assert snap["inputs"][0]["psi"] is not None
    assert snap["band"] == "stable"
