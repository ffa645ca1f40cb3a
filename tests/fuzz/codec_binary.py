"""Fuzz the binary tensor decoder: clean refusals only, and never more data than was sent.

Invariants: ``decode_binary`` returns or raises ``InputValidationError``; the tensors are
read-only views within the message; they encode back to a message that decodes the same.
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.errors import InputValidationError
    from agent.serve.codec import CodecLimits, decode_binary, encode_binary, message_fields

LIMITS = CodecLimits(max_elements=1 << 16, max_header_bytes=2048)


def target(data: bytes) -> None:
    try:
        message = decode_binary(data, LIMITS)
    except InputValidationError:
        return
    tensors = message.tensors
    assert sum(a.nbytes for a in tensors.values()) <= len(data)
    assert not any(a.flags.writeable for a in tensors.values())
    again = decode_binary(encode_binary(tensors), LIMITS).tensors
    assert list(again) == list(tensors)
    for name, a in tensors.items():
        assert (again[name].dtype, again[name].shape) == (a.dtype, a.shape)
        assert again[name].tobytes() == a.tobytes()
    assert "tensors" not in message_fields(data, "inputs", LIMITS)


if __name__ == "__main__":
    run(target, "codec_binary")
