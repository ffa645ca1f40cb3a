"""The drift reference stored in the manifest, computed from the calibration set.

Each input is summarised into features with :func:`agent.bundle.drift.summarise` (the same
definition the agent applies to live requests), and each feature gets quantile bin edges,
the calibration set's fraction in every bin, its mean and its standard deviation.

Size is bounded whatever the model: at most ``max_features`` features per input and
``max_total_features`` over all inputs, each with at most ``bins - 1`` edges; numbers are
rounded to 6 significant digits (the agent compares fractions, not exact values).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.bundle.drift import MAX_DRIFT_FEATURES, default_groups, summarise
from agent.bundle.manifest import DriftFeatureRef, DriftReference
from agent.errors import ConfigError
from sdk.build.datasets import Dataset

__all__ = ["DEFAULT_BINS", "MAX_TOTAL_FEATURES", "drift_reference"]

DEFAULT_BINS = 10
MAX_TOTAL_FEATURES = 256


def drift_reference(
    data: Dataset,
    *,
    bins: int = DEFAULT_BINS,
    max_features: int = MAX_DRIFT_FEATURES,
    max_total_features: int = MAX_TOTAL_FEATURES,
) -> DriftReference:
    """Per-feature quantile bins, fractions, mean and std of ``data``'s inputs.

    Raises:
        ConfigError: the data set is empty or holds NaN / infinite values.
        ValueError: ``bins`` is outside 2..65 or a feature budget is below 1.
    """
    if not 2 <= bins <= 65:
        raise ValueError(f"bins must be in 2..65 (the manifest holds at most 64 edges), got {bins}")
    if max_features < 1 or max_total_features < 1:
        raise ValueError("feature budgets must be >= 1")
    if len(data) == 0:
        raise ConfigError(f"cannot compute a drift reference from empty data set {data.source}")
    names = data.input_names
    per_input = max(1, min(max_features, max_total_features // len(names)))
    groups: dict[str, int] = {}
    features: list[DriftFeatureRef] = []
    quantiles = np.arange(1, bins) / bins
    for name in names:
        arr = data.inputs[name]
        flat_size = int(np.prod(arr.shape[1:], dtype=np.int64))
        groups[name] = default_groups(flat_size, per_input)
        values = summarise(arr, groups[name])
        if not np.all(np.isfinite(values)):
            raise ConfigError(
                f"input {name!r} of data set {data.source} holds NaN or infinite values"
            )
        features.extend(
            _feature(name, index, values[:, index], quantiles) for index in range(groups[name])
        )
    return DriftReference(sample_count=len(data), groups=groups, features=tuple(features))


def _feature(
    name: str, index: int, column: npt.NDArray[np.float64], quantiles: npt.NDArray[np.float64]
) -> DriftFeatureRef:
    # Rounded before binning, so the fractions describe exactly the edges stored.
    edges = np.unique(_round(np.quantile(column, quantiles)))
    # Bins are (-inf, e0], (e0, e1], ..., (eN, inf): searchsorted "left" gives that index.
    counts = np.bincount(np.searchsorted(edges, column, side="left"), minlength=len(edges) + 1)
    fractions = _round(counts / len(column))
    return DriftFeatureRef(
        input=name,
        index=index,
        edges=tuple(float(e) for e in edges),
        fractions=tuple(float(f) for f in fractions),
        mean=float(_round(np.array([column.mean()]))[0]),
        std=float(_round(np.array([column.std()]))[0]),
    )


def _round(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Six significant digits: enough for drift statistics, a third of the JSON."""
    return np.array([float(f"{v:.6g}") for v in np.asarray(x, np.float64)], dtype=np.float64)
