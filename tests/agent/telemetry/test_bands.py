"""The statistics behind the drift bands: the chi-square tail, Šidák, sparse bins."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from agent.telemetry._bands import FeatureTest, chi2_sf, sidak


def test_chi2_tail_matches_scipy_to_rounding() -> None:
    stats = pytest.importorskip("scipy.stats")
    df = np.repeat(np.arange(1, 65), 60)
    # From the body to far in the tail (p down to ~1e-40) for every df the bands use.
    x = np.tile(np.geomspace(1e-3, 400.0, 60), 64)
    expected = stats.chi2.sf(x, df)
    np.testing.assert_allclose(chi2_sf(x, df), expected, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("x", [0.0, 0.3, 2.0, 11.0, 60.0])
def test_chi2_tail_has_the_closed_forms_of_one_and_two_degrees(x: float) -> None:
    one, two = chi2_sf(np.array([x, x]), np.array([1, 2]))
    assert one == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-13)
    assert two == pytest.approx(math.exp(-x / 2), rel=1e-13)


def test_chi2_tail_without_degrees_of_freedom_is_one() -> None:
    # A feature whose reference holds a single bin cannot show drift.
    assert chi2_sf(np.array([1e6]), np.array([0]))[0] == 1.0


def test_chi2_tail_of_an_infinite_statistic_is_zero_not_nan() -> None:
    assert chi2_sf(np.array([np.inf, np.inf]), np.array([1, 2])).tolist() == [0.0, 0.0]


def test_sidak_is_one_minus_the_chance_that_none_of_k_is_as_small() -> None:
    p = [0.0, 1e-12, 1e-9, 0.01, 0.5, 1.0]
    # Exact rational arithmetic: 1 - (1 - p)**k in floats cancels for tiny p.
    exact = [float(1 - (1 - Fraction(v)) ** 64) for v in p]
    np.testing.assert_allclose(sidak(np.array(p), 64), exact, rtol=1e-12)


def test_bins_the_reference_barely_filled_are_merged_with_their_neighbours() -> None:
    # A tied feature (a pixel that is mostly 0): 300 reference rows, so a bin needs at
    # least 5/300 of them; the empty bin and the 1% bin join the next ones.
    expected = np.array([[0.9, 0.0, 0.01, 0.04, 0.05, 0.0]])
    cols = FeatureTest(expected, [5], reference_rows=300).columns(window_rows=1000)
    np.testing.assert_allclose(cols.expected[0][cols.expected[0] > 0], [0.9, 0.05, 0.05])
    assert cols.df.tolist() == [2]


def test_bins_are_merged_for_the_smaller_of_the_two_samples() -> None:
    # 1% bins expect 5 rows of a 500-row sample, not of a 300-row one.
    test = FeatureTest(np.full((1, 100), 0.01), [100], reference_rows=100_000)
    assert test.columns(window_rows=600).df.tolist() == [99]  # rounded down to 512
    assert test.columns(window_rows=300).df.tolist() == [49]  # 256 rows: 2% columns


def test_a_window_like_the_reference_gets_a_large_p_value_and_a_shifted_one_a_tiny_one() -> None:
    expected = np.full((1, 10), 0.1)
    test = FeatureTest(expected, [10], reference_rows=1000)
    same = test.p_values(np.full((1, 10), 30.0))
    shifted = test.p_values(np.array([[10.0, 10, 20, 20, 30, 30, 40, 40, 50, 50]]))
    assert same[0] == pytest.approx(1.0)
    assert shifted[0] < 1e-6
