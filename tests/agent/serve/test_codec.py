"""The wire encodings of tensors: round trips, and hostile messages refused before allocating."""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import InputValidationError
from agent.serve.codec import (
    BINARY_MAGIC,
    WIRE_DTYPES,
    CodecLimits,
    binary_header,
    decode,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json,
    encode_json_parts,
    message_fields,
)


def _binary(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return BINARY_MAGIC + struct.pack("<I", len(raw) if length is None else length) + raw + data


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return (a % 2 == 1) if dtype == "bool" else a.astype(dtype)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", [(), (3,), (2, 5), (0, 4), (1, 2, 3, 1)])
def test_binary_round_trip_keeps_dtype_shape_and_values(dtype: str, shape: tuple[int, ...]) -> None:
    tensors = {"a": _sample(dtype, shape), "b": np.array([1.5, -2.0], np.float32)}
    decoded = decode_binary(encode_binary(tensors, {"correlation_id": "c-1"}))
    assert decoded.meta == {"correlation_id": "c-1"}
    assert list(decoded.tensors) == ["a", "b"]
    for name, original in tensors.items():
        got = decoded.tensors[name]
        assert got.dtype == original.dtype
        assert got.shape == original.shape
        np.testing.assert_array_equal(got, original)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_json_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    tensors = {"x": _sample(dtype, (2, 3)), "s": _sample(dtype, ())}
    decoded = decode_json(encode_json(tensors, "inputs", {"reply_to": "r"}), "inputs")
    assert decoded.meta == {"reply_to": "r"}
    for name, original in tensors.items():
        assert decoded.tensors[name].dtype == original.dtype
        np.testing.assert_array_equal(decoded.tensors[name], original)


def test_big_endian_input_is_encoded_little_endian() -> None:
    a = np.arange(4, dtype=">f4")
    decoded = decode_binary(encode_binary({"x": a})).tensors["x"]
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, a)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int8, np.uint16, np.int64, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_binary_round_trip_is_exact_for_any_array(a: np.ndarray) -> None:
    got = decode_binary(encode_binary({"t": a})).tensors["t"]
    assert got.shape == a.shape
    assert got.tobytes() == np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()


def test_decoded_binary_tensors_are_aligned_read_only_views() -> None:
    body = encode_binary({"a": np.ones(3, np.int8), "b": np.ones((2, 2), np.float64)})
    decoded = decode_binary(body)
    for a in decoded.tensors.values():
        assert a.flags.aligned
        assert not a.flags.writeable
        assert not a.flags.owndata


def test_decode_tells_the_encodings_apart() -> None:
    tensors = {"x": np.ones((1, 2), np.float32)}
    assert decode(encode_binary(tensors)).tensors["x"].dtype == np.float32
    assert decode(encode_json(tensors, "inputs")).tensors["x"].dtype == np.float32


def test_plain_nested_lists_decode_to_numeric_arrays() -> None:
    decoded = decode_json(b'{"inputs": {"x": [[1, 2], [3, 4.5]], "n": 7}}')
    np.testing.assert_array_equal(decoded.tensors["x"], [[1, 2], [3, 4.5]])
    assert decoded.tensors["n"].shape == ()


def test_typed_json_accepts_nested_data_matching_the_shape() -> None:
    decoded = decode_json(
        b'{"inputs": {"x": {"dtype": "int16", "shape": [2, 2], "data": [[1, 2], [3, 4]]}}}'
    )
    assert decoded.tensors["x"].dtype == np.int16
    np.testing.assert_array_equal(decoded.tensors["x"], [[1, 2], [3, 4]])


def test_binary_header_reads_meta_without_the_tensors() -> None:
    body = encode_binary({"x": np.ones(2, np.float32)}, {"reply_to": "a/b"})
    assert binary_header(body[:-4])["reply_to"] == "a/b"  # tensor data truncated: header still ok


