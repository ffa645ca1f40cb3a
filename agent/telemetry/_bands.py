"""Drift bands calibrated for both sample sizes and the number of features compared.

The classic PSI bands (0.1, 0.25) assume both distributions are known exactly. Here both
are samples: the reference summarises ``n`` calibration rows (``sample_count`` in the
manifest), the window ``m`` sampled rows, and the band is the worst of up to 256
features. Two samples of one distribution then show a PSI of about ``(bins - 1) / N``
with ``N = n m / (n + m)``, and the worst of 64 features crosses 0.1 in most windows of
300 rows against a 300-row reference (the quickstart's digits: 73 % of windows read
"moderate").

So each feature is first tested for being a sample of the reference's distribution at
all, by two forms of the two-sample chi-square test of homogeneity between the
reference's bin counts (its fractions times ``n``) and the window's, both chi-square
distributed with (bins - 1) degrees of freedom when the two samples share a
distribution (``N = n m / (n + m)``, ``e`` and ``a`` the reference and window fractions):

    Pearson     X2 = N * sum((e_i - a_i)**2 / p_i),  p_i = (n e_i + m a_i) / (n + m)
    Hellinger   H2 = 4 N * sum((sqrt(e_i) - sqrt(a_i))**2)

PSI is asymptotically the same statistic (``N * PSI`` too), but its log ratio and the
floor for empty bins make its tail heavier where bins hold few rows. The reference's bins
are its own quantiles, which makes its noise about twice as skewed as a multinomial
sample's; then Pearson's form is liberal in the far tail when the window is much larger
than the reference (2-4 times too many p-values below 1e-4 at 300 reference rows and
4,000 window rows), and the variance-stabilised Hellinger form when the window is the
smaller sample (up to 2 times). Each is accurate where the other is not, so a feature's
p-value is the larger of the two: calibrated or conservative at every pair of sizes
measured. Bins expecting fewer than :data:`MIN_EXPECTED_ROWS` rows in the smaller
sample are first merged with their neighbours
(Cochran's rule): tied features (pixels that are mostly 0) have such bins. The
chi-square tail is computed exactly (:func:`chi2_sf`, closed forms for integer degrees
of freedom), without scipy.

The worst of ``k`` features needs a family-wise correction: Šidák's, ``1 - (1 - p)**k``,
exact for independent features and conservative for positively dependent ones. A
feature *drifts* when its corrected p-value is below :data:`ALPHA`; the band is the
classic band of the largest PSI among drifting features, "stable" when none drifts. So a
band other than "stable" means both: the shift is beyond what sampling explains (at most
:data:`ALPHA` of in-distribution windows raise one, whatever the sizes and the feature
count), and it is as large as the classic bands call moderate or significant (a real
shift too small to matter, which large windows can prove, stays "stable"; its PSI is in
the message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.plumbing.compat import zip_strict

__all__ = [
    "ALPHA",
    "MIN_EXPECTED_ROWS",
    "FeatureTest",
    "chi2_sf",
    "sidak",
]

# Family-wise false-alarm rate per reported window: at most one false band in about a
# day for a device reporting every 10 s (8,640 windows), per device of a fleet. The
# chi-square tail is light, so little detection is given up against 1e-3 (docs/mqtt.md
# has the measured rates).
ALPHA = 1e-4
MIN_EXPECTED_ROWS = 5.0

FloatArray = npt.NDArray[np.float64]


def chi2_sf(x: FloatArray, df: npt.NDArray[np.integer[Any]]) -> FloatArray:
    """P(X > x) for X chi-square with integer ``df`` degrees of freedom (elementwise).

    The regularised upper incomplete gamma function Q(df / 2, x / 2) at integer and
    half-integer shapes, by its finite series: Q(1, y) = e^-y, Q(1/2, y) = erfc(sqrt y),
    Q(a + 1, y) = Q(a, y) + y^a e^-y / Gamma(a + 1). Exact to rounding (relative error
    below 1e-12 against scipy); ``df`` < 1 gives 1 (nothing to test).
    """
    # Beyond 1e6 every tail here is 0; the cap keeps inf * 0 (a NaN) out of the series.
    y = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1e6) / 2
    df = np.asarray(df)
    odd = df % 2 == 1
    erfc = np.array([math.erfc(math.sqrt(v)) if o else 0.0 for v, o in zip_strict(y, odd)])
    e = np.exp(-y)
    q = np.where(odd, erfc, e)
    term = np.where(odd, 2 * np.sqrt(y / math.pi) * e, y * e)  # the series' first term
    shape = np.where(odd, 0.5, 1.0)
    half = df / 2
    for _ in range(int(half.max(initial=0))):
        more = shape < half
        if not more.any():
            break
        q = q + np.where(more, term, 0.0)
        shape = shape + 1
        term = term * y / shape
    result: FloatArray = np.where(df < 1, 1.0, np.minimum(q, 1.0))
    return result


def sidak(p: FloatArray, k: int) -> FloatArray:
    """The family-wise p-value of per-feature p-values ``p`` among ``k`` features."""
    # -expm1(k * log1p(-p)) is 1 - (1 - p)**k without cancellation for tiny p.
    with np.errstate(divide="ignore"):  # p = 1: log1p(-1) = -inf, and the result is 1
        result: FloatArray = -np.expm1(k * np.log1p(-np.minimum(p, 1.0)))
    return result


class FeatureTest:
    """The homogeneity test of one input's features against their reference bins.

    ``expected`` holds each feature's reference fractions (rows padded with zeros),
    ``bins`` how many of them are real, ``reference_rows`` the reference's sample count.
    """

    def __init__(self, expected: FloatArray, bins: Sequence[int], *, reference_rows: int) -> None:
        self.reference_rows = reference_rows
        # A signed manifest is trusted, not sane: fractions outside [0, 1] must not turn
        # into NaN in a telemetry message.
        self._expected = np.clip(expected, 0.0, 1.0)
        self._bins = tuple(bins)
        # Merged bins depend on the smaller sample's size: kept per power of two of it.
        self._columns: dict[int, _Columns] = {}

    def columns(self, window_rows: int) -> _Columns:
        """The merged bins for a window of ``window_rows`` rows."""
        # Rounding the window down merges a little more than needed, never less.
        smaller = min(self.reference_rows, 1 << max(window_rows, 1).bit_length() - 1)
        cols = self._columns.get(smaller)
        if cols is None:
            cols = _Columns(self._expected, self._bins, MIN_EXPECTED_ROWS / max(smaller, 1))
            self._columns[smaller] = cols
        return cols

    def p_values(self, counts: FloatArray) -> FloatArray:
        """Per feature, the p-value of the window's bin ``counts`` under "no drift"."""
        cols = self.columns(int(counts.sum(axis=1).max(initial=0)))
        n = float(self.reference_rows)
        e = cols.expected
        c = cols.merge(counts)
        m = c.sum(axis=1, keepdims=True)
        a = c / np.maximum(m, 1.0)
        pooled = (n * e + c) / (n + m)
        seen = pooled > 0
        scale = n * m[:, 0] / (n + m[:, 0])
        pearson = np.where(seen, (e - a) ** 2 / np.where(seen, pooled, 1.0), 0.0).sum(axis=1)
        hellinger = 4 * ((np.sqrt(e) - np.sqrt(a)) ** 2).sum(axis=1)
        result: FloatArray = np.maximum(
            chi2_sf(scale * pearson, cols.df), chi2_sf(scale * hellinger, cols.df)
        )
        return result


