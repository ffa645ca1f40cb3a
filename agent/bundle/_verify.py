"""Bundle verification: a file object, a trust policy and ``now`` in; a verified manifest out.

Pure apart from reading the source and, when asked, writing members into a fresh
directory the caller names (and nothing else). Memory stays bounded by one chunk buffer
plus the manifest and signature, whatever the payload size; each payload member is hashed
as it streams past.

Order of checks (docs/bundle-format.md): size caps, envelope, signatures against the trust
policy, manifest parsing, the signers' scopes, compatibility, sequence floors (the
device's and the policy's), expiry, then each payload member (path rules, size, sha256),
and finally nothing missing and nothing extra.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from agent.bundle import _tar
from agent.bundle._compat import DeviceInfo, check_compatibility
from agent.bundle.manifest import (
    MANIFEST_PATH,
    PAYLOAD_TYPE,
    SIGNATURE_PATH,
    Manifest,
    is_safe_member_path,
)
from agent.bundle.signing import Envelope, TrustPolicy, check_signatures
from agent.errors import (
    BadSignatureError,
    BundleError,
    BundleTooLargeError,
    DigestMismatchError,
    DuplicateMemberError,
    ExpiredError,
    ExtraMemberError,
    ManifestMismatchError,
    MemberOrderError,
    MissingMemberError,
    NotATarError,
    RollbackError,
    SizeMismatchError,
    TruncatedBundleError,
    UnsafeMemberError,
)
from agent.plumbing.files import write_new

__all__ = [
    "DEFAULT_MAX_BUNDLE_BYTES",
    "Limits",
    "VerifiedBundle",
    "read_unverified",
    "verify_bundle",
]

# The one default cap on a bundle's size, for `edgeship-agent install` and the daemon
# alike (agent.toml: fetch.max_bundle_bytes): the download stops past it and
# verification refuses a larger file.
DEFAULT_MAX_BUNDLE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Limits:
    """Caps applied before and while reading a bundle."""

    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    max_manifest_bytes: int = 1024**2
    # The envelope repeats the manifest, base64-encoded (4/3 of its size), plus signatures.
    max_signature_bytes: int = max_manifest_bytes * 4 // 3 + 64 * 1024
    max_members: int = 256
    clock_slack_s: float = 300.0
    chunk_bytes: int = 1024**2


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_bytes: bytes
    envelope_bytes: bytes
    # sha256 of the signed manifest bytes: the bundle's identity (it covers every file).
    digest: str
    runtime: str | None  # the runtime chosen for the device, when one was given


# Every bundle's first header starts with these bytes (name, mode, uid, gid; size follows).
_MANIFEST_HEADER_START = _tar.encode_header(MANIFEST_PATH, 0)[:124]


class _Reader:
    """Reads a bundle's tar stream strictly, counting bytes against the limits."""

    def __init__(self, source: BinaryIO, limits: Limits) -> None:
        self.source = source
        self.limits = limits
        self.offset = 0
        self.buffer = bytearray(limits.chunk_bytes)
        self.view = memoryview(self.buffer)
        self.names: set[str] = set()
        self.members = 0

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.source.read(n)
        self._advance(len(data))
        if len(data) != n:
            raise TruncatedBundleError(
                f"bundle ends inside {what} (offset {self.offset}); the file is incomplete:"
                " download it again"
            )
        return data

    def _advance(self, n: int) -> None:
        self.offset += n
        if self.offset > self.limits.max_bundle_bytes:
            raise BundleTooLargeError(
                f"bundle is larger than max_bundle_bytes ({self.limits.max_bundle_bytes})"
            )

    def next_header(self) -> _tar.Header | None:
        """The next member's header, or None at the end-of-archive marker."""
        start = self.offset
        block = self.source.read(_tar.BLOCK)
        self._advance(len(block))
        if not block and start == 0:
            raise NotATarError("the bundle file is empty")
        if not block:
            raise TruncatedBundleError(
                f"bundle ends without an end-of-archive marker (offset {start});"
                " the file is incomplete: download it again"
            )
        if len(block) != _tar.BLOCK:
            # A short file is a cut-off bundle only if it starts like one.
            if start == 0 and not _MANIFEST_HEADER_START.startswith(block[:124]):
                raise NotATarError("not a bundle: the file is shorter than one tar header")
            raise TruncatedBundleError(f"bundle ends inside a header (offset {start})")
        if block == b"\0" * _tar.BLOCK:
            self._finish()
            return None
        parsed = _tar.decode_header(block)
        if isinstance(parsed, str):
            if parsed.startswith("type:"):
                _, kind, name = parsed.split(":", 2)
                raise UnsafeMemberError(f"member {name!r} is a {kind}; bundles hold regular files")
            if start == 0:
                raise NotATarError(
                    f"not a bundle: {parsed}. A bundle is an uncompressed tar written by"
                    " `edgeship build`"
                )
            raise NotATarError(f"corrupt bundle at offset {start}: {parsed}")
        self.members += 1
        if self.members > self.limits.max_members:
            raise BundleTooLargeError(f"bundle has more than {self.limits.max_members} members")
        if parsed.name in self.names:
            raise DuplicateMemberError(f"member {parsed.name!r} appears twice")
        self.names.add(parsed.name)
        return parsed

    def _finish(self) -> None:
        second = self.read_exact(_tar.BLOCK, "the end-of-archive marker")
        if second != b"\0" * _tar.BLOCK:
            raise NotATarError(f"corrupt end-of-archive marker at offset {self.offset}")
        if self.source.read(1):
            raise NotATarError("data after the end-of-archive marker; bundles end there")

    def small_member(self, header: _tar.Header, cap: int, what: str) -> bytes:
        if header.size > cap:
            raise BundleTooLargeError(f"{what} is {header.size} bytes; the limit is {cap}")
        data = self.read_exact(header.size, what)
        self.skip_padding(header)
        return data

    def skip_padding(self, header: _tar.Header) -> None:
        pad = self.read_exact(_tar.padding(header.size), f"the padding of {header.name!r}")
        if pad.strip(b"\0"):
            raise NotATarError(f"non-zero padding after {header.name!r}")

    def stream(self, header: _tar.Header) -> Iterator[memoryview]:
        remaining = header.size
        while remaining:
            n = self.source.readinto(self.view[: min(remaining, len(self.buffer))])  # type: ignore[attr-defined]
            if not n:
                self._advance(0)
                raise TruncatedBundleError(
                    f"bundle ends inside {header.name!r} (offset {self.offset}); the file is"
                    " incomplete: download it again"
                )
            self._advance(n)
            remaining -= n
            yield self.view[:n]
        self.skip_padding(header)


