"""The one strict reader: typed getters that name the key path, nothing unread let through."""

from __future__ import annotations

import re

import pytest

from agent.plumbing.strict import Doc, load_json


class DocError(Exception):
    pass


def _doc(value: object, **kwargs: object) -> Doc:
    return Doc(value, "doc", error=DocError, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not allowed"),
        (b'{"a": Infinity}', "Infinity is not allowed"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_hostile_json_is_refused_with_the_documents_own_error(data: bytes, message: str) -> None:
    with pytest.raises(DocError, match=message):
        load_json(data, what="the message", error=DocError)


def test_a_getter_names_the_full_key_path() -> None:
    doc = _doc({"model": {"inputs": [{"dtype": 7}]}})
    item = doc.obj("model").items("inputs")[0]
    with pytest.raises(DocError, match=re.escape("doc.model.inputs[0].dtype must be a string")):
        item.text("dtype")


def test_a_pattern_must_match_the_whole_string() -> None:
    pattern = re.compile(r"[0-9]+")
    doc = _doc({"a": "12\n", "b": "١٢"})  # a trailing newline; Arabic-Indic digits
    for key in ("a", "b"):
        with pytest.raises(DocError, match=f"doc.{key} must be digits"):
            doc.text(key, pattern=pattern, what="digits")


def test_defaults_apply_to_absent_and_null_keys_only() -> None:
    doc = _doc({"n": None, "m": 3})
    assert doc.integer("n", 5) == 5
    assert doc.integer("absent", 5) == 5
    assert doc.integer("m", 5) == 3
    with pytest.raises(DocError, match=r"doc\.absent is required"):
        doc.integer("absent")
    assert doc.opt(doc.integer, "n") is None


@pytest.mark.parametrize(
    ("value", "call", "message"),
    [
        (True, lambda d: d.integer("k"), "an integer"),
        (2.0, lambda d: d.integer("k"), "an integer"),
        (3, lambda d: d.integer("k", minimum=5), ">= 5, not 3"),
        (9, lambda d: d.integer("k", minimum=1, maximum=8), "between 1 and 8, not 9"),
        (float("nan"), lambda d: d.number("k"), "a finite number"),
        (True, lambda d: d.number("k"), "a finite number"),
        (0, lambda d: d.number("k", positive=True), "positive, not 0"),
        ("x" * 11, lambda d: d.text("k", max_len=10), "a string of at most 10 characters"),
        ("blue", lambda d: d.choice("k", ("red", "green")), "one of red, green"),
        ("yes", lambda d: d.boolean("k"), "true or false"),
        (list(range(5)), lambda d: d.array("k", max_len=4), "a list of at most 4 items"),
        ([1, "2"], lambda d: d.numbers("k"), "a list of finite numbers"),
        ([1], lambda d: d.any_obj("k"), "an object"),
    ],
)
def test_a_wrong_value_is_refused_saying_what_is_expected(
    value: object, call: object, message: str
) -> None:
    doc = _doc({"k": value})
    with pytest.raises(DocError, match=re.escape(f"doc.k must be {message}")):
        call(doc)  # type: ignore[operator]


def test_keys_nobody_read_are_refused_in_strict_mode_only() -> None:
    doc = _doc({"known": 1, "typo": 2})
    doc.integer("known")
    with pytest.raises(DocError, match=r"unknown key\(s\): doc.typo; see the docs"):
        doc.done("see the docs")
    lenient = _doc({"known": 1, "newer": 2}, strict=False)
    lenient.integer("known")
    lenient.done()


def test_a_toml_table_is_called_a_table() -> None:
    with pytest.raises(DocError, match=r"doc\.broker must be a table"):
        _doc({"broker": 3}, kind="a table").obj("broker")


def test_a_reader_that_keeps_the_raw_bytes_may_let_the_last_duplicate_win() -> None:
    assert load_json(b'{"a": 1, "a": 2}', what="x", error=DocError, duplicate_keys=True) == {"a": 2}
    with pytest.raises(DocError, match="NaN"):
        load_json(b'{"a": NaN}', what="x", error=DocError, duplicate_keys=True)