class _Columns:
    """Each feature's bins merged into columns that hold at least ``min_fraction`` of the
    reference: adjacent bins joined left to right, a light tail joining the last full
    column. Padding bins follow the last real one (they are always empty)."""

    def __init__(self, expected: FloatArray, bins: Sequence[int], min_fraction: float) -> None:
        groups = np.zeros(expected.shape, dtype=np.intp)
        for row, count in enumerate(bins):
            column, held = 0, 0.0
            for b in range(count):
                groups[row, b] = column
                held += float(expected[row, b])
                if held >= min_fraction and b < count - 1:
                    column, held = column + 1, 0.0
            if held < min_fraction and column > 0:
                groups[row, :count][groups[row, :count] == column] = column - 1
            groups[row, count:] = groups[row, count - 1] if count else 0
        self._width = int(groups.max(initial=0)) + 1
        # (feature, bin) -> its column in a flat (features x width) array
        self._target = (np.arange(len(groups))[:, None] * self._width + groups).ravel()
        self.expected = self.merge(expected)
        self.df = (self.expected > 0).sum(axis=1) - 1

    def merge(self, per_bin: FloatArray) -> FloatArray:
        """Per-bin values (features x bins) summed into the columns (features x width)."""
        g = len(per_bin)
        flat = np.bincount(self._target, weights=per_bin.ravel(), minlength=g * self._width)
        return np.asarray(flat, dtype=np.float64).reshape(g, self._width)
