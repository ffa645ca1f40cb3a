"""Properties: hostile content under a good signature.

A signer's key is not a licence to break the device: every field of a valid manifest is
replaced, one at a time, with hostile JSON (control characters, lone surrogates, non-ASCII
digits, huge or negative numbers, wrong types, odd times), the result is signed with a
trusted key and verified. The verifier must refuse it with a ``BundleError`` or accept a
manifest whose text is printable and whose canonical bytes read back to itself.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bundle import DeviceInfo, verify_bundle
from agent.bundle.manifest import Manifest, Tolerance
from agent.errors import BundleError
from tests.support.bundles import NOW, BundleParts, make_key, make_manifest, make_policy
from tests.support.hostile import assert_printable

KEY = make_key()
POLICY = make_policy(KEY)
DEVICE = DeviceInfo(runtimes={"onnxruntime": "1.32.0"}, arch="x86_64")
_PLAIN = make_manifest(expires=NOW.replace(year=2027))
# Every field, the per-provider tolerances (schema 1.3) included, gets its hostile values.
GOOD = replace(
    _PLAIN,
    health=replace(
        _PLAIN.health,
        provider_tolerances={"OpenVINOExecutionProvider": {"y": Tolerance(atol=0.01)}},
    ),
).to_json()


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [path] + [p for k, v in value.items() for p in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [path] + [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))]
    return [path]


PATHS = [p for p in _leaves(GOOD) if p]

_HOSTILE_TEXT = st.sampled_from(
    [
        "\x00",
        "\x1b[31m",
        "1.0\n",
        "\ud800",
        "\udfff",
        "a\u202eb",  # right-to-left override
        "\u0661\u0662",  # Arabic-Indic digits
        "\uff11",  # fullwidth one
        "../../etc/passwd",
        "/abs",
        "",
        " ",
        "x" * 70_000,
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00+00:00",
        "2026-02-30T00:00:00Z",
        "9999-12-31T23:59:60Z",
        "-0001-01-01T00:00:00Z",
        "NaN",
        "sha256:" + "g" * 64,
    ]
)
_HOSTILE = st.one_of(
    _HOSTILE_TEXT,
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**63, 2**64, 10**400, True, False, None, 1.5, 1e308, [], {}]),
    st.lists(_HOSTILE_TEXT, max_size=3),
    st.dictionaries(_HOSTILE_TEXT, _HOSTILE_TEXT, max_size=2),
)


def _with(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    document = json.loads(json.dumps(document))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


def _check(manifest_bytes: bytes) -> None:
    bundle = BundleParts(keys=(KEY,), manifest_bytes=manifest_bytes).to_bytes()
    try:
        accepted = verify_bundle(io.BytesIO(bundle), POLICY, now=NOW, device=DEVICE).manifest
    except BundleError:
        return
    assert_printable(accepted.to_json())
    assert Manifest.from_bytes(accepted.to_bytes()) == accepted


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), _HOSTILE, st.booleans())
def test_a_hostile_field_under_a_good_signature_is_refused_or_clean(
    path: tuple[Any, ...], value: Any, ascii_only: bool
) -> None:
    # ensure_ascii=True spells lone surrogates as \ud800 escapes, the way an attacker would.
    text = json.dumps(_with(GOOD, path, value), ensure_ascii=ascii_only)
    _check(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PATHS), st.sampled_from(PATHS), _HOSTILE)
def test_a_field_moved_or_renamed_is_refused_or_clean(
    source: tuple[Any, ...], target: tuple[Any, ...], key: Any
) -> None:
    # A value under another field's name, or a field under a hostile key.
    node: Any = GOOD
    for step in source:
        node = node[step]
    _check(json.dumps(_with(GOOD, target, node)).encode())
    parent = target[:-1]
    holder: Any = GOOD
    for step in parent:
        holder = holder[step]
    if isinstance(holder, dict) and isinstance(key, str):
        renamed = {(key if k == target[-1] else k): v for k, v in holder.items()}
        document = _with(GOOD, parent, renamed) if parent else renamed
        _check(json.dumps(document).encode("utf-8", "surrogatepass"))


def test_the_unchanged_manifest_verifies() -> None:
    _check(json.dumps(GOOD).encode())
    bundle = BundleParts(keys=(KEY,), manifest_bytes=json.dumps(GOOD).encode()).to_bytes()
    verify_bundle(io.BytesIO(bundle), POLICY, now=NOW, device=DEVICE)
