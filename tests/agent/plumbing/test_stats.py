"""One percentile definition: nearest rank, always an observed value."""

from __future__ import annotations

import random

import numpy as np
import pytest

from agent.plumbing.compat import zip_strict
from agent.plumbing.stats import percentile, percentile_ms, quantile_rank
from agent.telemetry import LogHistogram


def test_p95_is_the_nearest_rank_of_observed_values() -> None:
    assert percentile_ms([0.001 * i for i in range(1, 21)], 0.95) == pytest.approx(19.0)
    assert percentile_ms([0.002], 0.95) == pytest.approx(2.0)
    assert percentile_ms([], 0.95) == 0.0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 19, 20, 21, 99, 100, 101, 1000])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_percentile_matches_numpys_inverted_cdf_definition(n: int, q: float) -> None:
    values = [random.Random(n).random() for _ in range(n)]
    assert percentile(values, q) == float(np.percentile(values, 100 * q, method="inverted_cdf"))


def test_a_rank_is_never_off_by_a_float_rounding() -> None:
    # 0.95 * 100 is 95.00000000000001 in binary floating point; the rank is still 95.
    assert quantile_rank(0.95, 100) == 95
    assert quantile_rank(0.5, 4) == 2  # the lower median: an observed value
    assert quantile_rank(0.0, 5) == 1


@pytest.mark.parametrize(("q", "n"), [(-0.1, 5), (1.5, 5), (0.5, 0)])
def test_a_quantile_outside_zero_one_or_no_data_is_refused(q: float, n: int) -> None:
    with pytest.raises(ValueError, match=r"quantile|observations"):
        quantile_rank(q, n)


def test_the_telemetry_histogram_reports_the_same_rank_within_its_accuracy() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-6, 1) for _ in range(5001)]
    hist = LogHistogram(relative_accuracy=0.01)
    for v in values:
        hist.add(v)
    estimates = hist.quantiles((0.5, 0.95, 0.99))
    assert estimates is not None
    for q, estimate in zip_strict((0.5, 0.95, 0.99), estimates):
        assert estimate == pytest.approx(percentile(values, q), rel=0.0101)