def test_encoders_refuse_unsendable_dtypes_and_reserved_meta() -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        encode_binary({"c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="meta"):
        encode_binary({"x": np.ones(2)}, {"tensors": 1})
    with pytest.raises(ValueError, match="meta"):
        encode_json({"x": np.ones(2)}, "outputs", {"outputs": 1})


def _typed(dtype: object = "float32", shape: object = (2,), data: object = (1.0, 2.0)) -> bytes:
    shape = list(shape) if isinstance(shape, tuple) else shape
    data = list(data) if isinstance(data, tuple) else data
    return json.dumps({"inputs": {"x": {"dtype": dtype, "shape": shape, "data": data}}}).encode()


HOSTILE_JSON: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "not valid UTF-8 JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', "not valid UTF-8 JSON"),
    ("deep nesting", b"[" * 30_000 + b"]" * 30_000, "not valid UTF-8 JSON"),
    ("deep nesting, large", b"[" * 100_000 + b"]" * 100_000, "bytes outside arrays of numbers"),
    ("top-level list", b"[1, 2]", "must be a JSON object"),
    ("no inputs", b'{"x": [1]}', 'non-empty object "inputs"'),
    ("empty inputs", b'{"inputs": {}}', 'non-empty object "inputs"'),
    ("string value", b'{"inputs": {"x": "12"}}', "list of numbers"),
    ("strings in list", b'{"inputs": {"x": ["a", "b"]}}', "numbers only"),
    ("ragged list", b'{"inputs": {"x": [[1, 2], [3]]}}', "not a rectangular array"),
    ("bool scalar", b'{"inputs": {"x": true}}', "list of numbers"),
    ("unknown dtype", _typed(dtype="complex64"), "dtype 'complex64'"),
    ("object dtype", _typed(dtype="object"), "dtype 'object'"),
    ("negative dim", _typed(shape=(-2,)), "integers >= 0"),
    ("bool dim", _typed(shape=[True, 2]), "integers >= 0"),
    ("float dim", _typed(shape=[2.0]), "integers >= 0"),
    ("shape not list", _typed(shape="2"), "needs a shape"),
    ("count mismatch", _typed(shape=(3,)), "has 2 values"),
    ("huge shape", _typed(shape=(2**40, 2**40)), "too large"),
    ("zero beside huge sizes", _typed(shape=(0, 2**24, 2**24, 2**24), data=()), "too large"),
    ("zero after huge sizes", _typed(shape=(2**24,) * 4 + (0,), data=()), "too large"),
    ("floats declared int", _typed(dtype="int8"), "data are not int8"),
    ("int out of range", _typed(dtype="uint8", data=(1, 300)), "outside the uint8 range"),
    ("ints declared bool", _typed(dtype="bool", data=(1, 0)), "data are not bool"),
    (
        "unknown field",
        b'{"inputs": {"x": {"dtype": "int8", "shape": [], "data": 1, "z": 0}}}',
        "unknown field",
    ),
    ("empty name", b'{"inputs": {"": [1]}}', "names must be strings"),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in HOSTILE_JSON], ids=[c[0] for c in HOSTILE_JSON]
)
def test_hostile_json_is_refused_with_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(InputValidationError, match=message):
        decode_json(body)


def test_json_limits_on_tensor_count_elements_and_rank() -> None:
    limits = CodecLimits(max_tensors=2, max_elements=10, max_rank=2)
    with pytest.raises(InputValidationError, match="3 tensors"):
        decode_json(b'{"inputs": {"a": 1, "b": 2, "c": 3}}', limits=limits)
    with pytest.raises(InputValidationError, match="more than 10 elements"):
        decode_json(b'{"inputs": {"a": [1,2,3,4,5,6], "b": [1,2,3,4,5]}}', limits=limits)
    with pytest.raises(InputValidationError, match="rank 3"):
        decode_json(b'{"inputs": {"a": [[[1]]]}}', limits=limits)


_ENTRY = {"name": "x", "dtype": "float32", "shape": [2]}
_X = np.array([1.0, 2.0], np.float32).tobytes()


