"""Golden cases: the requests a device replays in its health check.

A case is one request exactly as a caller sends it: input name -> array, in any layout
(a recurrent state with the batch on axis 1, a scalar sample rate). Cases come from a
cases file (:func:`load_cases`), from a batch-major data set (one sample per case, as a
batch of one: :func:`cases_from_dataset`), or are synthesised from the model's signature
and the builder's hints (:func:`synthesize_cases`, :class:`InputHint`).

A cases file is an ``.npz`` whose every key is ``<case>/<input>`` (``0/x``, ``0/state``,
``0/sr``, ``1/x``...; split at the first ``/``, cases numbered from 0 without gaps): the
format the bundle itself stores (docs/bundle-format.md, "Golden cases").
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle.arrays import split_cases
from agent.bundle.manifest import MAX_GOLDEN_CASES, TensorSpec
from agent.errors import ConfigError, HealthCheckError
from sdk.build.datasets import Dataset, load_dataset

__all__ = [
    "Case",
    "InputHint",
    "cases_from_dataset",
    "is_cases_file",
    "load_cases",
    "merge_hints",
    "parse_hints",
    "request_elements",
    "synthesize_cases",
]

Case = dict[str, npt.NDArray[Any]]
_HINT_RE = re.compile(r"(?P<name>[^=]+)=(?P<value>.+)")
_HINT_FIX = (
    "give real inputs (--golden-inputs cases.npz keyed <case>/<input>, see docs/building.md)"
    " or hints (--input-shape NAME=D0,D1,... --input-value NAME=V --input-range NAME=LO,HI)"
)


@dataclass(frozen=True)
class InputHint:
    """How to synthesise one input: its shape, a constant value, or a value range."""

    shape: tuple[int, ...] | None = None
    value: float | None = None
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.value is not None:
            out["value"] = self.value
        if self.low is not None:
            out["range"] = [self.low, self.high]
        return out


def parse_hints(
    shapes: Sequence[str] = (),
    values: Sequence[str] = (),
    ranges: Sequence[str] = (),
    table: Mapping[str, Any] | None = None,
) -> dict[str, InputHint]:
    """Hints from ``NAME=...`` options and a metadata ``[inputs.NAME]`` table; the options
    win over the table.

    Raises:
        ConfigError: a malformed hint, with the expected form.
    """
    fields: dict[str, dict[str, Any]] = {}
    for name, doc in (table or {}).items():
        if not isinstance(doc, dict):
            raise ConfigError(f"metadata [inputs.{name}] must be a table of shape, value, range")
        unknown = sorted(set(doc) - {"shape", "value", "range"})
        if unknown:
            raise ConfigError(f"metadata [inputs.{name}] has unknown key(s) {unknown}")
        fields.setdefault(name, {}).update(
            {k: _numbers(f"[inputs.{name}] {k}", v) for k, v in doc.items()}
        )
    for option, items in (("shape", shapes), ("value", values), ("range", ranges)):
        for text in items:
            m = _HINT_RE.fullmatch(text.strip())
            if m is None:
                raise ConfigError(f"--input-{option} {text!r} is not NAME=VALUE")
            numbers = _numbers(f"--input-{option} {text}", m.group("value").split(","))
            fields.setdefault(m.group("name"), {})[option] = numbers
    return {name: _hint(name, f) for name, f in fields.items()}


def merge_hints(
    base: Mapping[str, InputHint], override: Mapping[str, InputHint]
) -> dict[str, InputHint]:
    """``base`` with each field that ``override`` sets replaced (CLI options over a
    metadata file). Pure."""
    out = dict(base)
    for name, hint in override.items():
        old = out.get(name, InputHint())
        out[name] = InputHint(
            shape=hint.shape if hint.shape is not None else old.shape,
            value=hint.value if hint.value is not None else old.value,
            low=hint.low if hint.low is not None else old.low,
            high=hint.high if hint.high is not None else old.high,
        )
    return out


def _numbers(where: str, value: object) -> list[float]:
    items = value if isinstance(value, list) else [value]
    bad = ConfigError(f"{where}: {value!r} is not a list of numbers")
    if any(isinstance(v, bool) for v in items):
        raise bad
    try:
        return [float(str(v).strip()) for v in items]
    except ValueError:
        raise bad from None


def _hint(name: str, f: Mapping[str, list[float]]) -> InputHint:
    shape = f.get("shape")
    if shape is not None and not all(d.is_integer() and d >= 1 for d in shape):
        raise ConfigError(f"input {name!r}: shape {shape} must be positive whole numbers")
    value = f.get("value")
    if value is not None and (len(value) != 1 or not math.isfinite(value[0])):
        raise ConfigError(f"input {name!r}: value must be one finite number, not {value}")
    rng = f.get("range")
    if rng is not None and (len(rng) != 2 or not all(map(math.isfinite, rng)) or rng[0] > rng[1]):
        raise ConfigError(f"input {name!r}: range must be LOW,HIGH with LOW <= HIGH, not {rng}")
    return InputHint(
        shape=None if shape is None else tuple(int(d) for d in shape),
        value=None if value is None else value[0],
        low=None if rng is None else rng[0],
        high=None if rng is None else rng[1],
    )


def is_cases_file(path: Path) -> bool:
    """Whether ``path`` is an ``.npz`` keyed ``<case>/<input>`` (not a batch-major data set)."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all("/" in n for n in names)


