"""Large arrays of numbers in a JSON message, read straight into numpy.

Python's :mod:`json` makes an object of every number (24-32 bytes, plus a list slot, for
the two bytes of ``0,``), so an 8 MiB request of numbers used to cost ~150 MiB before
numpy saw it. Here the arrays of numbers are found first, outside strings, each checked
against the JSON number grammar and a rectangular shape by one regular expression, and
replaced by a placeholder; :func:`json.loads` then reads only what is left, the
*structure* (names, dtypes, shapes, metadata, small arrays), which is capped like a binary
header. The numbers are parsed later, in chunks, straight into the dtype they end up in.

Only arrays that are plain numbers at every level are lifted (no ``NaN``, ``true``, nested
empty arrays or integers of 19 digits or more, which only Python's ints hold); anything
else stays in the structure and counts against its cap, so no input avoids both bounds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from agent.errors import InputValidationError
from agent.plumbing.compat import compile_possessive, json_int, zip_strict

__all__ = ["Budget", "NumericArray", "holds_array", "load", "narrowed", "utf8"]

# Arrays shorter than this stay in the structure: shapes, and small tensors parse faster
# through json.
LIFT_MIN_BYTES = 128
# Numbers parsed per step: the text of one chunk and its float64 values stay small.
_CHUNK_BYTES = 1 << 18

_WS = rb"[ \t\n\r]*+"
_NUM = rb"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"
# One token at a time: a whole string (so brackets inside strings are never taken for
# arrays), or a run of the characters an array of numbers is made of. Possessive
# quantifiers keep every match linear, also on hostile input.
_TOKEN = compile_possessive(rb'"(?:[^"\\]++|\\.)*+"?|\[[-+.0-9eE,\[\] \t\n\r]*+', re.DOTALL)
_LEAD = compile_possessive(rb"(?:\[" + _WS + rb")++")
_NO_BRACKETS = bytes.maketrans(b"[]", b"  ")
# An integer literal of 19 digits or more: from a separator to a separator, so that the
# digits of a fraction or an exponent never count.
_LONG_INTEGER = compile_possessive(rb"[\[, \t\n\r]-?[0-9]{19}[0-9]*+(?=[\], \t\n\r])")
_MAX_REPEAT = 1 << 31  # below the regular-expression engine's own repeat limit
# Plain integers decode to the first type whose digits hold them all.
_NARROW = ((2, np.dtype(np.int8)), (4, np.dtype(np.int16)), (9, np.dtype(np.int32)))


@functools.cache
def _closing(depth: int) -> re.Pattern[bytes]:
    """``depth`` closing brackets in a row: the end of the first array at that depth."""
    return compile_possessive(rb"\](?:" + _WS + rb"\]){" + str(depth - 1).encode() + rb"}")


@functools.lru_cache(maxsize=64)
def _rectangular(shape: tuple[int, ...]) -> re.Pattern[bytes]:
    """Exactly a JSON array of numbers of ``shape``, and nothing else.

    Each level is written once: ``d`` repetitions of an element followed by a comma or by
    the closing bracket (looked at, not taken), so an early ``]`` or a late ``,`` fails.
    """
    inner = _NUM
    for d in reversed(shape):
        inner = rb"\[(?:" + _WS + inner + _WS + rb"(?:,|(?=\]))){" + str(d).encode() + rb"}+\]"
    return compile_possessive(inner)


@dataclass(frozen=True, eq=False)
class NumericArray:
    """A rectangular array of JSON numbers at ``body[start:end]``, not yet parsed.

    Attributes:
        shape: its shape (every size at least 1).
        floats: some number has a fraction or an exponent. Integers have at most 18
            digits, in any case.
    """

    body: bytes
    start: int
    end: int
    shape: tuple[int, ...]
    floats: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def natural_dtype(self) -> np.dtype[Any]:
        """float64 for floats; for integers the narrowest of int8/16/32/64 their digits fit."""
        if self.floats:
            return np.dtype(np.float64)
        for digits, dtype in _NARROW:
            # No literal has more digits: |value| < 10**digits, which dtype holds.
            if _digits(digits + 1).search(self.body, self.start, self.end) is None:
                return dtype
        return np.dtype(np.int64)

    def parse(self, dtype: np.dtype[Any], name: str) -> npt.NDArray[Any]:
        """The values of tensor ``name``, flat, in ``dtype`` (a float or integer type).

        Raises:
            InputValidationError: floats for an integer ``dtype``, or a value out of its range.
        """
        if dtype.kind in "iu" and self.floats:
            _refuse(f"tensor {name!r} is declared {dtype.name} but its data are not {dtype.name}")
        # Integers parse as int64 (exact, and five times faster than as floats) even for a
        # float dtype; the cast then rounds as numpy's int-to-float cast does.
        wide = np.dtype(np.float64 if self.floats else np.int64)
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        out = np.empty(self.size, dtype)
        done, pos = 0, self.start
        while pos < self.end:
            stop = self._chunk_end(pos)
            # The text was checked: every token is a JSON number, one more than the commas.
            count = self.body.count(b",", pos, stop) + 1
            if done + count > out.size:
                self._miscounted(name)
            text = self.body[pos:stop].translate(_NO_BRACKETS)
            try:
                values = np.fromstring(text, wide, count=count, sep=",")
            except ValueError:  # the grammar check rules it out; never pass it on
                self._miscounted(name)
            if info is not None and (int(values.min()) < info.min or int(values.max()) > info.max):
                _refuse(f"tensor {name!r} has values outside the {dtype.name} range")
            with np.errstate(over="ignore"):  # to inf, as the validator's NaN/inf rule expects
                out[done : done + count] = values
            done += count
            pos = stop + 1
        if done != out.size:
            self._miscounted(name)
        return out

    def _miscounted(self, name: str) -> NoReturn:
        _refuse(f"tensor {name!r} does not hold the {self.size} numbers its shape needs")

    def _chunk_end(self, pos: int) -> int:
        if self.end - pos <= _CHUNK_BYTES:
            return self.end
        comma = self.body.rfind(b",", pos, pos + _CHUNK_BYTES)
        if comma < 0:  # one number longer than a chunk: take it whole
            comma = self.body.find(b",", pos + _CHUNK_BYTES, self.end)
        return self.end if comma < 0 else comma


@functools.cache
def _digits(n: int) -> re.Pattern[bytes]:
    return re.compile(b"[0-9]{%d}" % n)


def load(body: bytes, max_structure_bytes: int, max_rank: int) -> Any:
    """The JSON document in ``body``, with large arrays of numbers as :class:`NumericArray`.

    Arrays deeper than ``max_rank`` are never lifted.

    Raises:
        InputValidationError: not UTF-8 JSON, or more than ``max_structure_bytes`` outside
            the arrays of numbers.
    """
    if len(body) <= max_structure_bytes:
        return _loads(body, {})
    nonce = _nonce(body)
    arrays: dict[str, NumericArray] = {}
    parts: list[bytes] = []
    lifted = pos = scan = 0  # lifted: bytes taken out; pos: where the text was last cut
    while (token := _TOKEN.search(body, scan)) is not None:
        run_start, scan = token.span()
        # In a run of array characters, lift arrays one after the other ("[...], [...]"),
        # each looked for only within the run: the text is read a bounded number of times.
        candidate = run_start if body[run_start] == 0x5B else -1  # "["
        while candidate >= 0 and scan - candidate >= LIFT_MIN_BYTES:
            array = _measure(body, candidate, scan, max_rank)
            if array is None:
                break
            literal = nonce + str(len(arrays)).encode()
            arrays[literal.decode()] = array
            # Blanks around the literal: "1e[...]" or "[...]5" must stay invalid JSON.
            parts += (body[pos:candidate], b" " + literal + b" ")
            lifted += array.end - candidate - len(literal) - 2
            pos = array.end
            if pos - lifted > max_structure_bytes:  # placeholders count: ~25 bytes each
                _too_much_structure(max_structure_bytes)
            candidate = body.find(b"[", pos, scan)
        if scan - lifted > max_structure_bytes:
            _too_much_structure(max_structure_bytes)
    if len(body) - lifted > max_structure_bytes:
        _too_much_structure(max_structure_bytes)
    parts.append(body[pos:])
    return _loads(b"".join(parts), arrays)


def _loads(text: bytes, arrays: dict[str, NumericArray]) -> Any:
    def parse_int(literal: str) -> Any:
        lifted = arrays.get(literal)
        return json_int(literal) if lifted is None else lifted

    try:
        return json.loads(text, parse_int=parse_int if arrays else json_int)
    except json.JSONDecodeError as exc:
        # Positions in the text without its arrays would mislead: name them only in full.
        where = f" ({exc.msg}, outside its arrays of numbers)" if arrays else f": {exc}"
        _refuse(f"the request is not valid UTF-8 JSON{where[:200]}")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = str(exc) or type(exc).__name__
        _refuse(f"the request is not valid UTF-8 JSON: {reason[:200]}")


def _nonce(body: bytes) -> bytes:
    """A negative integer literal that occurs nowhere in ``body``: placeholders start with it.

    As a JSON number it stands where an array stood, and only where a value may stand.
    """
    while True:
        nonce = b"-%d" % (int.from_bytes(os.urandom(8), "big") | 1 << 64)
        if body.find(nonce) < 0:
            return nonce


def _measure(body: bytes, start: int, run_end: int, max_rank: int) -> NumericArray | None:
    """The array of numbers starting at ``body[start]`` if it is rectangular, else None.

    ``run_end`` ends the run of array characters it lies in. The shape is read from the
    first array at each depth; the regular expression of that shape then checks all.
    """
    lead = _LEAD.match(body, start, run_end)
    if lead is None:
        return None
    depth = body.count(b"[", start, lead.end())
    if depth > max_rank:
        return None
    opens = [start]
    for _ in range(depth - 1):
        opens.append(body.index(b"[", opens[-1] + 1))
    ends = []
    for level, first in enumerate(opens):
        close = _closing(depth - level).search(body, first, run_end)
        if close is None:
            return None
        ends.append(close.end())
    shape = [body.count(b",", opens[-1], ends[-1]) + 1]
    closes_below = 1  # closing brackets in one array of the level below
    for first, end in zip_strict(reversed(opens[:-1]), reversed(ends[:-1])):
        inner, rest = divmod(body.count(b"]", first, end) - 1, closes_below)
        if rest or inner < 1:
            return None
        shape.insert(0, inner)
        closes_below = 1 + inner * closes_below
    if (
        max(shape) >= _MAX_REPEAT
        or _rectangular(tuple(shape)).fullmatch(body, start, ends[0]) is None
    ):
        return None
    if _LONG_INTEGER.search(body, start, ends[0]) is not None:
        return None  # may be beyond int64, which only json reads (as Python ints)
    floats = any(body.find(c, start, ends[0]) >= 0 for c in (b".", b"e", b"E"))
    return NumericArray(body, start, ends[0], tuple(shape), floats)


class Budget:
    """What the tensors of one JSON message may still take: elements, and bytes.

    An element counts at least 4 bytes, whatever it decodes to: the input validator widens
    narrower values to the model's dtype, most often float32, and the model's own memory
    grows with its input. So a JSON message of ``0,0,...`` cannot hand the model more than
    a binary one of the same size could.
    """

    MIN_ITEM_BYTES = 4

    def __init__(self, max_elements: int, max_bytes: int) -> None:
        self.max_elements, self.max_bytes = max_elements, max_bytes
        self.elements = self.bytes = 0

    def take(self, name: str, count: int, itemsize: int) -> None:
        """Raises: InputValidationError when ``count`` items more exceed the budget."""
        self.elements += count
        self.bytes += count * max(itemsize, self.MIN_ITEM_BYTES)
        if self.elements > self.max_elements:
            _refuse(f"the request carries more than {self.max_elements} elements (the limit)")
        if self.bytes > self.max_bytes:
            _refuse(
                f"tensor {name!r} would take the decoded tensors past {self.max_bytes} bytes"
                f" (each value counts at least {self.MIN_ITEM_BYTES}, plain floats 8) for this"
                " message; send typed float32 data, fewer values, or the binary encoding"
            )


def narrowed(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """An int64 array of plain integers in the type a lifted array of them would get."""
    if a.dtype != np.int64 or not a.size:
        return a
    top = max(-int(a.min()), int(a.max()))
    for digits, dtype in _NARROW:
        if top < 10**digits:
            return a.astype(dtype)
    return a


def utf8(body: bytes | str) -> bytes:
    if isinstance(body, str):
        try:
            return body.encode()
        except UnicodeEncodeError:
            _refuse("the request is not valid UTF-8 JSON: it holds unpaired surrogates")
    return bytes(body)


def holds_array(value: object) -> bool:
    """True if a lifted array of numbers sits anywhere in ``value`` (walked without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, NumericArray):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _too_much_structure(limit: int) -> NoReturn:
    _refuse(
        f"the request has more than {limit} bytes outside arrays of numbers (names, shapes,"
        " metadata, and arrays holding anything but plain numbers); send large tensors as"
        " arrays of plain numbers, or use the binary encoding"
    )


def _refuse(message: str) -> NoReturn:
    raise InputValidationError(message)
