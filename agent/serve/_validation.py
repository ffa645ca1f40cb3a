"""Check a prediction request against the model's input signature, before any runtime sees it.

Pure: arrays in, arrays out or :class:`~agent.errors.InputValidationError`. Everything that
depends only on the manifest is computed once in :class:`InputValidator`, so a call costs a
few attribute reads per input.

The rules, in the order they are applied to each input:

* **Names.** Exactly the manifest's input names: a missing or an unknown name is refused.
* **Values.** Anything numpy turns into a numeric array (arrays, nested lists, scalars).
  Ragged lists, strings, objects and complex numbers are refused.
* **Dtypes: safe casts only.** The caller's dtype is the manifest's dtype, or float32 for a
  quantized input (callers exchange floats; :mod:`agent.serve._model` quantizes).

  - same dtype (any byte order): passed through;
  - integer -> float: allowed (exact up to 2**24 for float32, which covers every pixel,
    token id and count a device feeds; a JSON request always arrives as int64 or float64);
  - float -> float, including float64 -> float32: allowed; a value beyond the target's range
    becomes infinite and is then caught by the NaN/inf rule;
  - integer -> integer: allowed when every value fits the target type, refused otherwise;
  - float -> integer, anything -> bool, bool -> anything else: refused, the truncation or
    the meaning would be a guess.
* **Shapes.** The rank must match; a fixed dimension must match; ``None`` takes any size.
  Empty tensors are refused.
* **Size.** The elements of all inputs together stay within ``max_elements``.
* **NaN/inf.** Refused in float inputs unless the policy allows them; always refused for
  quantized inputs, which have no integer to map them to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import TensorSpec
from agent.errors import InputValidationError

__all__ = ["InputPolicy", "InputValidator", "caller_dtype"]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_SMALL = 1 << 16  # elements: below this, widening to float64 is cheaper than np.errstate


@dataclass(frozen=True)
class InputPolicy:
    """Limits applied to every prediction request.

    Attributes:
        max_elements: most array elements one request may carry, all inputs together.
            The default (16 Mi elements, 64 MiB of float32) admits a batch of 100 224x224 RGB
            images and stops a request that would exhaust a small device's memory.
        allow_nonfinite: let NaN and +/-inf through to float (non-quantized) inputs.
    """

    max_elements: int = 1 << 24
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.max_elements < 1:
            raise ValueError("max_elements must be at least 1")


def caller_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """The dtype callers exchange for ``spec``: float32 when it is quantized, else its own."""
    return _F32 if spec.quantization is not None else np.dtype(spec.dtype)


@dataclass(frozen=True)
class _Check:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every fixed dimension
    check_finite: bool


class InputValidator:
    """Validates requests for one model; thread-safe (holds no mutable state).

    Raises (on call):
        InputValidationError: the request breaks one of the rules in the module docstring.
    """

    def __init__(self, inputs: Sequence[TensorSpec], policy: InputPolicy | None = None) -> None:
        self.policy = policy or InputPolicy()
        self._names = frozenset(s.name for s in inputs)
        self._max_elements = self.policy.max_elements
        self._checks = tuple(
            _Check(
                name=s.name,
                dtype=caller_dtype(s),
                shape=s.shape,
                fixed=tuple((axis, d) for axis, d in enumerate(s.shape) if d is not None),
                check_finite=caller_dtype(s).kind == "f"
                and (s.quantization is not None or not self.policy.allow_nonfinite),
            )
            for s in inputs
        )

    def __call__(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """``inputs`` as C-contiguous arrays of the caller dtypes, keyed by input name."""
        if len(inputs) != len(self._checks):
            self._refuse_names(inputs)
        out: dict[str, npt.NDArray[Any]] = {}
        total = 0
        for c in self._checks:
            try:
                value = inputs[c.name]
            except KeyError:
                self._refuse_names(inputs)
            a = value if type(value) is np.ndarray else _as_array(c.name, value)
            if a.dtype is not c.dtype:
                a = _cast(c.name, a, c.dtype)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            shape = a.shape
            if len(shape) != len(c.shape):
                raise InputValidationError(
                    f"input {c.name!r} has shape {shape}; the model takes rank {len(c.shape)}:"
                    f" {_fmt_shape(c.shape)}"
                )
            for axis, size in c.fixed:
                if shape[axis] != size:
                    raise InputValidationError(
                        f"input {c.name!r} has shape {shape}; the model takes"
                        f" {_fmt_shape(c.shape)} (dimension {axis} must be {size})"
                    )
            n = a.size
            if n == 0:
                raise InputValidationError(f"input {c.name!r} is empty (shape {shape})")
            total += n
            if total > self._max_elements:
                raise InputValidationError(
                    f"request carries more than {self._max_elements} elements (the limit);"
                    " split it into smaller batches"
                )
            if c.check_finite and not _all_finite(a):
                raise InputValidationError(
                    f"input {c.name!r} contains NaN or infinity (or a value beyond"
                    f" {c.dtype.name} range); the model's input policy refuses them"
                )
            out[c.name] = a
        return out

    def _refuse_names(self, inputs: Mapping[str, object]) -> NoReturn:
        given = set(inputs)
        missing = sorted(self._names - given)
        extra = sorted(map(repr, given - self._names))
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown input(s) {', '.join(extra)}")
        raise InputValidationError(
            f"{'; '.join(parts) or 'inputs do not match'}; the model takes"
            f" {', '.join(map(repr, sorted(self._names)))}"
        )


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _as_array(name: str, value: object) -> npt.NDArray[Any]:
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, unconvertible objects
        raise InputValidationError(f"input {name!r} is not a rectangular array: {exc}") from exc
    if a.dtype.kind not in "biuf":
        raise InputValidationError(
            f"input {name!r} has non-numeric values (numpy dtype {a.dtype}); send numbers"
        )
    return a


def _cast(name: str, a: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    src = a.dtype
    if src == dtype:  # another byte order, or an equal dtype object that is not the singleton
        return a.astype(dtype)
    src_kind, dst_kind = src.kind, dtype.kind
    if src_kind in "iuf" and dst_kind == "f":
        # Narrowing (float64 -> float32, int -> float16) can overflow to inf; rather than
        # numpy's warning, the NaN/inf rule refuses it (unless the policy lets non-finite
        # values through, and then the caller gets what they asked for).
        with np.errstate(over="ignore"):
            return a.astype(dtype)
    if src_kind in "iu" and dst_kind in "iu":
        if np.can_cast(src, dtype, "safe"):
            return a.astype(dtype)
        info = np.iinfo(dtype)
        if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
            raise InputValidationError(
                f"input {name!r} has values outside the {dtype.name} range [{info.min}, {info.max}]"
            )
        return a.astype(dtype)
    if src_kind not in "biuf":
        raise InputValidationError(
            f"input {name!r} has non-numeric values (numpy dtype {src}); send numbers"
        )
    raise InputValidationError(
        f"input {name!r} is {src.name}; the model takes {dtype.name} and converting"
        f" {src.name} to {dtype.name} could change values: convert it yourself"
    )


def _all_finite(a: npt.NDArray[Any]) -> bool:
    # A dot product of the array with itself is NaN or inf exactly when some element is,
    # or when the sum of squares overflows (then the exact check below decides). It is one
    # BLAS pass that allocates nothing; np.isfinite(a).all() is about twice as slow.
    dtype = a.dtype
    flat = a.ravel()  # a view: the validator made the array contiguous
    if dtype is _F32 and flat.size <= _SMALL:
        # In float64 the squares of float32 values cannot overflow, so numpy has nothing
        # to warn about, and widening a small array costs less than np.errstate.
        wide = flat.astype(_F64)
        if math.isfinite(wide.dot(wide)):
            return True
    elif dtype is _F32 or dtype is _F64:
        with np.errstate(over="ignore"):  # overflow only means: ask the exact check
            if math.isfinite(flat.dot(flat)):
                return True
    return bool(np.isfinite(a).all())
