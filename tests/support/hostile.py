"""Invariants shared by the fuzz targets and property tests of untrusted documents."""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["assert_printable"]

# Bidirectional embeddings, overrides and isolates: they reorder what a terminal shows.
_BIDI_CONTROLS = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def _unprintable(char: str) -> bool:
    category = unicodedata.category(char)
    return (category == "Cc" and char not in "\t\n") or category == "Cs" or char in _BIDI_CONTROLS


def assert_printable(value: Any, where: str = "$") -> None:
    """Every string in a JSON-like value is text a terminal shows as it reads: what an
    accepted document hands to ``inspect``, ``status`` or a log line holds no control
    character but tab and newline, no lone surrogate and no bidirectional override."""
    if isinstance(value, str):
        bad = [c for c in value if _unprintable(c)]
        assert not bad, f"{where}: {value!r}"
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_printable(key, where)
            assert_printable(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_printable(item, f"{where}[{i}]")
