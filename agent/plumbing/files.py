"""Writing files so that a crash or power cut leaves either the old content or the new.

Every file edgeship replaces (the agent's state, rollout records, built bundles, batch
outputs) goes through :func:`atomic_replace`: a temporary file in the same directory,
fsync, ``os.replace``, then fsync of the directory so that the rename itself survives a
power cut. Files that must never be overwritten (keys, extracted bundle members) are
created with :func:`write_new`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_replace", "atomic_write", "fsync_dir", "write_new"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into; it replaces ``path`` on success.

    The temporary file is created next to ``path`` (never following a link) and removed
    if the block raises; ``path`` then keeps its old content.

    Raises:
        OSError: the file cannot be created, written, synced or renamed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see :func:`atomic_replace`).

    Raises:
        OSError: the write failed; ``path`` still holds its old content.
    """
    with atomic_replace(path, mode=mode) as f:
        f.write(data)


def write_new(path: Path, data: bytes | memoryview, *, mode: int = 0o644) -> None:
    """Create ``path`` with ``data`` and fsync it; never overwrites, never follows a link.

    A write that fails removes the partial file.

    Raises:
        FileExistsError: ``path`` exists (a link included).
        OSError: the file cannot be created or written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)  # ours: O_EXCL created it
        raise
    os.close(fd)