def _aligned(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return BINARY_MAGIC + struct.pack("<I", len(raw)) + raw + data


HOSTILE_BINARY: list[tuple[str, bytes, str]] = [
    ("empty", b"", "no room for its prefix"),
    ("prefix only", BINARY_MAGIC + b"\0\0", "no room for its prefix"),
    ("bad magic", b"EST2" + b"\0" * 8, "must start with"),
    ("lying header length", _binary({"tensors": [_ENTRY]}, length=10_000), "header needs"),
    ("oversized header length", _binary({"tensors": []}, length=2**32 - 1), "at most 65536"),
    ("header not json", BINARY_MAGIC + struct.pack("<I", 3) + b"{{{", "not valid UTF-8 JSON"),
    ("header a list", _binary([1]), '"tensors" list'),
    ("no tensors", _binary({"tensors": []}), "carries no tensors"),
    ("entry not object", _binary({"tensors": [1]}), "each tensor entry"),
    ("entry extra field", _binary({"tensors": [{**_ENTRY, "offset": 0}]}), "each tensor entry"),
    ("duplicate names", _aligned({"tensors": [_ENTRY, _ENTRY]}, _X + _X), "appears twice"),
    ("bad dtype", _binary({"tensors": [{**_ENTRY, "dtype": "<f4"}]}), "dtype '<f4'"),
    ("negative dim", _binary({"tensors": [{**_ENTRY, "shape": [-1]}]}), "integers >= 0"),
    ("rank too high", _binary({"tensors": [{**_ENTRY, "shape": [1] * 9}]}), "at most 8 sizes"),
    ("huge dims", _binary({"tensors": [{**_ENTRY, "shape": [2**62, 2**62]}]}), "too large"),
    (
        "zero beside huge dims",
        _aligned({"tensors": [{**_ENTRY, "shape": [0, 2**24, 2**24, 2**24]}]}, b""),
        "too large",
    ),
    (
        "zero after huge dims",
        _aligned({"tensors": [{**_ENTRY, "shape": [2**24] * 4 + [0]}]}, b""),
        "too large",
    ),
    ("data truncated", _aligned({"tensors": [_ENTRY]}, _X[:-1]), "truncated: tensor 'x'"),
    (
        "trailing bytes",
        _aligned({"tensors": [_ENTRY]}, _X + b"\0"),
        "1 bytes after its last tensor",
    ),
    (
        "bool not 0/1",
        _aligned({"tensors": [{"name": "b", "dtype": "bool", "shape": [2]}]}, b"\x01\x02"),
        "other than 0 and 1",
    ),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in HOSTILE_BINARY], ids=[c[0] for c in HOSTILE_BINARY]
)
def test_hostile_binary_is_refused_with_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(InputValidationError, match=message):
        decode_binary(body)


def test_binary_element_limit_counts_all_tensors_together() -> None:
    body = encode_binary({"a": np.ones(2, np.int8), "b": np.ones(2, np.int8)})
    with pytest.raises(InputValidationError, match="more than 3 elements"):
        decode_binary(body, CodecLimits(max_elements=3))


def test_binary_tensor_count_limit() -> None:
    tensors = {f"t{i}": np.ones(1, np.int8) for i in range(3)}
    with pytest.raises(InputValidationError, match="3 tensors; at most 2"):
        decode_binary(encode_binary(tensors), CodecLimits(max_tensors=2))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_binary_message_decodes_or_is_refused_cleanly(data: st.DataObject) -> None:
    body = bytearray(
        encode_binary(
            {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.ones(2, np.bool_)},
            {"correlation_id": "c"},
        )
    )
    index = data.draw(st.integers(0, len(body) - 1))
    body[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    try:
        decoded = decode_binary(bytes(body[:cut]))
    except InputValidationError:
        return
    assert sum(a.nbytes for a in decoded.tensors.values()) <= len(body)


# --- empty tensors whose other sizes numpy cannot hold -----------------------------------

# Every shape here with one size 0 holds no element, yet numpy refuses to create it: the
# sizes other than 0 multiply beyond its index range (found by trying; numpy 2.4).
UNALLOCATABLE_SHAPES = [
    [0, 2**24, 2**24, 2**24],
    [2**24, 2**24, 2**24, 2**24, 0],
    [0, 2**24, 2**24, 2**15],
    [0] + [2**24] * 7,
]


@pytest.mark.parametrize("shape", UNALLOCATABLE_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "int8", "bool"])
def test_an_empty_tensor_numpy_cannot_allocate_is_refused_in_both_encodings(
    shape: list[int], dtype: str
) -> None:
    with pytest.raises(InputValidationError, match="too large for the element limit"):
        decode_json(_typed(dtype=dtype, shape=shape, data=()))
    entry = {"name": "x", "dtype": dtype, "shape": shape}
    with pytest.raises(InputValidationError, match="too large for the element limit"):
        decode_binary(_aligned({"tensors": [entry]}, b""))


