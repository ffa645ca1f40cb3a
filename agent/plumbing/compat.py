"""What the oldest Pythons the agent runs on (3.9, 3.10) lack, in one place.

Devices keep the Python their OS ships: Debian 11 and Raspberry Pi OS have 3.9, Ubuntu
22.04 and JetPack 6 have 3.10. On 3.11 and later each public name here is the standard
library's own, so the agent behaves there exactly as it did before it ran on older
Pythons. The replacements are defined on every Python, so that they are type-checked and
tested against the originals where both exist.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["compile_possessive", "json_int", "zip_strict"]

_A = TypeVar("_A")
_B = TypeVar("_B")

# Python's own bound on the digits of an int parsed from text (CVE-2020-10735: the parse
# is quadratic). Interpreters from before it (Debian 11's 3.9.2, 3.10.0-3.10.6) get it here.
MAX_INT_DIGITS = 4300


def _zip_strict(a: Iterable[_A], b: Iterable[_B]) -> Iterator[tuple[_A, _B]]:
    rest = iter(b)
    for x in a:
        try:
            y = next(rest)
        except StopIteration:
            raise ValueError("zip() argument 2 is shorter than argument 1") from None
        yield x, y
    for _ in rest:
        raise ValueError("zip() argument 2 is longer than argument 1")


def _bounded_int(literal: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(
            f"Exceeds the limit ({MAX_INT_DIGITS} digits) for integer string conversion: "
            f"value has {digits} digits"
        )
    return int(literal)


def _compile_atomic(pattern: bytes, flags: int = 0) -> re.Pattern[bytes]:
    """``re.compile`` of a pattern with possessive quantifiers, without engine support.

    Each ``A*+``, ``A++``, ``A?+`` or ``A{m,n}+`` becomes ``(?=(?P<_pN>A*))(?P=_pN)``: a
    lookahead never backtracks in Python's engine, so the backreference takes exactly
    what the greedy match took, as an atomic group would; matches stay linear on hostile
    input.
    """
    out = bytearray()
    groups: list[int] = []  # where each open group starts in out
    atom = 0  # where the last atom starts in out
    names = 0
    i = 0
    while i < len(pattern):
        c = pattern[i : i + 1]
        if c in b"*+?{" and i > 0:
            end = pattern.index(b"}", i) + 1 if c == b"{" else i + 1
            out += pattern[i:end]
            i = end
            if pattern[i : i + 1] == b"+":
                name = b"_p%d" % names
                names += 1
                out[atom:] = b"(?=(?P<" + name + b">" + out[atom:] + b"))(?P=" + name + b")"
                i += 1
            continue
        atom = len(out)
        if c == b"\\":
            end = i + 2
        elif c == b"[":
            end = _class_end(pattern, i)
        elif c == b"(":
            groups.append(len(out))
            end = i + 1
            if pattern[end : end + 1] == b"?":
                end = _group_prefix_end(pattern, end)
        elif c == b")":
            atom = groups.pop()
            end = i + 1
        else:
            end = i + 1
        out += pattern[i:end]
        i = end
    return re.compile(bytes(out), flags)


def _class_end(pattern: bytes, start: int) -> int:
    """The end of the character class opening at ``start``."""
    i = start + 1
    if pattern[i : i + 1] == b"^":
        i += 1
    if pattern[i : i + 1] == b"]":
        i += 1  # a "]" first is a literal
    while pattern[i : i + 1] != b"]":
        i += 2 if pattern[i : i + 1] == b"\\" else 1
    return i + 1


def _group_prefix_end(pattern: bytes, question: int) -> int:
    """The end of ``?:``, ``?=``, ``?!``, ``?<=``, ``?<!`` or ``?P<name>`` at ``question``."""
    kind = pattern[question + 1 : question + 2]
    if kind == b"P" and pattern[question + 2 : question + 3] == b"<":
        return pattern.index(b">", question) + 1
    if kind == b"<":
        return question + 3
    return question + 2


if sys.version_info >= (3, 10):

    def zip_strict(a: Iterable[_A], b: Iterable[_B]) -> Iterator[tuple[_A, _B]]:
        """``zip(a, b, strict=True)``.

        Raises:
            ValueError: the two differ in length.
        """
        return zip(a, b, strict=True)

else:
    zip_strict = _zip_strict

# ``int``, or on an interpreter without Python's digit bound an ``int`` that has it; for
# ``json.loads(parse_int=...)`` (``int`` itself keeps json's fast path). Raises ValueError.
json_int: Callable[[str], int] = int if hasattr(sys, "get_int_max_str_digits") else _bounded_int

if sys.version_info >= (3, 11):

    def compile_possessive(pattern: bytes, flags: int = 0) -> re.Pattern[bytes]:
        """``re.compile``: possessive quantifiers are the engine's own since 3.11."""
        return re.compile(pattern, flags)

else:
    compile_possessive = _compile_atomic
