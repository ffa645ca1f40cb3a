"""The one strict reader for documents edgeship did not write itself.

Manifests, envelopes and trust policies, agent.toml, desired-state and telemetry messages
all arrive from outside. Each is read through :class:`Doc`: typed getters that name the
key path of anything wrong (``manifest.model.inputs[0].dtype must be ...``), bounds on
every string and list, finite numbers only, and :meth:`Doc.done` refusing keys nobody
read, so a typo or an injected field is never silently ignored. JSON is parsed by
:func:`load_json`, which refuses duplicate keys and the non-standard NaN/Infinity
literals, and turns every parser failure (deep nesting, huge integers) into the
document's own error type.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from agent.plumbing.compat import json_int

__all__ = ["MISSING", "Doc", "check_printable", "load_json"]

T = TypeVar("T")
ErrorType = Callable[[str], Exception]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # "no default": the key is required


# What no document's text may hold: C0 and C1 control characters other than tab and
# newline, lone surrogates (valid JSON escapes that no terminal, log or UTF-8 encoder can
# take: printing one raised in `inspect`, `verify` and `status`), and the bidirectional
# embedding, override and isolate controls, which make a terminal show text in another
# order than it is read ("Trojan Source", CVE-2021-42574): a version or name printed by
# `inspect` must read as what was signed. Marks (U+200E, U+200F) stay allowed.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_PRINTABLE_RULE = "no control character, bidirectional override or lone surrogate"
_MAX_DEPTH = 32


def _finite(value: object) -> bool:
    """A JSON number a float holds: not a bool, not NaN or infinite, and not an integer
    too large for a float (``math.isfinite(10**400)`` raises OverflowError)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def check_printable(value: object, where: str, *, error: ErrorType, _depth: int = 0) -> None:
    """Refuse a control character or lone surrogate in any string (or key) of ``value``.

    Raises:
        error: naming where the character is.
    """
    if _depth > _MAX_DEPTH:
        raise error(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if _UNPRINTABLE.search(value):
            raise error(f"{where} must be printable: {_PRINTABLE_RULE}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_printable(key, where, error=error, _depth=_depth + 1)
            check_printable(item, f"{where}.{key}", error=error, _depth=_depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_printable(item, f"{where}[{i}]", error=error, _depth=_depth + 1)


def load_json(data: bytes, *, what: str, error: ErrorType, duplicate_keys: bool = False) -> Any:
    """Parse UTF-8 JSON strictly: no NaN or Infinity literals, and no duplicate keys.

    A duplicate key makes a document mean different things to different parsers, so signed
    and configuration documents refuse it. Checking costs a Python call per object (about
    twice the parse time of a telemetry message), so a reader that keeps the raw bytes and
    needs only a few header fields (the collector) may pass ``duplicate_keys=True``: the
    last value then wins, as in :func:`json.loads`.

    Raises:
        error: not UTF-8, not JSON, a duplicate key, a NaN/Infinity literal, nesting too
            deep or an integer too long to parse (the message names ``what``).
    """

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    hook = None if duplicate_keys else no_duplicates
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=hook,
            parse_constant=reject_constant,
            parse_int=json_int,
        )
    # ValueError covers bad UTF-8, bad JSON and integers over Python's digit limit;
    # RecursionError covers deep nesting. Both are reachable with hostile bytes.
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None


class Doc:
    """Typed, strict access to one object (a JSON object or a TOML table).

    A getter without a default needs the key; with one, an absent (or JSON null) key gives
    the default. :meth:`opt` reads a key that may be absent or null as None.
    """

    def __init__(
        self,
        value: object,
        where: str,
        *,
        error: ErrorType,
        strict: bool = True,
        kind: str = "an object",
    ) -> None:
        """Raises: ``error`` when ``value`` is not an object (``kind``: "a table" for TOML)."""
        if not isinstance(value, dict):
            raise error(f"{where or 'the document'} must be {kind}")
        self.value: dict[str, Any] = value
        self.where = where
        self.error = error
        self.strict = strict
        self.kind = kind
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        """The key's full path, as error messages name it."""
        return f"{self.where}.{key}" if self.where else key

    def bad(self, key: str, what: str) -> Exception:
        """The error saying ``key`` must be ``what``."""
        return self.error(f"{self.path(key)} must be {what}")

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """The value as it is (for a caller's own check)."""
        self.seen.add(key)
        value = self.value.get(key)
        if value is None:
            if default is MISSING:
                raise self.error(f"{self.path(key)} is required")
            return default
        return value

    def opt(self, getter: Callable[..., T], key: str, *args: Any, **kwargs: Any) -> T | None:
        """``getter(key, ...)``, or None when the key is absent or null."""
        self.seen.add(key)
        if self.value.get(key) is None:
            return None
        return getter(key, *args, **kwargs)

    def text(
        self,
        key: str,
        default: str = MISSING,
        *,
        max_len: int = 4096,
        pattern: re.Pattern[str] | None = None,
        what: str = "",
    ) -> str:
        """A string of at most ``max_len`` characters, matching ``pattern`` in full if given."""
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if not isinstance(value, str) or len(value) > max_len:
            raise self.bad(key, f"a string of at most {max_len} characters")
        if _UNPRINTABLE.search(value):
            raise self.bad(key, f"printable: {_PRINTABLE_RULE}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.bad(key, what or f"a string matching {pattern.pattern}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str = MISSING) -> str:
        value = self.text(key, default, max_len=256)
        if value not in choices:
            raise self.bad(key, f"one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, default: bool = MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def integer(
        self,
        key: str,
        default: int = MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, "an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.bad(key, f"{_bounds(minimum, maximum)}, not {value}")
        return value

    def number(
        self,
        key: str,
        default: float = MISSING,
        *,
        minimum: float | None = None,
        positive: bool = False,
    ) -> float:
        """A finite number >= ``minimum`` (> 0 with ``positive``), as a float."""
        value = self.raw(key, default)
        if not _finite(value):
            raise self.bad(key, "a finite number")
        if positive and not value > 0:
            raise self.bad(key, f"positive, not {value}")
        if minimum is not None and value < minimum:
            raise self.bad(key, f"a number >= {minimum}, not {value}")
        return float(value)

    def array(self, key: str, *, max_len: int = 10_000) -> list[Any]:
        value = self.raw(key)
        if not isinstance(value, list) or len(value) > max_len:
            raise self.bad(key, f"a list of at most {max_len} items")
        return value

    def texts(self, key: str, *, max_len: int = 256) -> tuple[str, ...]:
        items = self.array(key, max_len=max_len)
        if not all(isinstance(i, str) and len(i) <= 4096 for i in items):
            raise self.bad(key, "a list of strings")
        check_printable(items, self.path(key), error=self.error)
        return tuple(items)

    def numbers(self, key: str, *, max_len: int = 256) -> tuple[float, ...]:
        items = self.array(key, max_len=max_len)
        if not all(_finite(i) for i in items):
            raise self.bad(key, "a list of finite numbers")
        return tuple(float(i) for i in items)

    def obj(self, key: str) -> Doc:
        """The object at ``key``, read with the same rules."""
        return self._child(self.raw(key), self.path(key))

    def items(self, key: str, *, max_len: int = 10_000) -> list[Doc]:
        """The objects of the list at ``key``."""
        return [
            self._child(item, f"{self.path(key)}[{i}]")
            for i, item in enumerate(self.array(key, max_len=max_len))
        ]

    def _child(self, value: object, where: str) -> Doc:
        return Doc(value, where, error=self.error, strict=self.strict, kind=self.kind)

    def any_obj(self, key: str) -> dict[str, Any]:
        """The object at ``key`` as it is, but for printable text (the rest is the caller's)."""
        value = self.raw(key)
        if not isinstance(value, dict):
            raise self.bad(key, self.kind)
        check_printable(value, self.path(key), error=self.error)
        return value

    def done(self, hint: str = "") -> None:
        """In strict mode, refuse any key not read.

        Raises:
            error: a key nobody read (the message names it and ``hint``).
        """
        extra = sorted(set(self.value) - self.seen)
        if extra and self.strict:
            names = ", ".join(self.path(k) for k in extra)
            raise self.error(f"unknown key(s): {names}" + (f"; {hint}" if hint else ""))


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"