def load_cases(path: Path, specs: Sequence[TensorSpec], count: int) -> list[Case]:
    """Golden cases from ``path``: a cases file (every case kept), or a batch-major data set
    (``count`` samples, see :func:`cases_from_dataset`).

    Raises:
        ConfigError: unreadable, or the cases do not name exactly the model's inputs.
    """
    names = [s.name for s in specs]
    if not is_cases_file(path):
        return cases_from_dataset(load_dataset(path, input_names=names), count)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read golden cases {path}: {exc}") from None
    numbers = {k.partition("/")[0] for k in arrays}
    if len(numbers) > MAX_GOLDEN_CASES:
        raise ConfigError(
            f"{path} holds {len(numbers)} golden cases; a bundle carries at most"
            f" {MAX_GOLDEN_CASES} (the health gate replays every one): keep fewer"
        )
    try:
        cases = split_cases(arrays, len(numbers), str(path))
    except HealthCheckError as exc:
        raise ConfigError(f"{exc} (cases are numbered 0, 1, ... without gaps)") from None
    for i, case in enumerate(cases):
        if set(case) != set(names):
            raise ConfigError(
                f"golden case {i} in {path} has inputs {sorted(case)}; the model takes"
                f" {sorted(names)}"
            )
    return cases


def cases_from_dataset(data: Dataset, count: int) -> list[Case]:
    """``count`` samples spread evenly over ``data`` (first and last included), each one
    request holding a batch of one."""
    n = len(data)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return [{k: np.asarray(v)[i : i + 1] for k, v in data.inputs.items()} for i in idx]


def synthesize_cases(
    specs: Sequence[TensorSpec], count: int, hints: Mapping[str, InputHint], seed: int = 0
) -> list[Case]:
    """``count`` deterministic pseudo-random requests that fit ``specs`` and ``hints``.

    A leading dynamic dimension is a batch of one; other dynamic dimensions need a
    shape hint, and integer inputs a value or a range (a sample rate or a token id drawn
    at random would test nothing): both are refused without one, saying what to pass.

    Raises:
        ConfigError: a hint names no input or does not fit one, or an input needs a hint.
    """
    unknown = sorted(set(hints) - {s.name for s in specs})
    if unknown:
        raise ConfigError(
            f"input hints name {unknown}, which the model does not take; it takes"
            f" {sorted(s.name for s in specs)}"
        )
    rng = np.random.default_rng(seed)
    shapes = {s.name: _shape(s, hints.get(s.name, InputHint())) for s in specs}
    return [
        {s.name: _values(s, shapes[s.name], hints.get(s.name, InputHint()), rng) for s in specs}
        for _ in range(count)
    ]


def _shape(spec: TensorSpec, hint: InputHint) -> tuple[int, ...]:
    if hint.shape is not None:
        fits = len(hint.shape) == len(spec.shape) and all(
            d is None or d == h for d, h in zip(spec.shape, hint.shape, strict=True)
        )
        if not fits:
            raise ConfigError(
                f"--input-shape {spec.name}={','.join(map(str, hint.shape))} does not fit the"
                f" model's {_fmt(spec.shape)}"
            )
        return hint.shape
    dynamic = [i for i, d in enumerate(spec.shape) if d is None and i > 0]
    if dynamic:
        raise ConfigError(
            f"input {spec.name!r} has dynamic dimension(s) {dynamic} in {_fmt(spec.shape)}:"
            f" golden inputs cannot be synthesised without its shape; {_HINT_FIX}"
        )
    return tuple(1 if d is None else d for d in spec.shape)


def _values(
    spec: TensorSpec, shape: tuple[int, ...], hint: InputHint, rng: np.random.Generator
) -> npt.NDArray[Any]:
    dtype = np.float32 if spec.quantization is not None else np.dtype(spec.dtype)
    if hint.value is not None:
        return np.full(shape, hint.value).astype(dtype)
    floating = np.dtype(dtype).kind == "f"
    if hint.low is not None and hint.high is not None:
        if floating:
            return rng.uniform(hint.low, hint.high, shape).astype(dtype)
        return rng.integers(math.ceil(hint.low), math.floor(hint.high) + 1, shape).astype(dtype)
    if floating:
        return rng.standard_normal(shape).astype(dtype)
    if np.dtype(dtype).kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    raise ConfigError(
        f"input {spec.name!r} is {spec.dtype}: golden values cannot be guessed for it; {_HINT_FIX}"
    )


def request_elements(case: Mapping[str, npt.NDArray[Any]]) -> int:
    """Input elements of one request: what the agent's thread choice weighs."""
    return sum(int(np.asarray(a).size) for a in case.values())


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
