"""Make test bundles without the SDK's build command.

Three layers, from honest to hostile:

* :func:`make_manifest` — a valid :class:`Manifest` with sane defaults; any field can be
  overridden, and ``files`` is computed from the payload unless given.
* :class:`BundleParts` — manifest + payload + signing keys -> canonical bundle bytes, built
  with :func:`agent.bundle.write_bundle` and :func:`sdk.build.keys.sign_envelope`. Knobs
  swap in other manifest or envelope bytes, and :meth:`BundleParts.members` gives the canonical
  member list for tests that reorder, drop or add members.
* :func:`raw_member` / :func:`raw_tar` — hand-made tar members of any type, name, size and
  header spelling, for archives the canonical writer refuses to produce.

Keys come from :func:`make_key`: deterministic per label (derived from a hash), so tests
and golden files do not depend on randomness, and no key file or passphrase is involved.

Real models work too: pass their bytes (or a :class:`~pathlib.Path`) in the payload and a
matching ``model=ModelSpec(...)`` / ``health=Health(...)`` to :func:`make_manifest`.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.bundle import _tar, write_bundle
from agent.bundle.manifest import (
    MANIFEST_PATH,
    PAYLOAD_TYPE,
    SIGNATURE_PATH,
    Compatibility,
    FileEntry,
    Health,
    Manifest,
    ModelSpec,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.bundle.signing import Envelope, TrustPolicy
from sdk.build.keys import SigningKey, sign_envelope

__all__ = [
    "CREATED",
    "DEFAULT_PAYLOAD",
    "EXPECTED_PATH",
    "GOLDEN_PATH",
    "MODEL_PATH",
    "NOW",
    "BundleParts",
    "Payload",
    "file_entries",
    "make_key",
    "make_manifest",
    "make_policy",
    "raw_member",
    "raw_tar",
]

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
NOW = CREATED + timedelta(days=1)  # a "now" at which default bundles are valid

# Payload values: bytes, or a path to a file (large or real models, read when building).
Payload = Mapping[str, bytes | Path]

MODEL_PATH = "model/model.onnx"
GOLDEN_PATH = "health/golden_inputs.npz"
EXPECTED_PATH = "health/expected_outputs.npz"

# Placeholder content: verification only hashes it. Tests that load the model pass real bytes.
DEFAULT_PAYLOAD: Mapping[str, bytes] = {
    EXPECTED_PATH: b"expected outputs placeholder\n",
    GOLDEN_PATH: b"golden inputs placeholder\n",
    MODEL_PATH: bytes(range(256)) * 8 + b"tail",  # not block-aligned: has padding
}


def _read(value: bytes | Path) -> bytes:
    return value if isinstance(value, bytes) else value.read_bytes()


def file_entries(payload: Payload) -> tuple[FileEntry, ...]:
    """The manifest's ``files`` list for ``payload``: sorted, with sizes and sha256."""
    entries = []
    for path in sorted(payload):
        value = payload[path]
        if isinstance(value, bytes):
            size, digest = len(value), hashlib.sha256(value).hexdigest()
        else:
            h = hashlib.sha256()
            with value.open("rb") as f:
                while chunk := f.read(1024**2):
                    h.update(chunk)
            size, digest = value.stat().st_size, h.hexdigest()
        entries.append(FileEntry(path=path, size=size, sha256=digest))
    return tuple(entries)


def make_manifest(payload: Payload | None = None, **overrides: Any) -> Manifest:
    """A valid manifest describing ``payload`` (default :data:`DEFAULT_PAYLOAD`).

    ``overrides`` replace any :class:`Manifest` field (``sequence=7``, ``expires=...``,
    ``model=ModelSpec(...)``, ``files=...``). The defaults describe an ONNX model at
    ``model/model.onnx`` taking ``x: float32[None, 4]`` and returning ``y: float32[None, 2]``.
    """
    payload = DEFAULT_PAYLOAD if payload is None else payload
    defaults: dict[str, Any] = {
        "name": "demo",
        "version": "1.0.0",
        "sequence": 1,
        "created": CREATED,
        "compatibility": Compatibility(runtimes=(RuntimeRequirement("onnxruntime", "1.17"),)),
        "model": ModelSpec(
            format="onnx",
            file=MODEL_PATH,
            inputs=(TensorSpec("x", "float32", (None, 4)),),
            outputs=(TensorSpec("y", "float32", (None, 2)),),
        ),
        "health": Health(GOLDEN_PATH, EXPECTED_PATH, Tolerance(atol=1e-4)),
        "files": file_entries(payload),
    }
    defaults.update(overrides)
    return Manifest(**defaults)


def make_key(
    label: str = "release", keytype: Literal["ed25519", "ecdsa-p256"] = "ed25519"
) -> SigningKey:
    """A signing key derived from ``label``: the same label gives the same key, every run."""
    seed = hashlib.sha256(f"edgeship-test-key:{keytype}:{label}".encode()).digest()
    if keytype == "ed25519":
        return SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    # Any integer in [1, n) is a valid P-256 private scalar; a 256-bit hash almost always is.
    return SigningKey(ec.derive_private_key(int.from_bytes(seed) % (2**255), ec.SECP256R1()))


