"""Input validation: every kind of bad request in one table, and the casts that are allowed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.bundle.manifest import QuantParams, TensorSpec
from agent.errors import InputValidationError
from agent.serve._validation import InputPolicy, InputValidator, caller_dtype

IMAGE = TensorSpec("image", "float32", (None, 2, 3))
COUNT = TensorSpec("count", "int32", (None,))
FLAG = TensorSpec("flag", "bool", (1,))
QUANT = TensorSpec("q", "int8", (None, 4), QuantParams(0.1, 0))


def good(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image": np.zeros((1, 2, 3), np.float32),
        "count": np.array([1, 2], np.int32),
        "flag": np.array([True]),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


BAD_REQUESTS = [
    # (what is wrong, request, policy, message fragment)
    ("missing input", good(count=None), None, "missing input.*'count'"),
    ("unknown input", good(extra=np.zeros(1)), None, "unknown input.*'extra'"),
    ("renamed input", {**good(count=None), "counts": np.ones(2, np.int32)}, None, "missing"),
    ("non-string name", {**good(count=None), 3: np.ones(2, np.int32)}, None, "unknown.*3"),
    ("rank too low", good(image=np.zeros((2, 3), np.float32)), None, "rank 3"),
    ("rank too high", good(image=np.zeros((1, 1, 2, 3), np.float32)), None, "rank 3"),
    ("fixed dim differs", good(image=np.zeros((1, 3, 3), np.float32)), None, "dimension 1"),
    ("fixed batch differs", good(flag=np.array([True, False])), None, "dimension 0 must be 1"),
    ("empty tensor", good(image=np.zeros((0, 2, 3), np.float32)), None, "empty"),
    ("scalar for a vector", good(count=np.int32(3)), None, "rank 1"),
    ("float to int", good(count=np.array([1.0, 2.0])), None, "float64.*int32"),
    ("int too large", good(count=np.array([2**40], np.int64)), None, "outside the int32"),
    ("negative to uint", {"u": np.array([-1])}, "uint8", "outside the uint8"),
    ("bool to float", good(image=np.ones((1, 2, 3), bool)), None, "bool.*float32"),
    ("int to bool", good(flag=np.array([1])), None, "int64.*bool"),
    ("complex", good(image=np.zeros((1, 2, 3), np.complex64)), None, "non-numeric"),
    ("strings", good(count=np.array(["1", "2"])), None, "non-numeric"),
    ("objects", good(count=np.array([None, 1], dtype=object)), None, "non-numeric"),
    ("ragged list", good(image=[[[0, 0, 0], [0, 0]]]), None, "not a rectangular"),
    ("string list", good(count=["a", "b"]), None, "non-numeric"),
    ("NaN", good(image=np.full((1, 2, 3), np.nan, np.float32)), None, "NaN or infinity"),
    ("+inf", good(image=np.full((1, 2, 3), np.inf, np.float32)), None, "NaN or infinity"),
    ("-inf float64", good(image=np.full((1, 2, 3), -np.inf)), None, "NaN or infinity"),
    ("float64 overflow", good(image=np.full((1, 2, 3), 1e300)), None, "beyond float32"),
    ("too many elements", good(image=np.zeros((100, 2, 3), np.float32)), "max", "limit"),
    ("NaN in quantized", {"q": np.full((1, 4), np.nan, np.float32)}, "allow", "NaN"),
]


def validator_for(request: dict[Any, Any], policy: str | None) -> InputValidator:
    if "u" in request:
        return InputValidator([TensorSpec("u", "uint8", (1,))])
    if "q" in request:
        return InputValidator([QUANT], InputPolicy(allow_nonfinite=policy == "allow"))
    limits = InputPolicy(max_elements=100) if policy == "max" else InputPolicy()
    return InputValidator([IMAGE, COUNT, FLAG], limits)


@pytest.mark.parametrize(
    ("request_", "policy", "message"),
    [pytest.param(r, p, m, id=label) for label, r, p, m in BAD_REQUESTS],
)
def test_bad_request_is_refused_with_a_clear_error(
    request_: dict[Any, Any], policy: str | None, message: str
) -> None:
    validate = validator_for(request_, policy)
    with pytest.raises(InputValidationError, match=message):
        validate(request_)


def test_matching_arrays_pass_through_unchanged() -> None:
    request = good()
    out = InputValidator([IMAGE, COUNT, FLAG])(request)
    assert all(out[k] is request[k] for k in request)


@pytest.mark.parametrize(
    ("value", "spec", "expected_dtype"),
    [
        (np.ones((1, 2, 3), np.int64), IMAGE, np.float32),  # int -> float
        (np.ones((1, 2, 3), np.uint8), IMAGE, np.float32),  # pixels
        (np.ones((1, 2, 3), np.float64), IMAGE, np.float32),  # JSON numbers
        (np.ones((1, 2, 3), np.float16), IMAGE, np.float32),
        (np.ones((1, 2, 3), ">f4"), IMAGE, np.float32),  # big-endian file data
        ([[[1, 2, 3], [4, 5, 6]]], IMAGE, np.float32),  # nested lists
        (np.array([5, 7], np.int64), COUNT, np.int32),  # in range
        (np.array([5, 7], np.int8), COUNT, np.int32),  # widening
    ],
)
def test_safe_casts_are_applied(value: Any, spec: TensorSpec, expected_dtype: type) -> None:
    out = InputValidator([spec])({spec.name: value})[spec.name]
    assert out.dtype == expected_dtype
    np.testing.assert_array_equal(out, np.asarray(value).astype(expected_dtype))


def test_non_contiguous_input_is_made_contiguous() -> None:
    strided = np.zeros((1, 2, 6), np.float32)[:, :, ::2]
    out = InputValidator([IMAGE])({"image": strided})["image"]
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, strided)


def test_dynamic_dimension_takes_any_size() -> None:
    validate = InputValidator([IMAGE])
    for n in (1, 7, 64):
        assert validate({"image": np.zeros((n, 2, 3), np.float32)})["image"].shape[0] == n


def test_policy_may_let_nonfinite_values_through() -> None:
    x = np.array([[[np.nan, np.inf, -np.inf], [0, 1, 2]]], np.float32)
    out = InputValidator([IMAGE], InputPolicy(allow_nonfinite=True))({"image": x})["image"]
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("rows", [1, 20_000])  # both sides of the small-array fast path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_finite_values_are_accepted(rows: int, dtype: type) -> None:
    # Their sum of squares overflows: the fast check must fall back to the exact one.
    x = np.full((rows, 2, 3), 3e38, dtype)
    assert np.isfinite(InputValidator([IMAGE])({"image": x})["image"]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_value_in_a_large_input_is_found(bad: float) -> None:
    x = np.ones((20_000, 2, 3), np.float32)
    x[-1, -1, -1] = bad
    with pytest.raises(InputValidationError, match="NaN or infinity"):
        InputValidator([IMAGE])({"image": x})


def test_element_limit_counts_all_inputs_together() -> None:
    validate = InputValidator([IMAGE, COUNT, FLAG], InputPolicy(max_elements=6 + 2 + 1))
    validate(good())
    with pytest.raises(InputValidationError, match="limit"):
        validate(good(count=np.array([1, 2, 3], np.int32)))


def test_quantized_inputs_are_exchanged_as_float32() -> None:
    assert caller_dtype(QUANT) == np.float32
    assert caller_dtype(COUNT) == np.int32
    out = InputValidator([QUANT])({"q": np.array([[1, 2, 3, 4]])})["q"]
    assert out.dtype == np.float32


def test_policy_refuses_a_nonpositive_element_limit() -> None:
    with pytest.raises(ValueError, match="max_elements"):
        InputPolicy(max_elements=0)
