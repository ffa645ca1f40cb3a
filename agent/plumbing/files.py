"""Files: written so that a crash or power cut leaves the old content or the new; read
only when they are what they claim to be.

Every file edgeship replaces (the agent's state, rollout records, built bundles, batch
outputs) goes through :func:`atomic_replace`: a temporary file in the same directory,
fsync, ``os.replace``, then fsync of the directory so that the rename itself survives a
power cut. Files that must never be overwritten (keys, extracted bundle members) are
created with :func:`write_new`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "NotRegularFileError",
    "atomic_replace",
    "atomic_write",
    "file_sha256",
    "fsync_dir",
    "open_regular",
    "write_new",
]


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


class NotRegularFileError(OSError):
    """The path names a FIFO, a device, a socket or a directory, not a regular file."""


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if, and only if, it is a regular file.

    Opening never blocks (a FIFO with no writer would block a plain ``open`` forever) and
    the check is made on the opened descriptor, so the path cannot be swapped in between.
    A character device such as /dev/zero would otherwise pass a size check with size 0
    and then stream without end.

    Raises:
        NotRegularFileError: anything but a regular file (the message says what it is).
        OSError: it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        kind = _kind(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        raise NotRegularFileError(f"{path} is {kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for the message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def file_sha256(path: Path, chunk_bytes: int = 1024**2) -> str:
    """sha256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
