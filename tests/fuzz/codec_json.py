"""Fuzz the JSON tensor decoder: clean refusals only, and large messages read as small ones.

Invariants: ``decode_json`` returns or raises ``InputValidationError``; a message read with
its arrays of numbers lifted (a low structure cap) decodes to the same dtypes, shapes and
values as the plain ``json`` reading (a ``-0`` integer among floats may keep its sign
there: Python's ints have no negative zero); what decodes encodes back to the same
tensors; ``message_fields`` is as clean.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.errors import InputValidationError
    from agent.serve.codec import CodecLimits, decode_json, encode_json, message_fields

# A structure cap this low lifts arrays from most inputs of a few hundred bytes.
LIFTING = CodecLimits(max_header_bytes=256, max_elements=1 << 16)
PLAIN = CodecLimits(max_header_bytes=1 << 20, max_elements=1 << 16)


def _decoded(data: bytes, limits: CodecLimits) -> dict[str, Any] | None:
    try:
        tensors = decode_json(data, "inputs", limits).tensors
    except InputValidationError:
        return None
    assert sum(a.size for a in tensors.values()) <= limits.max_elements
    return tensors


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for name, a in expected.items():
        assert (got[name].dtype, got[name].shape) == (a.dtype, a.shape), name
        assert np.array_equal(got[name], a, equal_nan=a.dtype.kind == "f"), name


def target(data: bytes) -> None:
    lifted = _decoded(data, LIFTING)
    plain = _decoded(data, PLAIN)
    if lifted is not None:
        assert plain is not None
        _assert_same(lifted, plain)
    if plain is not None:
        _assert_same(decode_json(encode_json(plain, "inputs"), "inputs", PLAIN).tensors, plain)
    with contextlib.suppress(InputValidationError):
        message_fields(data, "inputs", LIFTING)


if __name__ == "__main__":
    run(target, "codec_json")
