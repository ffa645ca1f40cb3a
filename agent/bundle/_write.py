"""Laying out a bundle's bytes in the one canonical encoding (the SDK signs first)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from agent.bundle import _tar
from agent.bundle.manifest import MANIFEST_PATH, SIGNATURE_PATH, is_safe_member_path

__all__ = ["write_bundle"]


def write_bundle(
    out: BinaryIO,
    manifest_bytes: bytes,
    envelope_bytes: bytes,
    payload: Mapping[str, Path],
    *,
    chunk_bytes: int = 1024**2,
) -> None:
    """Write a bundle in the canonical encoding (the SDK signs; this only lays out bytes).

    ``payload`` maps member paths to source files; members are written sorted by path,
    which is the order of the manifest's file list.

    Raises:
        ValueError: a path is not a safe member path.
    """
    for path in payload:
        if not is_safe_member_path(path):
            raise ValueError(f"{path!r} is not a safe bundle member path")
    out.write(_tar.encode_header(MANIFEST_PATH, len(manifest_bytes)))
    out.write(manifest_bytes + b"\0" * _tar.padding(len(manifest_bytes)))
    out.write(_tar.encode_header(SIGNATURE_PATH, len(envelope_bytes)))
    out.write(envelope_bytes + b"\0" * _tar.padding(len(envelope_bytes)))
    for path in sorted(payload):
        src = payload[path]
        size = src.stat().st_size
        out.write(_tar.encode_header(path, size))
        written = 0
        with src.open("rb") as f:
            while chunk := f.read(chunk_bytes):
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise ValueError(f"{src} changed size while being written")
        out.write(b"\0" * _tar.padding(size))
    out.write(_tar.END_OF_ARCHIVE)
