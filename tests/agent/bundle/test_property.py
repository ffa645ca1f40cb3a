"""Properties: a signed bundle changed in any way is refused with a BundleError, never
accepted and never failing with another exception type."""

from __future__ import annotations

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bundle import DeviceInfo, read_unverified, verify_bundle
from agent.errors import BundleError
from tests.support.bundles import NOW, BundleParts, make_key, make_manifest, make_policy

KEY = make_key("release")
EC_KEY = make_key("hsm", "ecdsa-p256")
# Both signatures are needed: under 1-of-2, a corrupted second signature is rightly ignored.
POLICY = make_policy(KEY, EC_KEY, threshold=2)
DEVICE = DeviceInfo(runtimes={"onnxruntime": "1.32.0"}, arch="x86_64")
# Two signatures (both key types) and an expiry, so every manifest section is covered.
PARTS = BundleParts(manifest=make_manifest(expires=NOW.replace(year=2027)), keys=(KEY, EC_KEY))
GOOD = PARTS.to_bytes()
# manifest.json and manifest.sig: headers, data and padding.
HEAD_BYTES = sum(512 + -(-len(data) // 512) * 512 for _, data in PARTS.members()[:2])

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_refused(raw: bytes) -> None:
    try:
        verify_bundle(io.BytesIO(raw), POLICY, now=NOW, device=DEVICE)
    except BundleError:
        return
    raise AssertionError("a changed bundle was accepted")


def test_the_unchanged_bundle_verifies() -> None:
    verify_bundle(io.BytesIO(GOOD), POLICY, now=NOW, device=DEVICE)


@FAST
@given(st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, len(GOOD) - 1), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != GOOD[offset]), label="value")
    raw = bytearray(GOOD)
    raw[offset] = value
    _assert_refused(bytes(raw))


def test_every_byte_inverted_is_refused() -> None:
    # Exhaustive companion to the random property: each offset at least once.
    for offset in range(len(GOOD)):
        raw = bytearray(GOOD)
        raw[offset] ^= 0xFF
        _assert_refused(bytes(raw))


@FAST
@given(st.integers(0, len(GOOD) - 1))
def test_truncation_at_any_offset_is_refused(length: int) -> None:
    _assert_refused(GOOD[:length])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD)), st.integers(0, 255))
def test_an_inserted_byte_anywhere_is_refused(offset: int, value: int) -> None:
    _assert_refused(GOOD[:offset] + bytes([value]) + GOOD[offset:])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1))
def test_a_deleted_byte_anywhere_is_refused(offset: int) -> None:
    _assert_refused(GOOD[:offset] + GOOD[offset + 1 :])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused_by_verify_and_read_unverified(raw: bytes) -> None:
    _assert_refused(raw)
    try:
        read_unverified(io.BytesIO(raw))
    except BundleError:
        return
    raise AssertionError("read_unverified returned a manifest from random bytes")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_read_unverified_raises_only_bundle_errors_on_changed_heads(data: st.DataObject) -> None:
    # read_unverified parses an unsigned manifest: hostile text must still fail cleanly.
    offset = data.draw(st.integers(0, HEAD_BYTES - 1), label="offset")
    raw = bytearray(GOOD)
    raw[offset] = data.draw(st.integers(0, 255), label="value")
    with contextlib.suppress(BundleError):
        read_unverified(io.BytesIO(bytes(raw)))