def _check_size_cap(source: BinaryIO, limits: Limits) -> None:
    try:
        size = os.fstat(source.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return  # not a real file: the streaming count enforces the cap
    if size > limits.max_bundle_bytes:
        raise BundleTooLargeError(
            f"bundle is {size} bytes; max_bundle_bytes is {limits.max_bundle_bytes}"
        )
    if size == 0:
        raise NotATarError("the bundle file is empty")


def _read_head(reader: _Reader) -> tuple[bytes, bytes]:
    """manifest.json and manifest.sig, which must come first and second."""
    found: list[bytes] = []
    for expected, cap in (
        (MANIFEST_PATH, reader.limits.max_manifest_bytes),
        (SIGNATURE_PATH, reader.limits.max_signature_bytes),
    ):
        header = reader.next_header()
        if header is None:
            raise MissingMemberError(f"bundle has no {expected}")
        if header.name != expected:
            if not is_safe_member_path(header.name) and header.name not in (
                MANIFEST_PATH,
                SIGNATURE_PATH,
            ):
                raise UnsafeMemberError(f"member path {header.name!r} is not allowed")
            raise MemberOrderError(
                f"member {len(found) + 1} is {header.name!r}; bundles start with"
                f" {MANIFEST_PATH} then {SIGNATURE_PATH}"
            )
        found.append(reader.small_member(header, cap, expected))
    return found[0], found[1]


def read_unverified(source: BinaryIO, limits: Limits | None = None) -> tuple[Manifest, Envelope]:
    """The manifest and envelope of a bundle, WITHOUT checking signatures or payload.

    For display only (``edgeship inspect``); never trust the result.

    Raises:
        BundleError: the head of the bundle cannot be read or parsed.
    """
    limits = limits or Limits()
    _check_size_cap(source, limits)
    manifest_bytes, sig_bytes = _read_head(_Reader(source, limits))
    envelope = Envelope.from_bytes(sig_bytes)
    return Manifest.from_bytes(manifest_bytes), envelope


def verify_bundle(
    source: BinaryIO,
    policy: TrustPolicy,
    *,
    now: datetime,
    limits: Limits | None = None,
    min_sequence: int | None = None,
    device: DeviceInfo | None = None,
    extract_to: Path | None = None,
) -> VerifiedBundle:
    """Verify a whole bundle, streaming, and optionally extract it.

    Args:
        source: the bundle, read sequentially from its start.
        policy: keys trusted to sign bundles and their threshold.
        now: the current time (timezone-aware); checked against ``expires``.
        min_sequence: the device's anti-rollback floor; lower sequences are refused.
        device: when given, the bundle must be compatible with it.
        extract_to: a directory that must not exist yet; members are written there as
            they are verified. On any failure the directory is removed again.

    Raises:
        BundleError: one of its subclasses names what is wrong.
    """
    limits = limits or Limits()
    if extract_to is not None:
        extract_to.mkdir(mode=0o755)
    try:
        return _verify(
            source,
            policy,
            now=now,
            limits=limits,
            min_sequence=min_sequence,
            device=device,
            extract_to=extract_to,
        )
    except BaseException:
        if extract_to is not None:
            shutil.rmtree(extract_to, ignore_errors=True)
        raise


def _verify(
    source: BinaryIO,
    policy: TrustPolicy,
    *,
    now: datetime,
    limits: Limits,
    min_sequence: int | None,
    device: DeviceInfo | None,
    extract_to: Path | None,
) -> VerifiedBundle:
    _check_size_cap(source, limits)
    reader = _Reader(source, limits)
    manifest_bytes, sig_bytes = _read_head(reader)

    envelope = Envelope.from_bytes(sig_bytes)
    if envelope.to_bytes() != sig_bytes:
        raise BadSignatureError("manifest.sig is not in canonical form; it was altered")
    signers = check_signatures(envelope, policy, PAYLOAD_TYPE)
    if envelope.payload != manifest_bytes:
        raise ManifestMismatchError(
            "manifest.json differs from the signed manifest: it was changed after signing"
        )
    manifest = Manifest.from_bytes(manifest_bytes)
    policy.check_scope(manifest.name, signers)

    runtime = check_compatibility(manifest, device) if device is not None else None
    _check_floor(manifest, policy, min_sequence)
    if (
        manifest.expires is not None
        and now - timedelta(seconds=limits.clock_slack_s) > manifest.expires
    ):
        raise ExpiredError(
            f"bundle expired at {manifest.expires.isoformat()}; build and sign a fresh one"
        )
    declared = sum(f.size for f in manifest.files)
    if declared > limits.max_bundle_bytes:
        raise BundleTooLargeError(
            f"manifest declares {declared} payload bytes; max_bundle_bytes is"
            f" {limits.max_bundle_bytes}"
        )

    if extract_to is not None:
        write_new(extract_to / MANIFEST_PATH, manifest_bytes)
        write_new(extract_to / SIGNATURE_PATH, sig_bytes)

    for entry in manifest.files:
        header = reader.next_header()
        if header is None:
            raise MissingMemberError(f"bundle lacks {entry.path!r}, which the manifest lists")
        if header.name != entry.path:
            if not is_safe_member_path(header.name):
                raise UnsafeMemberError(f"member path {header.name!r} is not allowed")
            if any(f.path == header.name for f in manifest.files):
                raise _missing_or_misplaced(reader, header, entry.path)
            raise ExtraMemberError(f"member {header.name!r} is not listed in the manifest")
        if header.size != entry.size:
            raise SizeMismatchError(
                f"member {entry.path!r} is {header.size} bytes; the manifest says {entry.size}"
            )
        _stream_member(reader, header, entry.sha256, extract_to)

    extra = reader.next_header()
    if extra is not None:
        if not is_safe_member_path(extra.name):
            raise UnsafeMemberError(f"member path {extra.name!r} is not allowed")
        raise ExtraMemberError(f"member {extra.name!r} is not listed in the manifest")
    if extract_to is not None:
        _make_read_only(extract_to)
    return VerifiedBundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        envelope_bytes=sig_bytes,
        digest=hashlib.sha256(manifest_bytes).hexdigest(),
        runtime=runtime,
    )


