"""Bundles that must verify: results, extraction, reproducibility, read_unverified."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
from pathlib import Path

import pytest

from agent.bundle import (
    DeviceInfo,
    Limits,
    check_compatibility,
    read_unverified,
    verify_bundle,
    version_tuple,
)
from agent.bundle.manifest import (
    MANIFEST_PATH,
    SIGNATURE_PATH,
    Compatibility,
    Health,
    Manifest,
    ModelSpec,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.errors import CompatibilityError
from tests.support.bundles import (
    DEFAULT_PAYLOAD,
    NOW,
    BundleParts,
    make_key,
    make_manifest,
    make_policy,
)

KEY = make_key("release")
POLICY = make_policy(KEY)
DEVICE = DeviceInfo(runtimes={"onnxruntime": "1.32.0"}, arch="x86_64")


def test_verify_returns_manifest_digest_and_runtime() -> None:
    parts = BundleParts()
    result = verify_bundle(io.BytesIO(parts.to_bytes()), POLICY, now=NOW, device=DEVICE)
    assert result.manifest == parts.manifest
    assert result.manifest_bytes == parts.manifest.to_bytes()
    assert result.envelope_bytes == parts.signature_member()
    assert result.digest == hashlib.sha256(result.manifest_bytes).hexdigest()
    assert result.runtime == "onnxruntime"


def test_verify_without_device_checks_no_compatibility() -> None:
    result = verify_bundle(io.BytesIO(BundleParts().to_bytes()), POLICY, now=NOW)
    assert result.runtime is None


def test_extraction_writes_every_member_byte_identical_and_read_only(tmp_path: Path) -> None:
    parts = BundleParts()
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(parts.to_bytes())
    target = tmp_path / "x"
    with bundle.open("rb") as source:
        verify_bundle(source, POLICY, now=NOW, device=DEVICE, extract_to=target)
    written = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert written == {MANIFEST_PATH, SIGNATURE_PATH, *DEFAULT_PAYLOAD}
    for name, data in parts.members():
        assert (target / name).read_bytes() == data
    for p in [target, *target.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o555 if p.is_dir() else 0o444), p


def test_extraction_refuses_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "x"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        verify_bundle(io.BytesIO(BundleParts().to_bytes()), POLICY, now=NOW, extract_to=target)
    assert (target / "keep").read_text() == "mine"


def test_payload_larger_than_the_chunk_streams_through(tmp_path: Path) -> None:
    big = tmp_path / "model.onnx"
    big.write_bytes(bytes(range(256)) * (3 * 4096 + 7))  # many chunks, not block-aligned
    payload = {**DEFAULT_PAYLOAD, "model/model.onnx": big}
    parts = BundleParts(manifest=make_manifest(payload), payload=payload)
    target = tmp_path / "x"
    verify_bundle(
        io.BytesIO(parts.to_bytes()),
        POLICY,
        now=NOW,
        limits=Limits(chunk_bytes=4096),
        extract_to=target,
    )
    assert (target / "model/model.onnx").read_bytes() == big.read_bytes()


def test_empty_payload_file_is_allowed() -> None:
    payload = {**DEFAULT_PAYLOAD, "extra/empty.txt": b""}
    parts = BundleParts(manifest=make_manifest(payload), payload=payload)
    verify_bundle(io.BytesIO(parts.to_bytes()), POLICY, now=NOW)


def test_manifest_near_its_size_cap_verifies() -> None:
    # The envelope repeats the manifest base64-encoded: its cap must leave room for that.
    manifest = make_manifest(evaluation={"blob": "x" * (900 * 1024)})
    raw = BundleParts(manifest=manifest).to_bytes()
    assert verify_bundle(io.BytesIO(raw), POLICY, now=NOW).manifest == manifest


def test_ecdsa_signed_bundle_verifies() -> None:
    key = make_key("hsm", "ecdsa-p256")
    raw = BundleParts(keys=(key,)).to_bytes()
    verify_bundle(io.BytesIO(raw), make_policy(key), now=NOW, device=DEVICE)


def test_stdlib_tarfile_reads_a_bundle_in_member_order() -> None:
    parts = BundleParts()
    with tarfile.open(fileobj=io.BytesIO(parts.to_bytes())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [n for n, _ in parts.members()]
        assert all(m.isreg() and m.mode == 0o644 and m.uid == 0 for m in members)
        extracted = tar.extractfile(members[-1])
        assert extracted is not None
        assert extracted.read() == parts.members()[-1][1]


# --- reproducibility ------------------------------------------------------------------------


def test_same_inputs_and_ed25519_key_give_identical_bytes(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model" * 1000)
    payload = {**DEFAULT_PAYLOAD, "model/model.onnx": model}
    first = BundleParts(manifest=make_manifest(payload), payload=payload)
    second = BundleParts(
        manifest=make_manifest(dict(reversed(payload.items()))),
        payload=dict(reversed(payload.items())),
    )
    assert first.to_bytes() == second.to_bytes()


def test_every_header_has_mtime_zero() -> None:
    raw = BundleParts().to_bytes()
    headers = [i for i in range(0, len(raw), 512) if raw[i + 257 : i + 263] == b"ustar\0"]
    assert len(headers) == 2 + len(DEFAULT_PAYLOAD)
    assert all(raw[i + 136 : i + 148] == b"00000000000\0" for i in headers)


def test_ecdsa_bundles_differ_only_in_the_signature_and_share_the_digest() -> None:
    # ECDSA signatures are randomised: the manifest and payload members are reproducible,
    # manifest.sig is not, and the bundle's identity (sha256 of the manifest) is stable.
    key = make_key("hsm", "ecdsa-p256")
    a, b = BundleParts(keys=(key,)), BundleParts(keys=(key,))
    assert a.to_bytes() != b.to_bytes()
    ma, mb = a.members(), b.members()
    assert [m for m in ma if m[0] != SIGNATURE_PATH] == [m for m in mb if m[0] != SIGNATURE_PATH]
    policy = make_policy(key)
    va = verify_bundle(io.BytesIO(a.to_bytes()), policy, now=NOW)
    vb = verify_bundle(io.BytesIO(b.to_bytes()), policy, now=NOW)
    assert va.digest == vb.digest


# --- read_unverified ---------------------------------------------------------------------------


def test_read_unverified_returns_manifest_and_envelope_of_an_untrusted_bundle() -> None:
    stranger = make_key("stranger")
    parts = BundleParts(keys=(stranger,))
    manifest, envelope = read_unverified(io.BytesIO(parts.to_bytes()))
    assert manifest == parts.manifest
    assert [s.keyid for s in envelope.signatures] == [stranger.keyid]


def test_read_unverified_reads_only_the_head() -> None:
    # A bundle cut right after manifest.sig still shows: inspect works on partial downloads.
    parts = BundleParts()
    head = sum(512 + -(-len(d) // 512) * 512 for _, d in parts.members()[:2])
    manifest, _ = read_unverified(io.BytesIO(parts.to_bytes()[:head]))
    assert manifest == parts.manifest


# --- compatibility ------------------------------------------------------------------------------


def _tflite_manifest() -> Manifest:
    return make_manifest(
        compatibility=Compatibility(
            runtimes=(RuntimeRequirement("litert", "1.2"), RuntimeRequirement("tflite-runtime"))
        ),
        model=ModelSpec(
            "tflite",
            "model/model.onnx",
            (TensorSpec("x", "int8", (1, 4)),),
            (TensorSpec("y", "int8", (1, 2)),),
        ),
        health=Health("health/golden_inputs.npz", "health/expected_outputs.npz", Tolerance(1)),
    )


@pytest.mark.parametrize(
    ("runtimes", "chosen"),
    [
        ({"litert": "2.3.0", "tflite-runtime": "2.14.0"}, "litert"),
        ({"litert": "1.1.0", "tflite-runtime": "2.14.0"}, "tflite-runtime"),
        ({"tflite-runtime": "2.14.0", "onnxruntime": "1.32.0"}, "tflite-runtime"),
    ],
)
def test_first_usable_runtime_in_preference_order_is_chosen(
    runtimes: dict[str, str], chosen: str
) -> None:
    manifest = _tflite_manifest()
    assert check_compatibility(manifest, DeviceInfo(runtimes=runtimes)) == chosen


def test_runtime_for_another_model_format_is_not_usable() -> None:
    with pytest.raises(CompatibilityError, match=r"installed: onnxruntime 1\.32\.0"):
        check_compatibility(_tflite_manifest(), DeviceInfo(runtimes={"onnxruntime": "1.32.0"}))


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1.17", (1, 17)), ("2.14.0rc1", (2, 14, 0)), ("1.32.0+cpu", (1, 32, 0)), ("dev", ())],
)
def test_version_tuple_keeps_leading_numbers(text: str, parsed: tuple[int, ...]) -> None:
    assert version_tuple(text) == parsed
