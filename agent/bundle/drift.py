"""The drift feature definition shared by the SDK (reference) and the agent (live).

A sample of an input is flattened to ``F`` values and cut into ``groups`` contiguous
slices of near-equal length; feature ``i`` is the mean of slice ``i``. With
``groups == F`` each element is its own feature; wide inputs (images) are summarised so
that the reference in the manifest and the agent's per-request work stay bounded.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_DRIFT_FEATURES", "default_groups", "summarise"]

MAX_DRIFT_FEATURES = 64


def default_groups(flat_size: int, max_features: int = MAX_DRIFT_FEATURES) -> int:
    """How many features an input of ``flat_size`` values per sample is summarised into."""
    return max(1, min(flat_size, max_features))


def summarise(batch: npt.NDArray[np.generic], groups: int) -> npt.NDArray[np.float64]:
    """Features of a batch: shape ``(N, ...)`` in, ``(N, groups)`` float64 out.

    Raises:
        ValueError: the batch has fewer values per sample than ``groups``.
    """
    flat = np.asarray(batch).reshape(len(batch), -1).astype(np.float64, copy=False)
    width = flat.shape[1]
    if groups > width:
        raise ValueError(f"cannot cut {width} values per sample into {groups} features")
    if groups == width:
        return flat
    bounds = (np.arange(groups + 1) * width) // groups
    sums = np.add.reduceat(flat, bounds[:-1], axis=1)
    return sums / np.diff(bounds)