def _check_floor(manifest: Manifest, policy: TrustPolicy, min_sequence: int | None) -> None:
    """The device's own floor, then the policy's for this model name (a signed root's).

    Raises:
        RollbackError: the sequence is below either.
    """
    if min_sequence is not None and manifest.sequence < min_sequence:
        raise RollbackError(
            f"bundle sequence {manifest.sequence} is below this device's floor {min_sequence};"
            " to return to older content, publish it again with a higher sequence"
        )
    floor, why = policy.floors.get(manifest.name, (0, ""))
    if manifest.sequence < floor:
        raise RollbackError(
            f"bundle sequence {manifest.sequence} is below {floor}, {why} for model"
            f" {manifest.name!r}; publish a release with a sequence of at least {floor}"
        )


def _missing_or_misplaced(reader: _Reader, found: _tar.Header, expected: str) -> BundleError:
    """The error for a listed member ``found`` where ``expected`` should be.

    The two look alike at this point, so read on (the bundle is refused either way, and
    reading is bounded by the size caps): ``expected`` later means the order is wrong; a
    clean end without it means it is missing.
    """
    header: _tar.Header | None = found
    try:
        while header is not None and header.name != expected:
            for _ in reader.stream(header):
                pass
            header = reader.next_header()
    except BundleError:
        header = found  # the rest is broken too; report what was seen first
    if header is None:
        return MissingMemberError(f"bundle lacks {expected!r}, which the manifest lists")
    return MemberOrderError(
        f"member {found.name!r} comes before {expected!r}; members follow the manifest's"
        " sorted file list"
    )


def _stream_member(
    reader: _Reader, header: _tar.Header, sha256: str, extract_to: Path | None
) -> None:
    digest = hashlib.sha256()
    fd = -1
    if extract_to is not None:
        target = extract_to.joinpath(*header.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        for chunk in reader.stream(header):
            digest.update(chunk)
            if fd >= 0:
                _write_all(fd, chunk)
        if fd >= 0:
            os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    if digest.hexdigest() != sha256:
        raise DigestMismatchError(
            f"member {header.name!r} does not match its sha256 in the manifest; the bundle is"
            " corrupt or was tampered with"
        )


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o555)  # noqa: S103 - read-only, not secret
    os.chmod(root, 0o555)  # noqa: S103 - the store is read-only, not secret
