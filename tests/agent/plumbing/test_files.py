"""Atomic replacement and exclusive creation: a failed write leaves the old content."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.plumbing.files import atomic_replace, atomic_write, write_new


def test_atomic_write_replaces_the_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failure_inside_the_block_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def crash_while_writing() -> None:
        with atomic_replace(target) as f:
            f.write(b"half")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        crash_while_writing()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_directory_is_synced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "f", b"x")
    assert synced == [stat.S_IFREG, stat.S_IFDIR]


def test_write_new_never_overwrites_nor_follows_a_link(tmp_path: Path) -> None:
    existing = tmp_path / "key"
    existing.write_bytes(b"secret")
    with pytest.raises(FileExistsError):
        write_new(existing, b"other")
    assert existing.read_bytes() == b"secret"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_new(link, b"x")
    assert not (tmp_path / "elsewhere").exists()


def test_write_new_creates_the_file_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    write_new(path, b"pem", mode=0o600)
    assert path.read_bytes() == b"pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
