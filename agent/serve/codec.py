"""Tensors on the wire: the JSON and binary encodings of prediction requests and answers.

Both remote ways to call a model (:mod:`agent.serve.http`, :mod:`agent.serve.mqtt`)
speak the same two encodings.

**JSON** (``application/json``). A request names each input and gives it either typed::

    {"inputs": {"x": {"dtype": "float32", "shape": [1, 64], "data": [0.5, ...]}}}

(``data`` flat in C order, or nested), or as plain nested lists, which are taken as
numbers and cast to the model's dtype by the input validator::

    {"inputs": {"x": [[0.5, ...]]}}

Answers are always typed, with flat data: ``{"outputs": {"probs": {"dtype": ...,
"shape": ..., "data": [...]}}}``. Other top-level fields travel as metadata
(``reply_to``, ``correlation_id``, ``model``). Python's ``json`` reads and writes
``NaN``/``Infinity`` tokens; use the binary encoding where values must be exact.

Plain integer tensors decode to the narrowest of int8, int16, int32 and int64 that holds
every value (the input validator casts them to the model's dtype); plain floats to
float64. Memory stays proportional to the message: arrays of plain numbers are read
straight into numpy (:mod:`agent.serve._json_read`), everything else in a message (its
*structure*: names, dtypes, shapes, metadata, and arrays of anything but plain numbers)
is capped at ``max_header_bytes``, and the decoded tensors at ``max_decoded_per_byte``
bytes per message byte (plus ``decoded_allowance_bytes``), every element counted at least
4 bytes.

**Binary** (``application/vnd.edgeship.tensors``), for speed and exact values::

    b"EST1" | uint32 little-endian H | H bytes of UTF-8 JSON header | tensor data

The header is ``{"tensors": [{"name": "x", "dtype": "float32", "shape": [1, 64]}, ...]}``
plus any metadata fields. Tensor data follow in header order, raw little-endian C-order
bytes, each starting at an offset (from the start of the message) that is a multiple of
8, zero-padded in between; the message ends exactly after the last tensor. The encoder
pads the header with spaces so the first tensor is aligned too. Decoding is zero-copy:
the arrays are read-only views of the message.

Decoding never trusts a length: header size, tensor count, names, dtypes, ranks and the
total element count (also of a tensor with a size 0: its other sizes count) are checked
against :class:`CodecLimits` before anything is allocated, and the data must fill the
message exactly. Nothing is ever unpickled. Every refusal is an
:class:`~agent.errors.InputValidationError` saying what was wrong.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import DTYPES
from agent.errors import InputValidationError
from agent.plumbing.compat import json_int
from agent.serve import _json_read
from agent.serve._json_read import Budget, NumericArray, holds_array

__all__ = [
    "BINARY_CONTENT_TYPE",
    "BINARY_MAGIC",
    "JSON_CONTENT_TYPE",
    "WIRE_DTYPES",
    "CodecLimits",
    "TensorMessage",
    "binary_header",
    "decode",
    "decode_binary",
    "decode_json",
    "encode_binary",
    "encode_json",
    "encode_json_parts",
    "is_binary",
    "message_fields",
]

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/vnd.edgeship.tensors"
BINARY_MAGIC = b"EST1"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 8

# The manifest's dtypes, plus the unsigned types a model may return.
WIRE_DTYPES: frozenset[str] = DTYPES | {"uint32", "uint64"}
_LE = {name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES}
_RESERVED = frozenset({"inputs", "outputs", "tensors"})
_ENCODE_CHUNK = 1 << 16  # elements turned into Python numbers at a time

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class CodecLimits:
    """Bounds every decoded message must respect; checked before allocating.

    Attributes:
        max_tensors: most tensors one message may carry.
        max_elements: most elements of all tensors together (the validator's default).
        max_rank: most dimensions of one tensor.
        max_header_bytes: largest binary header, and largest JSON structure (everything
            but arrays of plain numbers).
        max_name_chars: longest tensor name.
        max_decoded_per_byte: bytes of decoded JSON tensors (each element counted at least
            4 bytes, as the validator will widen it) per byte of message, beyond
            ``decoded_allowance_bytes``: a JSON message of short numbers cannot make the
            process allocate more for its tensors than it sent, as a binary one cannot.
        decoded_allowance_bytes: what any JSON message may decode to, whatever its size.
    """

    max_tensors: int = 64
    max_elements: int = 1 << 24
    max_rank: int = 8
    max_header_bytes: int = 64 * 1024
    max_name_chars: int = 128
    max_decoded_per_byte: float = 1.0
    decoded_allowance_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_elements", "max_rank", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # Elements times the widest item size must never overflow numpy's sizes.
        if self.max_elements > sys.maxsize // 16:
            raise ValueError(f"max_elements must be at most {sys.maxsize // 16}")
        if not self.max_decoded_per_byte > 0 or self.decoded_allowance_bytes < 0:
            raise ValueError("max_decoded_per_byte must be positive, decoded_allowance_bytes >= 0")


@dataclass(frozen=True)
class TensorMessage:
    """A decoded message: tensors by name, and the message's other top-level fields."""

    tensors: Arrays
    meta: Mapping[str, Any] = field(default_factory=dict)


def is_binary(body: bytes | memoryview) -> bool:
    """True when ``body`` starts like a binary message (JSON never starts with ``E``)."""
    return bytes(body[:4]) == BINARY_MAGIC


def decode(body: bytes, key: str = "inputs", limits: CodecLimits | None = None) -> TensorMessage:
    """Decode either encoding, told apart by the binary magic.

    Raises:
        InputValidationError: the message is malformed or exceeds ``limits``.
    """
    if is_binary(body):
        return decode_binary(body, limits)
    return decode_json(body, key, limits)


# --- JSON ------------------------------------------------------------------------------


def decode_json(
    body: bytes | str, key: str = "inputs", limits: CodecLimits | None = None
) -> TensorMessage:
    """Decode a JSON message whose tensors sit under ``key``.

    Raises:
        InputValidationError: not UTF-8 JSON, not an object with an object under ``key``,
            a malformed tensor, or ``limits`` exceeded.
    """
    limits = limits or CodecLimits()
    raw = _json_read.utf8(body)
    doc = _json_read.load(raw, limits.max_header_bytes, limits.max_rank)
    if not isinstance(doc, dict):
        _refuse(f'the request must be a JSON object like {{"{key}": {{"name": ...}}}}')
    tensors = doc.get(key)
    if not isinstance(tensors, dict) or not tensors:
        _refuse(f'the request needs a non-empty object "{key}" mapping tensor names to values')
    if len(tensors) > limits.max_tensors:
        _refuse(f"the request carries {len(tensors)} tensors; at most {limits.max_tensors}")
    meta = {k: v for k, v in doc.items() if k != key}
    if any(holds_array(v) for v in meta.values()):
        _refuse(f'large arrays of numbers are accepted only as tensors under "{key}"')
    allowance = int(limits.max_decoded_per_byte * len(raw)) + limits.decoded_allowance_bytes
    budget = Budget(limits.max_elements, allowance)
    out: Arrays = {}
    for name, value in tensors.items():
        _check_name(name, limits)
        if isinstance(value, dict):
            a = _typed_json(name, value, limits, budget)
        else:
            a = _plain(name, value, budget)
        if a.ndim > limits.max_rank:
            _refuse(f"tensor {name!r} has rank {a.ndim}; at most {limits.max_rank}")
        out[name] = a
    return TensorMessage(out, meta)


def message_fields(
    body: bytes | memoryview, key: str = "inputs", limits: CodecLimits | None = None
) -> dict[str, Any]:
    """The top-level fields of a message in either encoding other than its tensors, without
    decoding them: where to answer a request that failed. Large arrays of numbers in a JSON
    message are left out.

    Raises:
        InputValidationError: the header or the JSON structure is malformed or too large.
    """
    limits = limits or CodecLimits()
    if is_binary(body):
        return {k: v for k, v in binary_header(body, limits).items() if k != "tensors"}
    doc = _json_read.load(bytes(body), limits.max_header_bytes, limits.max_rank)
    if not isinstance(doc, dict):
        _refuse("the request must be a JSON object")
    return {k: v for k, v in doc.items() if k != key and not holds_array(v)}


def _plain(name: str, value: object, budget: Budget) -> npt.NDArray[Any]:
    if isinstance(value, NumericArray):
        dtype = value.natural_dtype()
        budget.take(name, value.size, dtype.itemsize)
        return value.parse(dtype, name).reshape(value.shape)
    a = _json_read.narrowed(_numbers(name, value))
    budget.take(name, a.size, a.itemsize)
    return a


def _numbers(name: str, value: object) -> npt.NDArray[Any]:
    if not isinstance(value, (list, int, float)) or isinstance(value, bool):
        _refuse(f"tensor {name!r} must be a (nested) list of numbers or a typed object")
    try:
        a = np.asarray(value)
    except (ValueError, TypeError, RecursionError) as exc:  # ragged, or nested too deep
        _refuse(f"tensor {name!r} is not a rectangular array: {_short(exc)}")
    if a.dtype.kind not in "biuf":
        _refuse(f"tensor {name!r} must hold numbers only")
    return a


def _typed_json(
    name: str, value: dict[str, Any], limits: CodecLimits, budget: Budget
) -> npt.NDArray[Any]:
    unknown = set(value) - {"dtype", "shape", "data"}
    if unknown:
        _refuse(f"tensor {name!r} has unknown field(s) {sorted(unknown)}; use dtype, shape, data")
    dtype = _dtype(name, value.get("dtype"))
    shape = _shape(name, value.get("shape"), limits)
    count = math.prod(shape)
    if count > limits.max_elements:
        _refuse(f"tensor {name!r} has {count} elements; at most {limits.max_elements}")
    data = value.get("data")
    if isinstance(data, NumericArray):
        if data.size != count:
            _refuse(
                f"tensor {name!r} has {data.size} values; its shape {list(shape)} needs {count}"
            )
        if dtype.kind == "b":
            _refuse(f"tensor {name!r} is declared bool but its data are not bool")
        budget.take(name, count, dtype.itemsize)
        return data.parse(dtype, name).reshape(shape)
    a = _numbers(name, data)
    if a.size != count:
        _refuse(f"tensor {name!r} has {a.size} values; its shape {list(shape)} needs {count}")
    budget.take(name, count, dtype.itemsize)
    if count == 0:  # `[]` parses as float64 whatever the declared dtype
        return np.empty(shape, dtype)
    src, dst = a.dtype.kind, dtype.kind
    # JSON numbers arrive as int64/float64/bool; convert only where no value can change.
    if dst == "f" and src in "iuf":
        with np.errstate(over="ignore"):  # overflow to inf is the validator's NaN/inf rule
            return a.astype(dtype).reshape(shape)
    if dst in "iu" and src in "iu":
        info = np.iinfo(dtype)
        if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
            _refuse(f"tensor {name!r} has values outside the {dtype.name} range")
        return a.astype(dtype).reshape(shape)
    if dst == src == "b":
        return a.reshape(shape)
    return _refuse(f"tensor {name!r} is declared {dtype.name} but its data are not {dtype.name}")


def encode_json(
    tensors: Mapping[str, npt.NDArray[Any]],
    key: str = "outputs",
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode typed tensors (flat data) under ``key``, with ``meta`` as top-level fields.

    Raises:
        ValueError: a tensor's dtype has no wire name, or ``meta`` uses a reserved key.
    """
    return b"".join(encode_json_parts(tensors, key, meta))


def encode_json_parts(
    tensors: Mapping[str, npt.NDArray[Any]],
    key: str = "outputs",
    meta: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """:func:`encode_json`'s bytes in pieces, to be written one after the other: a large
    answer is never held twice, and never as one Python number per value.

    Raises:
        ValueError: a tensor's dtype has no wire name, or ``meta`` uses a reserved key.
    """
    head: dict[str, Any] = dict(meta or {})
    if key in head:
        raise ValueError(f"meta must not contain {key!r}")
    if sum(a.size for a in tensors.values()) <= _ENCODE_CHUNK:  # small: one json.dumps
        head[key] = {
            name: {"dtype": _wire_name(a), "shape": list(a.shape), "data": a.ravel().tolist()}
            for name, a in tensors.items()
        }
        return [_compact(head).encode()]
    opening = _compact(head)[:-1]  # the same bytes json.dumps gives with `key` added last
    parts = [f"{opening}{',' if head else ''}{_compact(key)}:{{".encode()]
    for i, (name, a) in enumerate(tensors.items()):
        fields = _compact({"dtype": _wire_name(a), "shape": list(a.shape)})[:-1]
        parts.append(f'{"," if i else ""}{_compact(name)}:{fields},"data":['.encode())
        flat = a.reshape(-1)
        for start in range(0, flat.size, _ENCODE_CHUNK):
            text = _compact(flat[start : start + _ENCODE_CHUNK].tolist())[1:-1]
            parts.append(f"{',' if start else ''}{text}".encode())
        parts.append(b"]}")
    parts.append(b"}}")
    return parts


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


# --- binary ----------------------------------------------------------------------------


def encode_binary(
    tensors: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any] | None = None
) -> bytes:
    """Encode ``tensors`` (and JSON-serialisable ``meta``) in the binary format.

    Raises:
        ValueError: a tensor's dtype has no wire name, or ``meta`` uses a reserved key.
    """
    header: dict[str, Any] = dict(meta or {})
    if _RESERVED & set(header):
        raise ValueError(f"meta must not contain {sorted(_RESERVED & set(header))}")
    arrays = [(name, np.asarray(a)) for name, a in tensors.items()]
    header["tensors"] = [
        {"name": name, "dtype": _wire_name(a), "shape": list(a.shape)} for name, a in arrays
    ]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(_PREFIX.size + len(raw)) % _ALIGN)  # JSON ignores trailing blanks
    parts: list[bytes | memoryview] = [_PREFIX.pack(BINARY_MAGIC, len(raw)), raw]
    offset = _PREFIX.size + len(raw)
    for _, a in arrays:
        # reshape(-1): a memoryview of a 0-d or empty multi-dimensional array cannot be cast.
        data = np.ascontiguousarray(a, dtype=_LE[a.dtype.name]).reshape(-1).view(np.uint8).data
        pad = -offset % _ALIGN
        if pad:
            parts.append(b"\0" * pad)
        parts.append(data)
        offset += pad + data.nbytes
    return b"".join(parts)


def decode_binary(body: bytes | memoryview, limits: CodecLimits | None = None) -> TensorMessage:
    """Decode a binary message; the arrays are read-only views of ``body``.

    Raises:
        InputValidationError: bad magic, a lying or oversized header, a bad tensor entry,
            ``limits`` exceeded, or data that do not fill the message exactly.
    """
    limits = limits or CodecLimits()
    view = memoryview(body).cast("B")
    header, end = _read_header(view, limits)
    entries: list[Any] = header["tensors"]
    if not entries:
        _refuse("the binary message carries no tensors")
    if len(entries) > limits.max_tensors:
        _refuse(f"the message carries {len(entries)} tensors; at most {limits.max_tensors}")
    # First pass: every entry is well-formed and the layout fits, before any array exists.
    layout: list[tuple[str, np.dtype[Any], tuple[int, ...], int]] = []
    total = 0
    offset = end
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            _refuse('each tensor entry must be {"name": ..., "dtype": ..., "shape": [...]}')
        name = entry["name"]
        _check_name(name, limits)
        if any(name == seen for seen, *_ in layout):
            _refuse(f"tensor {name!r} appears twice")
        dtype = _dtype(name, entry["dtype"])
        shape = _shape(name, entry["shape"], limits)
        count = math.prod(shape)
        total += count
        if total > limits.max_elements:
            _refuse(f"the message carries more than {limits.max_elements} elements (the limit)")
        offset += -offset % _ALIGN
        layout.append((name, dtype, shape, offset))
        offset += count * dtype.itemsize
        if offset > len(view):
            _refuse(
                f"the binary message is truncated: tensor {name!r} needs bytes up to {offset},"
                f" the message has {len(view)}"
            )
    if offset != len(view):
        _refuse(f"the binary message has {len(view) - offset} bytes after its last tensor")
    out: Arrays = {}
    for name, dtype, shape, start in layout:
        a = np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
        if dtype.kind == "b" and a.size and a.view(np.uint8).max() > 1:
            _refuse(f"tensor {name!r} is bool but holds bytes other than 0 and 1")
        out[name] = a
    return TensorMessage(out, {k: v for k, v in header.items() if k != "tensors"})


def binary_header(body: bytes | memoryview, limits: CodecLimits | None = None) -> dict[str, Any]:
    """The header of a binary message, without looking at its tensors.

    Raises:
        InputValidationError: bad magic, a truncated or oversized header, or a header that
            is not a JSON object with a ``tensors`` list.
    """
    return _read_header(memoryview(body).cast("B"), limits or CodecLimits())[0]


def _read_header(view: memoryview, limits: CodecLimits) -> tuple[dict[str, Any], int]:
    if len(view) < _PREFIX.size:
        _refuse(f"the binary message is truncated: {len(view)} bytes, no room for its prefix")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != BINARY_MAGIC:
        _refuse(f"the binary message must start with {BINARY_MAGIC!r}")
    if header_len > limits.max_header_bytes:
        _refuse(f"the binary header is {header_len} bytes; at most {limits.max_header_bytes}")
    end = _PREFIX.size + header_len
    if end > len(view):
        _refuse(f"the binary message is truncated: its header needs {end} bytes, got {len(view)}")
    try:
        header = json.loads(bytes(view[_PREFIX.size : end]), parse_int=json_int)
    except (ValueError, RecursionError) as exc:
        _refuse(f"the binary header is not valid UTF-8 JSON: {_short(exc)}")
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        _refuse('the binary header must be a JSON object with a "tensors" list')
    return header, end


# --- shared checks -----------------------------------------------------------------------


def _refuse(message: str) -> NoReturn:
    raise InputValidationError(message)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _check_name(name: object, limits: CodecLimits) -> None:
    if not isinstance(name, str) or not name or len(name) > limits.max_name_chars:
        _refuse(f"tensor names must be strings of 1 to {limits.max_name_chars} characters")


def _dtype(name: str, value: object) -> np.dtype[Any]:
    if not isinstance(value, str) or value not in _LE:
        _refuse(f"tensor {name!r} has dtype {value!r}; use one of {', '.join(sorted(_LE))}")
    return _LE[value]


def _shape(name: str, value: object, limits: CodecLimits) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limits.max_rank:
        _refuse(f"tensor {name!r} needs a shape: a list of at most {limits.max_rank} sizes")
    for d in value:
        # bool is an int in Python, and a shape of [true] is a mistake, not a size.
        if type(d) is not int or d < 0:
            _refuse(f"tensor {name!r} has shape {value!r}; sizes must be integers >= 0")
        if d > limits.max_elements:
            _refuse(f"tensor {name!r} has shape {value!r}; too large for the element limit")
    # numpy refuses to create an array whose sizes other than 0 multiply beyond its index
    # range, even an empty one: they must fit the element limit too.
    if math.prod(d for d in value if d) > limits.max_elements:
        _refuse(
            f"tensor {name!r} has shape {value!r}; too large for the element limit"
            f" ({limits.max_elements}), counting every size but 0"
        )
    return tuple(value)


def _wire_name(a: npt.NDArray[Any]) -> str:
    name = a.dtype.name
    if name not in _LE:
        raise ValueError(f"dtype {a.dtype} cannot be sent; use one of {', '.join(sorted(_LE))}")
    return name