def test_an_empty_tensor_within_the_element_limit_still_decodes() -> None:
    decoded = decode_json(_typed(shape=(0, 2**12, 2**12), data=()))
    assert decoded.tensors["x"].shape == (0, 2**12, 2**12)


def test_limits_refuse_an_element_count_numpy_sizes_could_overflow() -> None:
    with pytest.raises(ValueError, match="max_elements"):
        CodecLimits(max_elements=2**62)


# --- large JSON messages: arrays of numbers read straight into numpy ----------------------

# A structure cap this low makes the decoder lift every array of 128 bytes or more.
LIFTING = CodecLimits(max_header_bytes=512)


def _json_text(value: Any, indent: int | None) -> bytes:
    return json.dumps(value, indent=indent).encode()


@settings(max_examples=150, deadline=None)
@given(
    a=hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int32, np.int16, np.uint8]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
        elements={"allow_nan": False, "allow_infinity": False},
    ),
    typed=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
    declared=st.sampled_from(["float32", "float64", "int16", "uint8", "int64"]),
)
def test_a_large_json_message_decodes_as_a_small_one_would(
    a: np.ndarray, typed: bool, indent: int | None, declared: str
) -> None:
    assume(len(json.dumps(a.tolist())) >= 128)  # else it stays in the structure
    tensor: Any = (
        {"dtype": declared, "shape": list(a.shape), "data": a.tolist()} if typed else a.tolist()
    )
    body = _json_text({"inputs": {"x": tensor}, "correlation_id": "c-[1, 2]"}, indent)
    outcomes = []
    for limits in (LIFTING, CodecLimits(max_header_bytes=len(body) + 1)):
        try:
            decoded = decode_json(body, limits=limits)
        except InputValidationError as exc:
            outcomes.append(("refused", str(exc).split(";")[0]))
            continue
        got = decoded.tensors["x"]
        assert decoded.meta == {"correlation_id": "c-[1, 2]"}
        outcomes.append(("decoded", got.dtype.name, got.shape, got.tobytes()))
    assert outcomes[0] == outcomes[1]


def test_plain_integers_decode_to_the_narrowest_type_holding_them() -> None:
    for values, dtype in [([99, -99], "int8"), ([100, 0], "int16"), ([-(10**9) + 1], "int32")]:
        small = decode_json(json.dumps({"inputs": {"x": values}}).encode())
        large = decode_json(json.dumps({"inputs": {"x": values * 100}}).encode(), limits=LIFTING)
        assert small.tensors["x"].dtype == large.tensors["x"].dtype == np.dtype(dtype)
    assert decode_json(b'{"inputs": {"x": [10000000000]}}').tensors["x"].dtype == np.int64


def test_an_integer_beyond_18_digits_among_floats_is_refused_large_or_small() -> None:
    # Found by tests/fuzz/codec_json.py: lifted, it was read as a float; json reads a
    # Python int, which numpy cannot put beside floats.
    values = ", ".join(["-44.1"] * 100 + ["-3333333333333333333333333333333"])
    body = f'{{"inputs": {{"x": [{values}]}}}}'.encode()
    assert len(body) > LIFTING.max_header_bytes  # read only if lifted
    for limits in (LIFTING, CodecLimits()):
        with pytest.raises(InputValidationError):
            decode_json(body, limits=limits)


def test_long_fractions_are_no_long_integers() -> None:
    body = json.dumps({"inputs": {"x": [0.00012345678901234567] * 100}}).encode()
    assert len(body) > LIFTING.max_header_bytes  # read only if lifted
    assert decode_json(body, limits=LIFTING).tensors["x"].shape == (100,)


def test_an_array_of_numbers_inside_a_string_stays_a_string() -> None:
    text = json.dumps(list(range(200)))
    body = json.dumps({"inputs": {"x": list(range(200))}, "note": text}).encode()
    decoded = decode_json(body, limits=CodecLimits(max_header_bytes=1200))
    assert decoded.meta == {"note": text}
    np.testing.assert_array_equal(decoded.tensors["x"], np.arange(200))


