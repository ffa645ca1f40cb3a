"""Live input drift against the bundle's drift reference, and output confidence.

Inputs are summarised into features exactly as the SDK did for the reference
(:func:`agent.bundle.drift.summarise`). A sampled request only copies its features (and
outputs) into a fixed-size buffer; when the buffer is full, and at every snapshot, it
is folded in one vectorised step into per-feature bin counts over the reference's bin
edges (for PSI) and a running mean and variance (Chan/Welford merge). Memory is fixed
by the reference and the buffer size, not by the traffic.

Cost per request is bounded twice: only every ``k``-th request is looked at, and only
the first ``max_rows_per_sample`` rows of its batch. ``k`` adapts at every sample from
the time the last ``k`` requests took, so that about ``max_samples_per_s`` requests per
second are sampled whatever the traffic (it may at most quadruple per sample, so one
burst does not switch sampling off; it drops at once when traffic falls). A request
that is not sampled costs one counter increment. The sampling rate is reported, so a
collector knows how many requests the numbers stand for.

PSI = sum((a - e) * ln(a / e)) over bins, with reference fractions ``e`` and live
fractions ``a`` both floored at ``1e-4`` so empty bins stay finite; it is reported per
feature as it is classically defined. The band is not the classic band of the largest
PSI, which sampling noise alone crosses with small samples and many features: it is
the classic band of the largest PSI among features whose shift is beyond sampling
noise, tested against both sample sizes with a family-wise correction
(:mod:`agent.telemetry._bands`).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.bundle.drift import summarise
from agent.bundle.manifest import DriftReference
from agent.telemetry._bands import ALPHA, FeatureTest, sidak

__all__ = ["PSI_BANDS", "PSI_FLOOR", "DriftMonitor", "psi", "psi_band"]

PSI_BANDS = (0.1, 0.25)
PSI_FLOOR = 1e-4
Band = Literal["stable", "moderate", "significant"]
# Classifier top-score histogram: 10 equal bins over [0, 1].
CONFIDENCE_BINS = 10
# Sampled rows buffered per input before they are folded into the window's statistics.
_BUFFER_ROWS = 256
# Output values buffered (rows x values per row) before folding; wider rows are cut.
_OUTPUT_BUFFER_VALUES = 65_536


# PSI estimated from n sampled rows carries a noise floor of about (bins - 1) / n (it is a
# chi-square statistic divided by n): with 10 bins, 300 rows keep a feature's noise
# around 0.03, small against the classic bands people read PSI values by, where 30 rows
# would put identical data near 0.3. (The band accounts for the noise at any row count.)
# Fewer rows than this carry over into the next telemetry interval instead of being
# reported.
DEFAULT_MIN_ROWS_FOR_PSI = 300


def psi(
    expected: Sequence[float] | npt.NDArray[np.float64],
    counts: Sequence[int] | npt.NDArray[np.int64],
) -> float:
    """Population stability index of live bin ``counts`` against reference ``expected`` fractions.

    Raises:
        ValueError: the lengths differ or no count is positive.
    """
    e = np.asarray(expected, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if e.shape != c.shape or c.sum() <= 0:
        raise ValueError("psi needs equally long expected and counts, with at least one count")
    return float(_psi_rows(e[None, :], c[None, :])[0])


def _psi_rows(e: npt.NDArray[np.float64], c: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    a = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
    a = np.maximum(a, PSI_FLOOR)
    e = np.maximum(e, PSI_FLOOR)
    result: npt.NDArray[np.float64] = ((a - e) * np.log(a / e)).sum(axis=1)
    return result


def psi_band(value: float) -> Band:
    """The classic band of a PSI value: below 0.1 stable, below 0.25 moderate, else significant."""
    if value < PSI_BANDS[0]:
        return "stable"
    if value < PSI_BANDS[1]:
        return "moderate"
    return "significant"


_BAND_ORDER: dict[Band, int] = {"stable": 0, "moderate": 1, "significant": 2}


@dataclass
class _InputState:
    """Reference, buffer and live window of the features of one model input."""

    groups: int
    index: npt.NDArray[np.intp]  # feature indices the reference covers
    edges: npt.NDArray[np.float64]  # (G, E) inner edges, padded with +inf
    expected: npt.NDArray[np.float64]  # (G, E + 1) reference fractions, padded with 0
    counts: npt.NDArray[np.int64]
    buf: npt.NDArray[np.float64]  # (_BUFFER_ROWS, G) sampled features not yet folded
    test: FeatureTest | None  # None: the reference does not say how many rows it summarises
    fill: int = 0
    n: int = 0
    nonfinite: int = 0
    mean: npt.NDArray[np.float64] | None = None
    m2: npt.NDArray[np.float64] | None = None

    @property
    def covers_all(self) -> bool:
        return len(self.index) == self.groups

    def reset(self) -> None:
        self.counts = np.zeros_like(self.counts)
        self.fill = self.n = self.nonfinite = 0
        self.mean = np.zeros(len(self.index))
        self.m2 = np.zeros(len(self.index))

    def push(self, feats: npt.NDArray[np.float64]) -> None:
        x = feats if self.covers_all else feats[:, self.index]
        if self.fill + len(x) > len(self.buf):
            self.fold()
        self.buf[self.fill : self.fill + len(x)] = x
        self.fill += len(x)

    def fold(self) -> None:
        x = self.buf[: self.fill]
        self.fill = 0
        finite = np.isfinite(x).all(axis=1)
        self.nonfinite += int(len(x) - finite.sum())
        x = x[finite]
        rows, g = x.shape
        if rows == 0:
            return
        bins = (x[:, :, None] > self.edges[None, :, :]).sum(axis=2)
        width = self.counts.shape[1]
        flat = (np.arange(g) * width + bins).ravel()
        self.counts += np.bincount(flat, minlength=g * width).reshape(g, width)
        assert self.mean is not None
        assert self.m2 is not None
        b_mean = x.mean(axis=0)
        b_m2 = ((x - b_mean) ** 2).sum(axis=0)
        total = self.n + rows
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (rows / total)
        self.m2 = self.m2 + b_m2 + delta**2 * (self.n * rows / total)
        self.n = total


def _round(values: npt.NDArray[np.float64]) -> list[float]:
    return [float(f"{v:.4g}") for v in values.tolist()]


class DriftMonitor:
    """Sampled, bounded-memory input drift and output confidence over one reporting interval.

    ``reference`` may be None (a bundle without a drift reference): then only outputs are
    summarised. Each input's band allows for the reference's own sample size
    (``reference.sample_count``; 0 gives no band). ``classifier`` chooses the output
    summary: a histogram of the top score for classifiers (softmax applied when a row is
    not already a probability vector), count/mean/std/min/max of all output values
    otherwise.
    """

    def __init__(
        self,
        reference: DriftReference | None,
        *,
        classifier: bool = False,
        max_samples_per_s: float = 50.0,
        max_rows_per_sample: int = 8,
        min_samples_for_psi: int = DEFAULT_MIN_ROWS_FOR_PSI,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_samples_per_s <= 0 or not 1 <= max_rows_per_sample <= _BUFFER_ROWS:
            raise ValueError(
                f"need max_samples_per_s > 0 and 1 <= max_rows_per_sample <= {_BUFFER_ROWS}"
            )
        self.classifier = classifier
        self.max_samples_per_s = max_samples_per_s
        self.max_rows_per_sample = max_rows_per_sample
        self.min_samples_for_psi = min_samples_for_psi
        self._clock = clock
        self._lock = threading.Lock()
        self._inputs: dict[str, _InputState] = {}
        if reference is not None:
            self._inputs = _build_states(reference)
        self._every = 1
        self._next_sample = 0
        self._counter = itertools.count()
        self._seen_at_reset = 0
        self._last_sample_at: float | None = None
        self._reset_window()

    @property
    def sample_every(self) -> int:
        return self._every

    def observe(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: npt.NDArray[Any] | None = None,
    ) -> bool:
        """Account one request (a batch); returns whether it was sampled.

        Raises:
            ValueError: an input has fewer values per sample than its drift groups.
        """
        # itertools.count is atomic under the GIL: no lock for requests we skip.
        n = next(self._counter)
        if n < self._next_sample:
            return False
        with self._lock:
            if n < self._next_sample:  # another thread took this sample
                return False
            self._adapt()
            self._next_sample = n + self._every
        rows = self.max_rows_per_sample
        feats = {
            name: summarise(inputs[name][:rows], st.groups)
            for name, st in self._inputs.items()
            if name in inputs
        }
        out = None
        if outputs is not None:
            out = np.asarray(outputs)[:rows]
            if out.ndim > 1:
                out = out.reshape(len(out), -1)
            else:  # no batch dimension for a classifier, one value per row otherwise
                out = out[None, :] if self.classifier else out[:, None]
        with self._lock:
            self._sampled += 1
            for name, f in feats.items():
                self._inputs[name].push(f)
            if out is not None:
                self._push_outputs(out)
        return True

    def _adapt(self) -> None:
        """Re-choose ``k`` from how long the last ``k`` requests took (lock held)."""
        now = self._clock()
        last, self._last_sample_at = self._last_sample_at, now
        if last is None:
            return
        k = self._every
        # The small subtraction keeps float noise in the clock from rounding k up.
        wanted = math.ceil(k / (max(now - last, 1e-9) * self.max_samples_per_s) - 1e-6)
        self._every = max(1, min(4 * k, wanted))

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready summary of the window since the previous snapshot; starts a new one."""
        seen_total = next(self._counter)  # consumes one tick: negligible, and keeps it lock-free
        with self._lock:
            for st in self._inputs.values():
                st.fold()
            self._fold_outputs()
            seen = seen_total - self._seen_at_reset
            inputs = self._inputs_json()
            doc: dict[str, Any] = {
                "sampling": {
                    "every": self._every,
                    "requests": seen,
                    "sampled": self._sampled,
                    "rate": round(self._sampled / seen, 6) if seen else None,
                    "max_rows_per_sample": self.max_rows_per_sample,
                },
                "inputs": inputs,
                "nonfinite_rows": sum(st.nonfinite for st in self._inputs.values()),
                "outputs": self._outputs_json(),
            }
            worst = [f["band"] for f in inputs if f["band"] is not None]
            doc["band"] = max(worst, key=_BAND_ORDER.__getitem__) if worst else None
            self._seen_at_reset = seen_total + 1
            # Inputs keep accumulating until they have enough rows for a PSI worth reading.
            self._reset_window(inputs=all(e["psi"] is not None for e in inputs))
        return doc

    # --- internals -------------------------------------------------------------------

    def _reset_window(self, *, inputs: bool = True) -> None:
        self._sampled = 0
        if inputs:
            for st in self._inputs.values():
                st.reset()
        self._out_buf: npt.NDArray[np.float64] | None = None
        self._out_fill = 0
        self._out_n = 0
        self._out_sum = 0.0
        self._out_m2 = 0.0
        self._out_min = math.inf
        self._out_max = -math.inf
        self._out_hist = np.zeros(CONFIDENCE_BINS, dtype=np.int64)

    def _push_outputs(self, rows: npt.NDArray[Any]) -> None:
        width = min(rows.shape[1], _OUTPUT_BUFFER_VALUES)
        if self._out_buf is None or self._out_buf.shape[1] != width:
            self._fold_outputs()
            capacity = max(len(rows), _OUTPUT_BUFFER_VALUES // width)
            self._out_buf = np.empty((capacity, width))
        elif self._out_fill + len(rows) > len(self._out_buf):
            self._fold_outputs()
        self._out_buf[self._out_fill : self._out_fill + len(rows)] = rows[:, :width]
        self._out_fill += len(rows)

    def _fold_outputs(self) -> None:
        if self._out_buf is None or self._out_fill == 0:
            return
        x = self._out_buf[: self._out_fill]
        self._out_fill = 0
        if self.classifier:
            # Rows that are not already probability vectors are logits: softmax them.
            is_prob = (x.min(axis=1) >= 0) & (np.abs(x.sum(axis=1) - 1.0) <= 1e-3)
            shifted = np.exp(x - x.max(axis=1, keepdims=True))
            soft = shifted / shifted.sum(axis=1, keepdims=True)
            values = np.where(is_prob, x.max(axis=1), soft.max(axis=1))
        else:
            values = x.ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        n_b = values.size
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        total = self._out_n + n_b
        mean_a = self._out_sum / self._out_n if self._out_n else 0.0
        delta = mean_b - mean_a
        self._out_m2 += m2_b + delta**2 * self._out_n * n_b / total
        self._out_sum += float(values.sum())
        self._out_n = total
        self._out_min = min(self._out_min, float(values.min()))
        self._out_max = max(self._out_max, float(values.max()))
        if self.classifier:
            idx = np.clip((values * CONFIDENCE_BINS).astype(np.int64), 0, CONFIDENCE_BINS - 1)
            self._out_hist += np.bincount(idx, minlength=CONFIDENCE_BINS)

    def _outputs_json(self) -> dict[str, Any] | None:
        if self._out_n == 0:
            return None
        doc: dict[str, Any] = {
            "kind": "top_score" if self.classifier else "values",
            "n": self._out_n,
            "mean": float(f"{self._out_sum / self._out_n:.6g}"),
            "std": float(f"{math.sqrt(self._out_m2 / self._out_n):.6g}"),
            "min": float(f"{self._out_min:.6g}"),
            "max": float(f"{self._out_max:.6g}"),
        }
        if self.classifier:
            doc["histogram"] = {
                "edges": [i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
                "counts": self._out_hist.tolist(),
            }
        return doc

    def _inputs_json(self) -> list[dict[str, Any]]:
        out = []
        # (entry, PSI per feature, p-value per feature) of each input tested in this window
        tested = []
        for name, st in sorted(self._inputs.items()):
            entry: dict[str, Any] = {
                "input": name,
                "n": st.n,
                "index": st.index.tolist(),
                "psi": None,
                "psi_max": None,
                "p": None,
                "band": None,
                "mean": None,
                "std": None,
            }
            if st.n and st.mean is not None and st.m2 is not None:
                entry["mean"] = _round(st.mean)
                entry["std"] = _round(np.sqrt(st.m2 / st.n))
            if st.n >= self.min_samples_for_psi:
                counts = st.counts.astype(np.float64)
                values = _psi_rows(st.expected, counts)
                entry["psi"] = _round(values)
                entry["psi_max"] = float(f"{values.max():.4g}")
                if st.test is not None:
                    tested.append((entry, values, st.test.p_values(counts)))
            out.append(entry)
        # The band is the worst over every feature compared in this message: correct for all.
        features = sum(len(values) for _, values, _ in tested)
        for entry, values, p in tested:
            family = sidak(p, features)
            entry["p"] = float(f"{family.min():.4g}")
            entry["band"] = psi_band(float(np.where(family < ALPHA, values, 0.0).max()))
        return out


def _build_states(reference: DriftReference) -> dict[str, _InputState]:
    states = {}
    for name, groups in reference.groups.items():
        refs = sorted((f for f in reference.features if f.input == name), key=lambda f: f.index)
        if not refs:
            continue
        width = max(len(f.edges) for f in refs)
        edges = np.full((len(refs), width), np.inf)
        expected = np.zeros((len(refs), width + 1))
        for row, f in enumerate(refs):
            edges[row, : len(f.edges)] = f.edges
            expected[row, : len(f.fractions)] = f.fractions
        test = None
        if reference.sample_count > 0:
            bins = [len(f.fractions) for f in refs]
            test = FeatureTest(expected, bins, reference_rows=reference.sample_count)
        st = _InputState(
            groups=groups,
            index=np.array([f.index for f in refs], dtype=np.intp),
            edges=edges,
            expected=expected,
            counts=np.zeros((len(refs), width + 1), dtype=np.int64),
            buf=np.empty((_BUFFER_ROWS, len(refs))),
            test=test,
        )
        st.reset()
        states[name] = st
    return states
