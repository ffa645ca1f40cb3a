"""Hostile and broken bundles: one table, each case with the exact error it must raise.

Every case runs twice: from a real file with extraction (nothing may be left anywhere on
disk) and from an in-memory stream without extraction.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import DeviceInfo, Limits, _tar, verify_bundle
from agent.bundle.manifest import (
    MANIFEST_PATH,
    PAYLOAD_TYPE,
    SIGNATURE_PATH,
    Compatibility,
    FileEntry,
    RuntimeRequirement,
)
from agent.bundle.signing import Envelope, Signature, TrustPolicy, pae
from agent.errors import (
    BadSignatureError,
    BundleError,
    BundleTooLargeError,
    CompatibilityError,
    DigestMismatchError,
    DuplicateMemberError,
    ExpiredError,
    ExtraMemberError,
    MalformedManifestError,
    ManifestMismatchError,
    MemberOrderError,
    MissingMemberError,
    NotATarError,
    RollbackError,
    SchemaVersionError,
    SizeMismatchError,
    ThresholdError,
    TruncatedBundleError,
    UnsafeMemberError,
    UntrustedSignerError,
)
from tests.support.bundles import (
    DEFAULT_PAYLOAD,
    NOW,
    BundleParts,
    make_key,
    make_manifest,
    make_policy,
    raw_member,
    raw_tar,
)

KEY = make_key("release")
OTHER = make_key("other")
SECOND = make_key("second")
EC_KEY = make_key("hsm", "ecdsa-p256")
POLICY = make_policy(KEY)
TWO_OF_TWO = make_policy(KEY, SECOND, threshold=2)
DEVICE = DeviceInfo(runtimes={"onnxruntime": "1.32.0"}, arch="x86_64")

PARTS = BundleParts()
GOOD = PARTS.to_bytes()
MEMBERS = PARTS.members()  # manifest.json, manifest.sig, expected, golden, model
MODEL = "model/model.onnx"
MODEL_DATA = DEFAULT_PAYLOAD[MODEL]


def _layout() -> dict[str, tuple[int, int, int]]:
    """member name -> (header offset, data offset, size) in GOOD."""
    out, offset = {}, 0
    for name, data in MEMBERS:
        out[name] = (offset, offset + _tar.BLOCK, len(data))
        offset += _tar.BLOCK + len(data) + _tar.padding(len(data))
    return out


LAYOUT = _layout()
END = len(GOOD) - len(_tar.END_OF_ARCHIVE)


# --- building blocks ------------------------------------------------------------------


def signed(**overrides: Any) -> bytes:
    """A correctly signed bundle whose manifest has ``overrides``."""
    return BundleParts(manifest=make_manifest(**overrides)).to_bytes()


def signed_manifest(text: bytes) -> bytes:
    """A bundle whose manifest.json is ``text``, correctly signed by KEY."""
    return PARTS.replace(manifest_bytes=text).to_bytes()


def edited_manifest(edit: Callable[[dict[str, Any]], object]) -> bytes:
    """A correctly signed bundle whose manifest JSON was edited by ``edit``."""
    doc = make_manifest().to_json()
    edit(doc)
    return signed_manifest(json.dumps(doc, sort_keys=True).encode())


def with_envelope(envelope: Envelope | bytes) -> bytes:
    raw = envelope if isinstance(envelope, bytes) else envelope.to_bytes()
    return PARTS.replace(envelope_bytes=raw).to_bytes()


def envelope_with(**changes: Any) -> bytes:
    return with_envelope(replace(PARTS.envelope(), **changes))


def members_except(*names: str) -> list[tuple[str, bytes]]:
    return [m for m in MEMBERS if m[0] not in names]


def swapped(i: int, j: int) -> bytes:
    members = list(MEMBERS)
    members[i], members[j] = members[j], members[i]
    return raw_tar(members)


def replaced(name: str, member: bytes) -> bytes:
    """GOOD with member ``name`` replaced by the raw bytes ``member``."""
    return raw_tar([member if n == name else (n, d) for n, d in MEMBERS])


def inserted(at: int, member: tuple[str, bytes] | bytes) -> bytes:
    members: list[tuple[str, bytes] | bytes] = list(MEMBERS)
    members.insert(at, member)
    return raw_tar(members)


def flipped(offset: int) -> bytes:
    raw = bytearray(GOOD)
    raw[offset] ^= 0x01
    return bytes(raw)


def set_field(doc: dict[str, Any], dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    for key in path:
        doc = doc[int(key)] if key.isdigit() else doc[key]  # type: ignore[index]
    doc[last] = value


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    bundle: Callable[[], bytes]
    error: type[BundleError]
    policy: TrustPolicy = POLICY
    limits: Limits = field(default_factory=Limits)
    min_sequence: int | None = None
    device: DeviceInfo | None = DEVICE
    now: datetime = NOW


def _other_manifest_bytes() -> bytes:
    return make_manifest(version="6.6.6").to_bytes()


_TYPES = {
    "symlink": b"2",
    "hardlink": b"1",
    "char-device": b"3",
    "block-device": b"4",
    "directory": b"5",
    "fifo": b"6",
    "contiguous": b"7",
    "pax-header": b"x",
    "pax-global-header": b"g",
    "gnu-long-name": b"L",
    "gnu-long-link": b"K",
    "gnu-sparse": b"S",
}
_TRUNCATIONS = {
    "first-header-start": 1,
    "first-header-middle": 300,
    "first-header-end": 511,
    "manifest-data-start": LAYOUT[MANIFEST_PATH][1],
    "manifest-data": LAYOUT[MANIFEST_PATH][1] + 10,
    "manifest-padding": LAYOUT[SIGNATURE_PATH][0] - 1,
    "signature-header": LAYOUT[SIGNATURE_PATH][0],
    "signature-header-middle": LAYOUT[SIGNATURE_PATH][0] + 200,
    "signature-data": LAYOUT[SIGNATURE_PATH][1] + 5,
    "payload-header": LAYOUT[MODEL][0],
    "payload-header-middle": LAYOUT[MODEL][0] + 257,
    "payload-data-start": LAYOUT[MODEL][1],
    "payload-data": LAYOUT[MODEL][1] + 1000,
    "payload-data-end": LAYOUT[MODEL][1] + len(MODEL_DATA) - 1,
    "payload-padding": LAYOUT[MODEL][1] + len(MODEL_DATA) + 1,
    "before-end-marker": END,
    "end-marker-first-block": END + 100,
    "between-end-blocks": END + 512,
    "end-marker-second-block": len(GOOD) - 1,
}

BAD: list[Bad] = [
    # signatures and the trust policy
    Bad(
        "wrong-key",
        lambda: envelope_with(
            signatures=(
                Signature(KEY.keyid, OTHER.sign(pae(PAYLOAD_TYPE, PARTS.manifest_member()))),
            )
        ),
        BadSignatureError,
    ),
    Bad(
        "wrong-ecdsa-key",
        lambda: envelope_with(
            signatures=(
                Signature(EC_KEY.keyid, make_key("x", "ecdsa-p256").sign(pae(PAYLOAD_TYPE, b"x"))),
            )
        ),
        BadSignatureError,
        policy=make_policy(EC_KEY),
    ),
    Bad("unknown-key", lambda: PARTS.replace(keys=(OTHER,)).to_bytes(), UntrustedSignerError),
    Bad(
        "below-threshold",
        lambda: PARTS.replace(keys=(KEY, OTHER)).to_bytes(),
        ThresholdError,
        policy=TWO_OF_TWO,
    ),
    Bad(
        "duplicate-signatures-from-one-key",
        lambda: PARTS.replace(keys=(KEY, KEY, KEY)).to_bytes(),
        ThresholdError,
        policy=TWO_OF_TWO,
    ),
    Bad(
        "second-trusted-signature-invalid",
        lambda: envelope_with(
            signatures=(
                *PARTS.envelope().signatures,
                Signature(SECOND.keyid, KEY.sign(pae(PAYLOAD_TYPE, PARTS.manifest_member()))),
            )
        ),
        ThresholdError,
        policy=TWO_OF_TWO,
    ),
    Bad(
        "signature-over-different-bytes",
        lambda: envelope_with(
            signatures=(Signature(KEY.keyid, KEY.sign(pae(PAYLOAD_TYPE, _other_manifest_bytes()))),)
        ),
        BadSignatureError,
    ),
    Bad(
        "signature-over-raw-manifest-not-pae",
        lambda: envelope_with(
            signatures=(Signature(KEY.keyid, KEY.sign(PARTS.manifest_member())),)
        ),
        BadSignatureError,
    ),
    Bad(
        "manifest-changed-after-signing",
        lambda: PARTS.replace(
            manifest_bytes=_other_manifest_bytes(), signed_bytes=PARTS.manifest_member()
        ).to_bytes(),
        ManifestMismatchError,
    ),
    Bad(
        "envelope-signs-another-manifest",
        lambda: PARTS.replace(signed_bytes=_other_manifest_bytes()).to_bytes(),
        ManifestMismatchError,
    ),
    Bad("wrong-payload-type", lambda: envelope_with(payload_type="text/plain"), BadSignatureError),
    Bad(
        "envelope-not-canonical",
        lambda: with_envelope(PARTS.envelope().to_bytes().replace(b",", b", ", 1)),
        BadSignatureError,
    ),
    Bad("envelope-not-json", lambda: with_envelope(b"not json"), BadSignatureError),
    Bad("envelope-not-utf8", lambda: with_envelope(b"\xff\xfe"), BadSignatureError),
    Bad("envelope-deeply-nested", lambda: with_envelope(b"[" * 50_000), BadSignatureError),
    Bad("envelope-huge-integer", lambda: with_envelope(b"9" * 5000), BadSignatureError),
    Bad("envelope-without-signatures", lambda: envelope_with(signatures=()), BadSignatureError),
    Bad(
        "envelope-too-many-signatures",
        lambda: PARTS.replace(keys=[make_key(str(i)) for i in range(17)]).to_bytes(),
        BadSignatureError,
    ),
    Bad(
        "envelope-bad-base64",
        lambda: with_envelope(PARTS.envelope().to_bytes().replace(b'"sig":"', b'"sig":"*', 1)),
        BadSignatureError,
    ),
    Bad(
        "envelope-unknown-field",
        lambda: with_envelope(PARTS.envelope().to_bytes().replace(b"{", b'{"x":1,', 1)),
        BadSignatureError,
    ),
    Bad(
        "oversized-signature",
        lambda: with_envelope(b" " * (Limits().max_signature_bytes + 1)),
        BundleTooLargeError,
    ),
    # the manifest's content (correctly signed: the parser is the defence)
    Bad(
        "oversized-manifest",
        lambda: signed(evaluation={"blob": "x" * 1024**2}),
        BundleTooLargeError,
    ),
    Bad(
        "manifest-over-configured-cap",
        lambda: GOOD,
        BundleTooLargeError,
        limits=Limits(max_manifest_bytes=100),
    ),
    Bad("manifest-not-utf8", lambda: signed_manifest(b'{"name":"\xff"}'), MalformedManifestError),
    Bad("manifest-malformed-json", lambda: signed_manifest(b'{"name":'), MalformedManifestError),
    Bad("manifest-empty", lambda: signed_manifest(b""), MalformedManifestError),
    Bad("manifest-not-an-object", lambda: signed_manifest(b"[]"), MalformedManifestError),
    Bad(
        "manifest-duplicate-key",
        lambda: signed_manifest(PARTS.manifest_member().replace(b"{", b'{"name":"evil",', 1)),
        MalformedManifestError,
    ),
    Bad(
        "manifest-nan",
        lambda: signed_manifest(
            json.dumps({**make_manifest().to_json(), "sequence": float("nan")}).encode()
        ),
        MalformedManifestError,
    ),
    Bad(
        "manifest-infinity-in-nested-field",
        lambda: edited_manifest(lambda d: set_field(d, "health.tolerance.atol", float("inf"))),
        MalformedManifestError,
    ),
    Bad("manifest-deeply-nested", lambda: signed_manifest(b"[" * 50_000), MalformedManifestError),
    Bad(
        "manifest-huge-integer",
        lambda: signed_manifest(
            PARTS.manifest_member().replace(b'"sequence":1', b'"sequence":' + b"9" * 5000)
        ),
        MalformedManifestError,
    ),
    *[
        Bad(
            f"manifest-bad-{key}={json.dumps(value)}",
            lambda k=key, v=value: edited_manifest(lambda d: set_field(d, k, v)),
            MalformedManifestError,
        )
        for key, value in [
            ("sequence", "1"),
            ("sequence", True),
            ("sequence", -1),
            ("sequence", 1.5),
            ("name", 7),
            ("name", "../evil"),
            ("created", "yesterday"),
            ("files", {}),
            ("files.0.size", "12"),
            ("files.0.sha256", "ABC"),
            ("files.0.path", "../escape"),
            ("files.0.path", "/abs"),
            ("model.inputs.0.shape", [0]),
            ("model.inputs.0.dtype", "float128"),
            ("model.format", "pickle"),
            ("health.tolerance", [1e-4]),
            ("compatibility.runtimes", []),
            ("model_card", None),
        ]
    ],
    Bad(
        "manifest-unknown-field-same-minor",
        lambda: edited_manifest(lambda d: d.update(surprise=1)),
        MalformedManifestError,
    ),
    Bad(
        "manifest-unknown-nested-field-same-minor",
        lambda: edited_manifest(lambda d: d["model"].update(surprise=1)),
        MalformedManifestError,
    ),
    Bad(
        "manifest-missing-field",
        lambda: edited_manifest(lambda d: d.pop("sequence")),
        MalformedManifestError,
    ),
    Bad(
        "manifest-newer-major-schema",
        lambda: edited_manifest(lambda d: d.update(schema_version="2.0", surprise=1)),
        SchemaVersionError,
    ),
    Bad(
        "manifest-schema-version-garbage",
        lambda: edited_manifest(lambda d: d.update(schema_version="one")),
        MalformedManifestError,
    ),
    Bad(
        "manifest-model-file-not-listed",
        lambda: edited_manifest(lambda d: set_field(d, "model.file", "model/other.onnx")),
        MalformedManifestError,
    ),
    # the device's own rules
    Bad("expired", lambda: signed(expires=NOW - timedelta(hours=1)), ExpiredError),
    Bad(
        "expired-beyond-clock-slack",
        lambda: signed(expires=NOW - timedelta(seconds=301)),
        ExpiredError,
    ),
    Bad("sequence-below-floor", lambda: signed(sequence=3), RollbackError, min_sequence=4),
    Bad(
        "runtime-too-old",
        lambda: GOOD,
        CompatibilityError,
        device=DeviceInfo(runtimes={"onnxruntime": "1.16.3"}, arch="x86_64"),
    ),
    Bad(
        "runtime-at-exclusive-max",
        lambda: signed(
            compatibility=Compatibility(runtimes=(RuntimeRequirement("onnxruntime", None, "1.32"),))
        ),
        CompatibilityError,
    ),
    Bad(
        "runtime-missing",
        lambda: GOOD,
        CompatibilityError,
        device=DeviceInfo(runtimes={"litert": "2.3.0"}, arch="x86_64"),
    ),
    Bad(
        "wrong-arch",
        lambda: signed(
            compatibility=Compatibility(
                runtimes=(RuntimeRequirement("onnxruntime"),), arch=("aarch64",)
            )
        ),
        CompatibilityError,
    ),
    Bad(
        "wrong-device-class",
        lambda: signed(
            compatibility=Compatibility(
                runtimes=(RuntimeRequirement("onnxruntime"),), device_classes=("camera",)
            )
        ),
        CompatibilityError,
    ),
    # payload content
    Bad("payload-byte-flipped", lambda: flipped(LAYOUT[MODEL][1] + 7), DigestMismatchError),
    Bad(
        "payload-last-byte-flipped",
        lambda: flipped(LAYOUT[MODEL][1] + len(MODEL_DATA) - 1),
        DigestMismatchError,
    ),
    Bad(
        "payload-truncated",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA[:-10])),
        SizeMismatchError,
    ),
    Bad(
        "payload-member-larger-than-declared",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA + b"more")),
        SizeMismatchError,
    ),
    Bad(
        "header-size-beyond-data-and-manifest",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, size=_tar.MAX_MEMBER_SIZE)),
        SizeMismatchError,
    ),
    Bad(
        # header and signed manifest agree on a block-aligned size shorter than the data
        "declared-size-shorter-than-data",
        lambda: _size_lie(3 * _tar.BLOCK),
        DigestMismatchError,
    ),
    Bad(
        # header and signed manifest agree on a size that runs into the end marker
        "declared-size-longer-than-data",
        lambda: _size_lie(len(MODEL_DATA) + 1024),
        DigestMismatchError,
    ),
    Bad(
        "payload-padding-not-zero",
        lambda: flipped(LAYOUT[MODEL][1] + len(MODEL_DATA) + 3),
        NotATarError,
    ),
    Bad(
        "manifest-declares-more-than-max-bundle",
        lambda: signed(
            files=tuple(
                FileEntry(f.path, 5 * 1024**3, f.sha256) if f.path == MODEL else f
                for f in make_manifest().files
            )
        ),
        BundleTooLargeError,
    ),
    # members: presence, order, names
    Bad("member-missing-last", lambda: raw_tar(members_except(MODEL)), MissingMemberError),
    Bad(
        "member-missing-middle",
        lambda: raw_tar(members_except("health/golden_inputs.npz")),
        MissingMemberError,
    ),
    Bad(
        "payload-missing",
        lambda: raw_tar(MEMBERS[:2]),
        MissingMemberError,
    ),
    Bad("signature-missing-at-end", lambda: raw_tar(MEMBERS[:1]), MissingMemberError),
    Bad("no-members-at-all", lambda: _tar.END_OF_ARCHIVE, MissingMemberError),
    Bad("extra-member-at-end", lambda: inserted(5, ("zzz/extra.bin", b"x")), ExtraMemberError),
    Bad(
        "extra-member-in-the-middle",
        lambda: inserted(4, ("health/zzz.npz", b"x")),
        ExtraMemberError,
    ),
    Bad("payload-order-changed", lambda: swapped(2, 4), MemberOrderError),
    Bad("head-order-changed", lambda: swapped(0, 1), MemberOrderError),
    Bad(
        "payload-before-head",
        lambda: raw_tar([MEMBERS[4], *MEMBERS[:4]]),
        MemberOrderError,
    ),
    Bad("duplicate-payload-member", lambda: inserted(5, MEMBERS[4]), DuplicateMemberError),
    Bad("duplicate-manifest", lambda: inserted(1, MEMBERS[0]), DuplicateMemberError),
    Bad("absolute-path-extra", lambda: inserted(5, ("/etc/evil", b"x")), UnsafeMemberError),
    Bad(
        "absolute-path-in-place",
        lambda: replaced(MODEL, raw_member("/" + MODEL, MODEL_DATA)),
        UnsafeMemberError,
    ),
    Bad("absolute-path-first", lambda: raw_tar([("/abs", b"x")]), UnsafeMemberError),
    Bad("dotdot-path", lambda: inserted(2, ("../escape", b"x")), UnsafeMemberError),
    Bad("dotdot-inside-path", lambda: inserted(5, ("model/../../x", b"x")), UnsafeMemberError),
    Bad("dot-path", lambda: inserted(5, ("./model/x", b"x")), UnsafeMemberError),
    Bad("backslash-path", lambda: inserted(5, ("..\\x", b"x")), UnsafeMemberError),
    *[
        Bad(
            f"{kind}-member",
            lambda t=flag: replaced(
                MODEL, raw_member(MODEL, b"", typeflag=t, linkname=b"/etc/passwd")
            ),
            UnsafeMemberError,
        )
        for kind, flag in _TYPES.items()
    ],
    Bad(
        "symlink-as-first-member",
        lambda: raw_tar([raw_member(MANIFEST_PATH, typeflag=b"2", linkname=b"/etc/passwd")]),
        UnsafeMemberError,
    ),
    Bad(
        "pax-header-before-payload",
        lambda: inserted(
            4, raw_member("PaxHeaders/x", b"30 path=" + b"a" * 20 + b"\n", typeflag=b"x")
        ),
        UnsafeMemberError,
    ),
    Bad(
        "gnu-long-name-before-payload",
        lambda: inserted(4, raw_member("././@LongLink", b"a" * 200 + b"\0", typeflag=b"L")),
        UnsafeMemberError,
    ),
    # the container
    Bad("empty-file", lambda: b"", NotATarError),
    Bad("not-a-tar-random", lambda: random.Random(1).randbytes(4096), NotATarError),
    Bad("not-a-tar-short-text", lambda: b"hello, I am a model\n", NotATarError),
    Bad("not-a-tar-zip", lambda: b"PK\x03\x04" + b"\0" * 2000, NotATarError),
    Bad("gzipped-bundle", lambda: gzip.compress(GOOD, mtime=0), NotATarError),
    Bad("trailing-garbage", lambda: GOOD + b"garbage", NotATarError),
    Bad("trailing-zero-block", lambda: GOOD + b"\0" * 512, NotATarError),
    Bad("end-marker-second-block-not-zero", lambda: flipped(len(GOOD) - 3), NotATarError),
    Bad(
        "gnu-tar-magic",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, magic=b"ustar  \0")),
        NotATarError,
    ),
    Bad(
        "v7-tar-header",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, magic=b"\0" * 8)),
        NotATarError,
    ),
    Bad(
        "gnu-tar-magic-first",
        lambda: replaced(
            MANIFEST_PATH, raw_member(MANIFEST_PATH, MEMBERS[0][1], magic=b"ustar  \0")
        ),
        NotATarError,
    ),
    Bad(
        "non-canonical-mode",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, mode=b"0000755\0")),
        NotATarError,
    ),
    Bad(
        "non-canonical-uid",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, patch={108: b"0001750\0"})),
        NotATarError,
    ),
    Bad(
        "non-canonical-owner-name",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, patch={265: b"root"})),
        NotATarError,
    ),
    Bad(
        "non-canonical-size-spelling",
        lambda: replaced(
            MODEL, raw_member(MODEL, MODEL_DATA, patch={124: b" %010o\0" % len(MODEL_DATA)})
        ),
        NotATarError,
    ),
    Bad(
        "old-style-regular-file-typeflag",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, typeflag=b"\0")),
        NotATarError,
    ),
    Bad(
        "ustar-prefix-field",
        lambda: replaced(MODEL, raw_member(MODEL, MODEL_DATA, patch={345: b"evil"})),
        NotATarError,
    ),
    Bad("header-checksum-wrong", lambda: flipped(LAYOUT[MODEL][0] + 5), NotATarError),
    Bad("non-ascii-name", lambda: inserted(5, raw_member(b"caf\xc3\xa9", b"x")), NotATarError),
    Bad("too-many-members", lambda: GOOD, BundleTooLargeError, limits=Limits(max_members=4)),
    Bad("too-many-members-default-limit", lambda: _many_members(300), BundleTooLargeError),
    Bad(
        "bundle-over-max-bytes",
        lambda: GOOD,
        BundleTooLargeError,
        limits=Limits(max_bundle_bytes=4096),
    ),
    *[
        Bad(f"truncated-in-{where}", lambda o=off: GOOD[:o], TruncatedBundleError)
        for where, off in _TRUNCATIONS.items()
    ],
]


def _size_lie(size: int) -> bytes:
    """MODEL (the last member) with a header and a signed manifest both claiming ``size``.

    Shorter (block-aligned): the rest of the data would be read as the next header. 1024 bytes
    longer: the claimed size swallows the end-of-archive marker exactly. Either way the
    structure parses as far as the member, and only the digest can tell.
    """
    files = tuple(replace(f, size=size) if f.path == MODEL else f for f in make_manifest().files)
    head = BundleParts(manifest=make_manifest(files=files)).members()[:4]
    body = raw_member(MODEL, MODEL_DATA, size=size, pad=False)
    return raw_tar([*head, body + b"\0" * _tar.padding(len(MODEL_DATA))])


def _many_members(count: int) -> bytes:
    payload = {**DEFAULT_PAYLOAD, **{f"extra/f{i:03}": b"%d" % i for i in range(count)}}
    return BundleParts(manifest=make_manifest(payload), payload=payload).to_bytes()


# --- running the table ---------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``root`` with its mode and size: a snapshot to compare."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size)
    return out


def _refuse(case: Bad, source: io.BufferedIOBase | io.BytesIO, extract_to: Path | None) -> None:
    with pytest.raises(BundleError) as info:
        verify_bundle(
            source,  # type: ignore[arg-type]
            case.policy,
            now=case.now,
            limits=case.limits,
            min_sequence=case.min_sequence,
            device=case.device,
            extract_to=extract_to,
        )
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_bundle_from_file_is_refused_with_its_error_and_writes_nothing(
    case: Bad, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(case.bundle())
    area = tmp_path / "area"
    area.mkdir()
    before = _tree(tmp_path)
    with bundle.open("rb") as source:
        _refuse(case, source, area / "extracted")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_bundle_from_stream_is_refused_with_its_error(case: Bad) -> None:
    _refuse(case, io.BytesIO(case.bundle()), None)


def test_table_ids_are_unique() -> None:
    assert len({c.id for c in BAD}) == len(BAD)


def test_the_unbroken_bundle_behind_the_table_verifies() -> None:
    # Guards the table: each case must fail for its own reason, not a broken base.
    verify_bundle(io.BytesIO(GOOD), POLICY, now=NOW, device=DEVICE)
    two = PARTS.replace(keys=(KEY, SECOND)).to_bytes()
    verify_bundle(io.BytesIO(two), TWO_OF_TWO, now=NOW, device=DEVICE)


# --- what must be accepted at the edges ---------------------------------------------------


def test_newer_minor_schema_with_unknown_fields_is_accepted_and_keeps_them() -> None:
    def edit(d: dict[str, Any]) -> None:
        d.update(schema_version="1.7", future_field={"a": [1, 2]})
        d["model"]["future_nested"] = True

    result = verify_bundle(io.BytesIO(edited_manifest(edit)), POLICY, now=NOW, device=DEVICE)
    assert result.manifest.schema_version == "1.7"
    assert result.manifest.extensions == {"future_field": {"a": [1, 2]}}


def test_expired_bundle_within_clock_slack_is_accepted() -> None:
    raw = signed(expires=NOW - timedelta(seconds=299))
    verify_bundle(io.BytesIO(raw), POLICY, now=NOW, device=DEVICE)


def test_sequence_equal_to_floor_is_accepted() -> None:
    verify_bundle(io.BytesIO(signed(sequence=4)), POLICY, now=NOW, min_sequence=4)


def test_untrusted_extra_signature_does_not_block_a_trusted_one() -> None:
    raw = PARTS.replace(keys=(OTHER, KEY)).to_bytes()
    verify_bundle(io.BytesIO(raw), POLICY, now=NOW)


# --- path traversal: nothing appears outside the given area ----------------------------------


@pytest.mark.parametrize(
    "name",
    ["../escape", "/abs-edgeship-escape", "../../escape2", "model/../../escape3", "./../escape4"],
)
def test_member_named_to_escape_creates_no_file_outside(name: str, tmp_path: Path) -> None:
    area = tmp_path / "a" / "b"
    area.mkdir(parents=True)
    target = area / "extracted"
    # The hostile member in every position, and once listed in a correctly signed manifest.
    files = (*make_manifest().files, FileEntry(name, 5, "0" * 64))
    signed_listing = BundleParts(manifest=make_manifest(files=files)).members()[:2]
    hostile = [
        inserted(2, (name, b"owned")),
        inserted(5, (name, b"owned")),
        raw_tar([(name, b"owned")]),
        raw_tar([*signed_listing, (name, b"owned")]),
    ]
    before = _tree(tmp_path)
    for raw in hostile:
        with pytest.raises(BundleError):
            verify_bundle(io.BytesIO(raw), POLICY, now=NOW, extract_to=target)
        assert _tree(tmp_path) == before
    assert not Path("/abs-edgeship-escape").exists()


def test_restamped_header_mtime_is_refused() -> None:
    name, data = MEMBERS[4]
    restamped = raw_member(name, data, patch={136: b"%011o\0" % 1_767_225_600})
    with pytest.raises(BundleError):
        verify_bundle(io.BytesIO(replaced(name, restamped)), POLICY, now=NOW, device=DEVICE)
