"""The agent's replacements for what Python 3.9 and 3.10 lack behave as the originals."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.plumbing import compat
from agent.serve import _json_read

Zip = Callable[[Iterable[Any], Iterable[Any]], Iterator[tuple[Any, Any]]]
Compile = Callable[[bytes], "re.Pattern[bytes]"]
ZIPS: list[Zip] = [compat.zip_strict, compat._zip_strict]
COMPILES: list[Compile] = [compat.compile_possessive, compat._compile_atomic]
# Text made of the characters the JSON reader's patterns are about.
JSONISH = st.binary(max_size=60).map(lambda b: bytes(b'[]", 0129.eE+-\\\n'[c % 16] for c in b))


@pytest.mark.parametrize("zip_strict", ZIPS)
def test_zip_strict_pairs_iterables_of_equal_length(zip_strict: Zip) -> None:
    assert list(zip_strict([1, 2], iter("ab"))) == [(1, "a"), (2, "b")]
    assert list(zip_strict([], [])) == []


@pytest.mark.parametrize("zip_strict", ZIPS)
@pytest.mark.parametrize(("a", "b"), [([1, 2], [1]), ([1], [1, 2]), ([], [1]), ([1], [])])
def test_zip_strict_refuses_iterables_of_different_lengths(
    zip_strict: Zip, a: list[int], b: list[int]
) -> None:
    with pytest.raises(ValueError, match="argument 2 is"):
        list(zip_strict(a, b))


def test_bounded_int_parses_up_to_pythons_digit_bound_and_refuses_beyond() -> None:
    assert compat._bounded_int("-" + "7" * 4300) == -int("7" * 4300)
    with pytest.raises(ValueError, match="value has 4301 digits"):
        compat._bounded_int("7" * 4301)


def test_json_refuses_an_integer_over_the_digit_bound_on_every_python() -> None:
    assert json.loads("[-12, 0]", parse_int=compat.json_int) == [-12, 0]
    with pytest.raises(ValueError, match="4301 digits"):
        json.loads("7" * 4301, parse_int=compat.json_int)


# (pattern, text, the span of the match at 0): what possessive quantifiers mean.
POSSESSIVE: list[tuple[bytes, bytes, tuple[int, int] | None]] = [
    (rb"a*+a", b"aaa", None),  # takes every "a" and gives none back
    (rb"a*+b", b"aab", (0, 3)),
    (rb"x?+x", b"x", None),
    (rb"x?+y", b"y", (0, 1)),
    (rb"(?:ab)++c", b"ababc", (0, 5)),
    (rb"(?:ab)++b", b"abab", None),
    (rb"a{2}+a", b"aaa", (0, 3)),  # exactly two, then one more
    (rb"(?:a|ab)*+c", b"abc", None),  # "a" taken, "b" left: no retry with "ab"
    (rb"[^\]x]*+\]", b"ab]", (0, 3)),
    (rb'"(?:[^"\\]++|\\.)*+"?', b'"a\\"b"c', (0, 6)),
    (rb"(?=(a))a*+\1", b"aa", None),  # a plain group keeps its number
]


@pytest.mark.parametrize("compile_", COMPILES)
@pytest.mark.parametrize(("pattern", "text", "span"), POSSESSIVE)
def test_possessive_quantifiers_never_give_back(
    compile_: Compile, pattern: bytes, text: bytes, span: tuple[int, int] | None
) -> None:
    m = compile_(pattern).match(text)
    assert (m.span() if m else None) == span


if sys.version_info >= (3, 11):
    # Where the engine has possessive quantifiers, the rewrite must match as it does, on
    # the patterns the JSON request reader uses and on text made of their characters.
    JSON_PATTERNS = [
        _json_read._TOKEN.pattern,
        _json_read._LEAD.pattern,
        _json_read._LONG_INTEGER.pattern,
        _json_read._closing(3).pattern,
        _json_read._rectangular((2, 3)).pattern,
    ]

    @pytest.mark.parametrize("pattern", JSON_PATTERNS)
    @settings(max_examples=300, deadline=None)
    @given(text=JSONISH)
    def test_the_rewrite_matches_as_the_engine_on_the_json_reader_patterns(
        pattern: bytes, text: bytes
    ) -> None:
        native, rewritten = re.compile(pattern), compat._compile_atomic(pattern)
        for start in range(len(text) + 1):
            a, b = native.match(text, start), rewritten.match(text, start)
            assert (a.span() if a else None) == (b.span() if b else None)