def make_policy(*keys: SigningKey, threshold: int = 1) -> TrustPolicy:
    """A trust policy listing the public halves of ``keys``."""
    return TrustPolicy.of([k.public for k in keys], threshold=threshold)


@dataclass(frozen=True)
class BundleParts:
    """The inputs of one bundle; :meth:`to_bytes` lays them out canonically.

    Knobs for broken variants:
        manifest_bytes: the manifest.json member as given (default: ``manifest.to_bytes()``).
        signed_bytes: what the signatures cover (default: the manifest.json bytes).
        envelope_bytes: the manifest.sig member as given (default: a fresh DSSE envelope).
    """

    manifest: Manifest = field(default_factory=make_manifest)
    payload: Payload = field(default_factory=lambda: DEFAULT_PAYLOAD)
    keys: Sequence[SigningKey] = field(default_factory=lambda: (make_key(),))
    manifest_bytes: bytes | None = None
    signed_bytes: bytes | None = None
    envelope_bytes: bytes | None = None

    def replace(self, **changes: Any) -> BundleParts:
        return replace(self, **changes)

    def manifest_member(self) -> bytes:
        return self.manifest.to_bytes() if self.manifest_bytes is None else self.manifest_bytes

    def envelope(self) -> Envelope:
        signed = self.manifest_member() if self.signed_bytes is None else self.signed_bytes
        return sign_envelope(PAYLOAD_TYPE, signed, list(self.keys))

    def signature_member(self) -> bytes:
        if self.envelope_bytes is not None:
            return self.envelope_bytes
        return self.envelope().to_bytes()

    def members(self) -> list[tuple[str, bytes]]:
        """(name, content) of every member in canonical order, for hand-made variants."""
        head = [(MANIFEST_PATH, self.manifest_member()), (SIGNATURE_PATH, self.signature_member())]
        return head + [(p, _read(self.payload[p])) for p in sorted(self.payload)]

    def to_bytes(self) -> bytes:
        """The canonical bundle, written by :func:`agent.bundle.write_bundle`."""
        out = io.BytesIO()
        self.write(out)
        return out.getvalue()

    def write(self, out: BinaryIO) -> None:
        """Write the canonical bundle to ``out`` (streams payload files given as paths)."""
        with tempfile.TemporaryDirectory(prefix="edgeship-test-payload-") as tmp:
            sources: dict[str, Path] = {}
            for i, (path, value) in enumerate(sorted(self.payload.items())):
                if isinstance(value, Path):
                    sources[path] = value
                else:
                    src = Path(tmp) / str(i)
                    src.write_bytes(value)
                    sources[path] = src
            write_bundle(
                out,
                self.manifest_member(),
                self.signature_member(),
                sources,
            )


def raw_member(
    name: str | bytes,
    data: bytes = b"",
    *,
    typeflag: bytes = b"0",
    size: int | None = None,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    mode: bytes = b"0000644\0",
    patch: Mapping[int, bytes] | None = None,
    pad: bool = True,
) -> bytes:
    """One tar member, header and data, spelled however a test needs.

    Starts from the canonical header for a regular file and overwrites fields: ``name``
    (any bytes, up to 100), ``typeflag``, the declared ``size`` (default ``len(data)``),
    ``linkname``, ``magic`` (bytes 257-265; ``b"ustar  \\0"`` is GNU tar's), ``mode``, and
    raw byte ``patch``-es at header offsets. The checksum is recomputed last, so the header
    is well-formed tar. ``pad=False`` leaves the data unpadded.
    """
    raw_name = name.encode("ascii") if isinstance(name, str) else name
    declared = len(data) if size is None else size
    header = bytearray(_tar.encode_header("x", declared))
    header[0:100] = raw_name[:100].ljust(100, b"\0")
    header[100:108] = mode
    header[156:157] = typeflag
    header[157:257] = linkname[:100].ljust(100, b"\0")
    header[257:265] = magic
    for offset, value in (patch or {}).items():
        header[offset : offset + len(value)] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    tail = b"\0" * _tar.padding(len(data)) if pad else b""
    return bytes(header) + data + tail


def raw_tar(
    members: Iterable[tuple[str, bytes] | bytes], *, end: bytes = _tar.END_OF_ARCHIVE
) -> bytes:
    """A tar from ``members``: (name, content) pairs become canonical regular-file members,
    ``bytes`` are used as given (e.g. from :func:`raw_member`); ``end`` closes the archive."""
    out = bytearray()
    for member in members:
        if isinstance(member, bytes):
            out += member
        else:
            name, data = member
            out += _tar.encode_header(name, len(data)) + data
            out += b"\0" * _tar.padding(len(data))
    return bytes(out + end)
