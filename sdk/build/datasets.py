"""Calibration and validation data sets: load from .npy / .npz / a folder, digest, batch.

A data set is a mapping from model input name to an array whose first axis is the sample
axis, plus optional integer class labels. On disk:

* ``.npy``: one array, the samples of a model's only input (named :data:`UNNAMED_INPUT`
  until :meth:`Dataset.bind` gives it the model's input name);
* ``.npz``: one array per input name, and optionally a ``labels`` array;
* a folder: every ``.npy`` / ``.npz`` in it, sorted by file name and concatenated along the
  sample axis (all files must hold the same keys).

Labels may also come from a separate ``.npy`` file. Files are read with
``allow_pickle=False``: a data set is never code.

The digest (:attr:`Dataset.sha256`) is computed over the arrays (names, dtypes, shapes and
little-endian bytes in a canonical order), not over file bytes, so the same samples have
the same digest whether stored as one .npz or split over a folder of .npy files.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError

__all__ = ["LABELS_KEY", "UNNAMED_INPUT", "Dataset", "Progress", "load_dataset"]

LABELS_KEY = "labels"
UNNAMED_INPUT = "input"
_DIGEST_DOMAIN = b"edgeship-dataset-v1\n"

Array = npt.NDArray[np.generic]
# Progress hook: (step name, items done, items total). The CLI renders it with rich.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Dataset:
    """Samples keyed by input name (first axis = sample axis) and optional labels.

    Construct with :func:`load_dataset` or directly; the constructor checks that every
    array has the same number of samples.

    Raises:
        ConfigError: no inputs, arrays without a sample axis, or differing sample counts.
    """

    inputs: Mapping[str, Array]
    labels: npt.NDArray[np.integer] | None = None
    # Which files the samples came from, for messages only (not part of the digest).
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError(f"data set {self.source} holds no input arrays")
        counts = {name: _sample_count(arr, name, self.source) for name, arr in self.inputs.items()}
        if self.labels is not None:
            if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
                raise ConfigError(
                    f"data set {self.source}: labels must be a 1-D integer array of class"
                    f" indices, got dtype {self.labels.dtype} shape {self.labels.shape}"
                )
            counts[LABELS_KEY] = len(self.labels)
        if len(set(counts.values())) != 1:
            raise ConfigError(
                f"data set {self.source}: arrays differ in sample count ({counts});"
                " every input and the labels need the same first dimension"
            )

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.inputs))

    @cached_property
    def sha256(self) -> str:
        """Digest of the arrays: names, dtypes, shapes, little-endian bytes, sorted by name."""
        h = hashlib.sha256(_DIGEST_DOMAIN)
        entries: list[tuple[str, Array]] = [
            (f"input:{n}", self.inputs[n]) for n in sorted(self.inputs)
        ]
        if self.labels is not None:
            # Label dtype width is a storage detail (int32 vs int64): hash them as int64.
            entries.append(("labels", self.labels.astype("<i8")))
        for name, arr in entries:
            le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            header = f"{name}\0{le.dtype.str}\0{','.join(map(str, le.shape))}\0{le.nbytes}\n"
            h.update(header.encode("utf-8"))
            h.update(le.tobytes())
        return h.hexdigest()

    def bind(self, input_names: Sequence[str]) -> Dataset:
        """This data set with its inputs named after the model's ``input_names``.

        An unnamed data set (from .npy) with one array takes the model's only input name;
        a named one must hold exactly the model's inputs.

        Raises:
            ConfigError: the data set's inputs do not match the model's.
        """
        names = tuple(input_names)
        if set(self.inputs) == set(names):
            return self
        if tuple(self.inputs) == (UNNAMED_INPUT,) and len(names) == 1:
            return Dataset({names[0]: self.inputs[UNNAMED_INPUT]}, self.labels, self.source)
        raise ConfigError(
            f"data set {self.source} has inputs {sorted(self.inputs)} but the model expects"
            f" {sorted(names)}; store one array per model input in a .npz keyed by input name"
        )

    def take(self, count: int) -> Dataset:
        """The first ``count`` samples (all of them if there are fewer)."""
        return Dataset(
            {k: v[:count] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:count],
            self.source,
        )

    def batches(self, batch_size: int) -> Iterator[dict[str, Array]]:
        """Consecutive batches of at most ``batch_size`` samples, keyed by input name.

        Raises:
            ValueError: ``batch_size`` is not positive.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}


def load_dataset(
    path: Path | str,
    *,
    labels: Path | str | None = None,
    input_names: Sequence[str] | None = None,
) -> Dataset:
    """Load a data set from a .npy file, a .npz file or a folder of them.

    ``labels`` names a separate .npy of class indices (instead of a ``labels`` key).
    With ``input_names`` the result is :meth:`Dataset.bind`-ed to the model's inputs.

    Raises:
        ConfigError: the path is missing, unreadable, not .npy/.npz, holds pickled
            objects, or its arrays do not fit together.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
        if not files:
            raise ConfigError(f"data set folder {root} contains no .npy or .npz files")
        parts = [_load_file(p) for p in files]
        keys = set(parts[0])
        for p, part in zip(files, parts, strict=True):
            if set(part) != keys:
                raise ConfigError(
                    f"data set folder {root}: {p.name} holds {sorted(part)} but {files[0].name}"
                    f" holds {sorted(keys)}; every file needs the same arrays"
                )
        arrays = {k: _concatenate([part[k] for part in parts], k, root) for k in keys}
    elif root.is_file():
        arrays = _load_file(root)
    else:
        raise ConfigError(f"data set {root} does not exist")

    label_array = arrays.pop(LABELS_KEY, None)
    if labels is not None:
        if label_array is not None:
            raise ConfigError(
                f"data set {root} already has a {LABELS_KEY!r} array; do not also pass a"
                " labels file"
            )
        separate = _load_file(Path(labels))
        if set(separate) != {UNNAMED_INPUT}:
            raise ConfigError(f"labels file {labels} must be a single .npy array")
        label_array = separate[UNNAMED_INPUT]
    if label_array is not None and not np.issubdtype(label_array.dtype, np.integer):
        raise ConfigError(
            f"labels of data set {root} must be integer class indices, got {label_array.dtype}"
        )
    dataset = Dataset(
        arrays,
        None if label_array is None else label_array.astype(np.int64, copy=False),
        str(root),
    )
    return dataset.bind(input_names) if input_names is not None else dataset


def _load_file(path: Path) -> dict[str, Array]:
    try:
        if path.suffix == ".npy":
            return {UNNAMED_INPUT: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise ConfigError(f"data set file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # numpy raises ValueError for object arrays when pickles are disallowed.
        raise ConfigError(f"cannot read data set file {path}: {exc}") from None
    raise ConfigError(f"data set file {path} must end in .npy or .npz")


def _sample_count(arr: Array, name: str, source: str) -> int:
    if not isinstance(arr, np.ndarray) or arr.ndim == 0:
        raise ConfigError(
            f"data set {source}: array {name!r} needs a leading sample axis (got a scalar)"
        )
    if arr.dtype.kind not in "biuf":
        raise ConfigError(
            f"data set {source}: array {name!r} has dtype {arr.dtype}; use bool, int or float"
        )
    return int(arr.shape[0])


def _concatenate(parts: list[Array], key: str, root: Path) -> Array:
    try:
        return np.concatenate(parts, axis=0)
    except ValueError as exc:
        raise ConfigError(
            f"data set folder {root}: arrays {key!r} cannot be concatenated along the sample"
            f" axis ({exc})"
        ) from None