_RANGE = json.dumps(list(range(200))).encode()  # long enough to be lifted


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": {"x": 1e' + _RANGE + b"}}", "not valid UTF-8 JSON.*outside its arrays"),
        (b'{"inputs": {"x": ' + _RANGE + b"5}}", "not valid UTF-8 JSON.*outside its arrays"),
        (b"{" + _RANGE + b": 1}", "not valid UTF-8 JSON.*outside its arrays"),
        (b'{"inputs": {"x": [1]}, "m": ' + _RANGE + b"}", "accepted only as tensors"),
        (b'{"inputs": {"x": [1]}, "m": "' + b"a" * 600 + b'"}', "outside arrays of numbers"),
        (b'{"inputs": {"x": [' + b"true," * 200 + b"false]}}", "outside arrays of numbers"),
    ],
    ids=[
        "exponent of an array",
        "digit after an array",
        "array as key",
        "array in meta",
        "long meta",
        "bools",
    ],
)
def test_a_large_json_message_is_refused_where_it_breaks_the_rules(
    body: bytes, message: str
) -> None:
    with pytest.raises(InputValidationError, match=message):
        decode_json(body, limits=LIFTING)


def test_decoded_json_tensors_are_bounded_by_the_message_size() -> None:
    limits = CodecLimits(max_decoded_per_byte=2.0, decoded_allowance_bytes=0)
    zeros = ",".join(["0"] * 1000)
    typed = '{"inputs": {"x": {"dtype": "%s", "shape": [1000], "data": [%s]}}}'
    decode_json((typed % ("float32", zeros)).encode(), limits=limits)  # 4 bytes per 2 sent
    with pytest.raises(InputValidationError, match=r"past \d+ bytes"):
        decode_json((typed % ("float64", zeros)).encode(), limits=limits)  # 8 per 2


def test_a_json_message_of_short_numbers_carries_no_more_values_than_a_binary_one() -> None:
    limits = CodecLimits(decoded_allowance_bytes=0)  # the defaults, without the allowance
    typed = '{"inputs": {"x": {"dtype": "float32", "shape": [1000], "data": [%s]}}}'
    decode_json((typed % ",".join(["0.5"] * 1000)).encode(), limits=limits)  # 4 bytes each
    with pytest.raises(InputValidationError, match="at least 4"):
        decode_json((typed % ",".join(["0"] * 1000)).encode(), limits=limits)  # 2 bytes each
    zeros = ",".join(["0"] * 1000)  # plain: int8, widened to the model's dtype later
    with pytest.raises(InputValidationError, match="at least 4"):
        decode_json(f'{{"inputs": {{"x": [{zeros}]}}}}'.encode(), limits=limits)


def test_decoding_a_large_json_message_allocates_little_beyond_its_tensors() -> None:
    # Python's json would hold a float object and a list slot per "0.5," (32 bytes per 5):
    # 8 MiB here, where the decoder works in chunks of text and numbers of ~1 MiB.
    x = np.full((4096, 64), 0.5, np.float32)
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    tracemalloc.start()
    try:
        decoded = decode_json(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.tensors["x"].shape == (4096, 64)
    assert peak < decoded.tensors["x"].nbytes + 1.5 * 2**20


def test_message_fields_reads_metadata_without_the_tensors() -> None:
    big = {"inputs": {"x": list(range(300))}, "reply_to": "a/b", "correlation_id": 7}
    assert message_fields(json.dumps(big).encode(), limits=LIFTING) == {
        "reply_to": "a/b",
        "correlation_id": 7,
    }
    binary = encode_binary({"x": np.ones(3, np.float32)}, {"reply_to": "c/d"})
    assert message_fields(binary) == {"reply_to": "c/d"}
    with pytest.raises(InputValidationError, match="outside arrays of numbers"):
        message_fields(b'{"reply_to": "' + b"a" * 600 + b'"}', limits=LIFTING)


def test_json_answers_in_parts_are_the_compact_json_of_the_outputs() -> None:
    outputs = {"p": np.arange(150_000, dtype=np.float32) / 7, "n": np.array(3, np.int64)}
    meta = {"model": "d1", "correlation_id": "c"}
    parts = encode_json_parts(outputs, "outputs", meta)
    assert len(parts) > 3  # the large tensor went out in several pieces
    expected = {
        **meta,
        "outputs": {
            name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.ravel().tolist()}
            for name, a in outputs.items()
        },
    }
    assert b"".join(parts) == json.dumps(expected, separators=(",", ":")).encode()
    assert encode_json(outputs, "outputs", meta) == b"".join(parts)
