"""An optional cache of predictions for repeated inputs, and the predictor interface.

Servers (:mod:`agent.serve.http`, :mod:`agent.serve.mqtt`) call anything that is a
:class:`Predictor`: a loaded :class:`agent.serve._model.Model`, the hot-swappable
:class:`agent.serve._slot.ModelSlot`, or a :class:`PredictionCache` in front of either.

:class:`PredictionCache` is a bounded LRU (by entry count and by bytes) keyed by a
blake2b digest of the inputs: names, dtypes (with byte order), shapes and raw bytes. The
validator's conversions are deterministic, so equal keys mean equal validated inputs;
an input that fails validation is never cached. The key includes the identity of the
model that answered: the version digest when the predictor reports one
(``predict_versioned``, as the model slot does), otherwise the predictor object itself,
so a hot swap can never serve the previous model's answers, not even after a rollback
to it. Cached outputs are read-only arrays shared by every caller that hits them.

Off by default: the daemon wraps its predictor only when the configuration enables it.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "CacheConfig",
    "CacheStats",
    "PredictionCache",
    "Predictor",
    "VersionedPredictor",
    "input_digest",
    "predict_versioned",
]

Arrays = dict[str, npt.NDArray[Any]]


class Predictor(Protocol):
    """Anything that answers a prediction request (a Model, a ModelSlot, a cache)."""

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]: ...


@runtime_checkable
class VersionedPredictor(Protocol):
    """A predictor that also names the model version that answered (the model slot)."""

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]: ...

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]: ...


def predict_versioned(
    predictor: Predictor, inputs: Mapping[str, npt.ArrayLike]
) -> tuple[str | None, dict[str, npt.NDArray[Any]]]:
    """``(version, outputs)``; the version is None when ``predictor`` does not report one.

    Raises:
        whatever ``predictor.predict`` raises.
    """
    if isinstance(predictor, VersionedPredictor):
        return predictor.predict_versioned(inputs)
    return None, predictor.predict(inputs)


@dataclass(frozen=True)
class CacheConfig:
    """Bounds of the prediction cache.

    Attributes:
        enabled: off by default; repeated identical inputs are rare outside some
            sensor and kiosk workloads, and a miss costs a digest of the inputs.
        max_entries: most cached predictions.
        max_bytes: most bytes of cached outputs; a single answer larger than a quarter
            of it is not cached, so one request cannot flush the whole cache.
    """

    enabled: bool = False
    max_entries: int = 1024
    max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int


def input_digest(inputs: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """A 16-byte blake2b digest of names, dtypes, shapes and bytes, in name order.

    Every field is length-prefixed, so no two different requests share an encoding.
    ``inputs`` must hold C-contiguous numeric arrays.
    """
    h = hashlib.blake2b(digest_size=16, person=b"edgeship-in-v1")
    for name in sorted(inputs):
        a = inputs[name]
        encoded = name.encode()
        dtype = a.dtype.str.encode()
        h.update(struct.pack("<I", len(encoded)) + encoded)
        h.update(struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack(f"<I{a.ndim}Q", a.ndim, *a.shape))
        h.update(a.reshape(-1).view(np.uint8).data)  # reshape: 0-d arrays have no 1-byte view
    return h.digest()


class PredictionCache:
    """A :class:`Predictor` that remembers answers of ``predictor``. Thread-safe.

    Two concurrent misses on the same input both run the model; the cache never blocks
    one caller on another's prediction.
    """

    def __init__(self, predictor: Predictor, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig(enabled=True)
        self._predictor = predictor
        # A predictor that does not name versions always runs the same model.
        self._fixed_version = f"object-{id(predictor)}"
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[dict[str, npt.NDArray[Any]], int]] = OrderedDict()
        self._version: str | None = None
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """The cached answer for ``inputs``, or the predictor's (then cached).

        Raises:
            whatever the predictor raises; failed predictions are not cached.
        """
        return self.predict_versioned(inputs)[1]

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        """Like :meth:`predict`, also naming the model version that computed the answer.

        Raises:
            whatever the predictor raises.
        """
        arrays = _normalized(inputs)
        if arrays is None:  # not plain numeric arrays: let the validator explain
            version, outputs = predict_versioned(self._predictor, inputs)
            return version or self._fixed_version, outputs
        digest = input_digest(arrays)
        current = self._current_version()
        with self._lock:
            if current == self._version:
                entry = self._entries.get(digest)
                if entry is not None:
                    self._entries.move_to_end(digest)
                    self._hits += 1
                    return current, dict(entry[0])
            self._misses += 1
        version, outputs = predict_versioned(self._predictor, arrays)
        version = version or self._fixed_version
        self._store(version, digest, outputs)
        return version, outputs

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._entries), self._bytes
            )

    def _current_version(self) -> str:
        digest = getattr(self._predictor, "digest", None)
        return digest if isinstance(digest, str) else self._fixed_version

    def _store(self, version: str, digest: bytes, outputs: dict[str, npt.NDArray[Any]]) -> None:
        size = sum(a.nbytes for a in outputs.values())
        if size * 4 > self.config.max_bytes:
            return
        for a in outputs.values():
            a.setflags(write=False)  # shared by every later hit
        with self._lock:
            if version != self._version:
                # Another model answers now: nothing cached can be served again.
                self._entries.clear()
                self._bytes = 0
                self._version = version
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[digest] = (dict(outputs), size)
            self._bytes += size
            while (
                len(self._entries) > self.config.max_entries or self._bytes > self.config.max_bytes
            ):
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self._evictions += 1


def _normalized(inputs: Mapping[str, npt.ArrayLike]) -> Arrays | None:
    out: Arrays = {}
    for name, value in inputs.items():
        key: object = name  # callers are untyped at runtime: the validator explains bad keys
        if not isinstance(key, str):
            return None
        try:
            a = np.asarray(value)
        except (ValueError, TypeError):
            return None
        if a.dtype.kind not in "biuf":
            return None
        # Not np.ascontiguousarray(value): it turns a 0-d array into a 1-d one.
        out[name] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return out
