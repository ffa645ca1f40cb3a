"""The state file and the content-addressed store."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bundle import verify_bundle
from agent.errors import StateError
from agent.install._store import (
    MAX_ATTEMPT_RECORDS,
    AgentState,
    Failure,
    Pending,
    Store,
    atomic_write,
)
from tests.support.bundles import NOW, BundleParts, make_key, make_policy

D1 = "a" * 64
D2 = "b" * 64
D3 = "c" * 64


def _full_state() -> AgentState:
    return AgentState(
        current=D1,
        previous=D2,
        pending=Pending("health-check", "http://x/b.bundle", sha256=D3, digest=D3, sequence=9),
        floor=7,
        floor_digest=D1,
        attempts={D3: 2},
        last_failure=Failure("rolled-back", "p95 too high", 1700000000.5, D2, "probation"),
    )


def test_state_round_trips_through_bytes() -> None:
    state = _full_state()
    assert AgentState.from_bytes(state.to_bytes()) == state
    assert AgentState.from_bytes(AgentState().to_bytes()) == AgentState()


def test_state_bytes_are_canonical() -> None:
    assert _full_state().to_bytes() == AgentState.from_bytes(_full_state().to_bytes()).to_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        AgentState().to_bytes().replace(b'"format":1', b'"format":2'),
        AgentState().to_bytes().replace(b'"floor":null', b'"floor":-1'),
        AgentState().to_bytes().replace(b'"floor":null', b'"floor":true'),
        AgentState().to_bytes().replace(b'"current":null', b'"current":"../../etc"'),
        AgentState().to_bytes().replace(b'"attempts":{}', b'"attempts":{"x":1}'),
        AgentState().to_bytes().replace(b'"attempts":{}', b'"extra":1,"attempts":{}'),
        _full_state().to_bytes().replace(b'"health-check"', b'"dancing"'),
        # Shapes that used to escape as other exceptions (tracebacks in `status`):
        b"[" * 100_000 + b"]" * 100_000,
        AgentState().to_bytes().replace(b'"floor":null', b'"floor":' + b"9" * 5000),
        _full_state().to_bytes().replace(b'"time":1700000000.5', b'"time":Infinity'),
        _full_state().to_bytes().replace(b'"time":1700000000.5', b'"time":1e300'),
        _full_state().to_bytes().replace(b'"phase":"health-check"', b'"phase":["health-check"]'),
        _full_state().to_bytes().replace(b'"pending":{', b'"pending":{"pending":{},'),
        AgentState().to_bytes().replace(b'"attempts":{}', b'"attempts":[]'),
        AgentState().to_bytes().replace(b'"format":1', b'"format":1,"format":1'),
    ],
)
def test_corrupt_state_bytes_raise_state_error(data: bytes) -> None:
    with pytest.raises(StateError, match="state file is corrupt"):
        AgentState.from_bytes(data)


def test_attempt_records_are_bounded_dropping_the_oldest() -> None:
    state = AgentState()
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(MAX_ATTEMPT_RECORDS + 5)]
    for d in digests:
        state = state.with_attempt(d)
    state = state.with_attempt(digests[-1])
    assert len(state.attempts) == MAX_ATTEMPT_RECORDS
    assert digests[0] not in state.attempts
    assert state.attempts_for(digests[-1]) == 2


def test_fresh_store_loads_an_empty_state(tmp_path: Path) -> None:
    assert Store(tmp_path / "s").load() == AgentState()


def test_saved_state_loads_back_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.save(_full_state())
    assert store.load() == _full_state()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "staging",
        "state.json",
        "state.json.bak",
        "store",
    ]


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (needs root; the test is skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    with (directory / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)


def test_atomic_write_on_a_full_disk_keeps_the_old_content(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "fs", "256k") as fs:
        target = fs / "state.json"
        target.write_bytes(b"old")
        _fill(fs)
        with pytest.raises(OSError, match="No space"):
            atomic_write(target, b"new" * 100_000)
        assert target.read_bytes() == b"old"
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "state.json"]


def test_atomic_write_that_cannot_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.mkdir()
    (target / "keep").write_bytes(b"")
    with pytest.raises(IsADirectoryError):
        atomic_write(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_corrupt_state_file_is_an_error_naming_the_recovery_command(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.save(_full_state())
    store.state_path.write_bytes(b'{"format": 1, "current": ')
    with pytest.raises(StateError, match="recover-state"):
        store.load()


def test_missing_state_file_with_a_recovery_copy_is_an_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.save(_full_state())
    store.state_path.unlink()
    with pytest.raises(StateError, match="recover-state"):
        store.load()


def test_recover_restores_the_recovery_copy_with_its_floor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.save(_full_state())
    store.state_path.write_bytes(b"garbage")
    assert store.recover() == _full_state()
    assert store.load().floor == 7


def test_recover_without_any_copy_requires_an_explicit_floor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.state_path.write_bytes(b"garbage")
    store.backup_path.write_bytes(b"garbage")
    with pytest.raises(StateError, match="--floor"):
        store.recover()
    assert store.recover(floor=12) == AgentState(floor=12)
    assert store.load().floor == 12


def test_recover_never_lowers_the_floor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    store.save(_full_state())
    store.state_path.write_bytes(b"garbage")
    assert store.recover(floor=3).floor == 7


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with (
        store.lock(),
        pytest.raises(StateError, match="another edgeship-agent"),
        Store(tmp_path).lock(),
    ):
        pass
    with Store(tmp_path).lock():
        pass


def _extracted_version(store: Store) -> tuple[Path, str]:
    key = make_key()
    target = store.staging_path("extract")
    verified = verify_bundle(
        io.BytesIO(BundleParts(keys=(key,)).to_bytes()),
        make_policy(key),
        now=NOW,
        extract_to=target,
    )
    return target, verified.digest


def test_adopt_moves_a_verified_version_into_the_store_read_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    extracted, digest = _extracted_version(store)
    target = store.adopt(extracted, digest)
    assert target == tmp_path / "store" / digest
    assert not extracted.exists()
    assert store.has_version(digest)
    assert store.manifest(digest).name == "demo"
    assert stat.S_IMODE(target.stat().st_mode) == 0o555
    model = target / "model" / "model.onnx"
    assert stat.S_IMODE(model.stat().st_mode) == 0o444


def test_adopt_of_a_digest_already_stored_keeps_the_stored_copy(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    first, digest = _extracted_version(store)
    store.adopt(first, digest)
    inode = (tmp_path / "store" / digest).stat().st_ino
    second, _ = _extracted_version(store)
    store.adopt(second, digest)
    assert (tmp_path / "store" / digest).stat().st_ino == inode
    assert not second.exists()


def test_garbage_collection_keeps_only_the_named_versions_and_staging_files(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    store.init()
    extracted, digest = _extracted_version(store)
    store.adopt(extracted, digest)
    leftover, _ = _extracted_version(store)  # e.g. a crash between extract and adopt
    keep_file = tmp_path / "staging" / "bundle-1.partial"
    keep_file.write_bytes(b"x")
    (tmp_path / "store" / D1).mkdir()
    (tmp_path / "store" / D1 / "f").write_bytes(b"")
    os.chmod(tmp_path / "store" / D1, 0o555)

    removed = store.collect_garbage(frozenset({digest}), frozenset({keep_file}))

    assert removed == [D1]
    assert store.versions() == [digest]
    assert [p.name for p in (tmp_path / "staging").iterdir()] == ["bundle-1.partial"]
    assert not leftover.exists()


def test_version_dir_refuses_a_name_that_is_not_a_digest(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        Store(tmp_path).version_dir("../etc")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_unprivileged_agent_can_adopt_and_collect_read_only_versions() -> None:
    # Read-only directories must be made writable before they can be moved or deleted by
    # a non-root owner (root ignores the mode bits): check as user "nobody", in a
    # directory it can reach (pytest's tmp_path is private to root).
    with tempfile.TemporaryDirectory() as tmp:
        os.chown(tmp, 65534, 65534)
        _check_store_as_nobody(Path(tmp))


def _check_store_as_nobody(tmp_path: Path) -> None:
    key = make_key()
    data = BundleParts(keys=(key,)).to_bytes()
    policy = make_policy(key)
    # Import lazily loaded modules now: "nobody" may not read the interpreter's library.
    verify_bundle(io.BytesIO(data), policy, now=NOW)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            store = Store(tmp_path / "state")
            store.init()
            extracted = store.staging_path("extract")
            verified = verify_bundle(io.BytesIO(data), policy, now=NOW, extract_to=extracted)
            store.adopt(extracted, verified.digest)
            adopted = store.versions() == [verified.digest]
            leftover = store.staging_path("extract")
            verify_bundle(io.BytesIO(data), policy, now=NOW, extract_to=leftover)
            removed = store.collect_garbage(frozenset(), frozenset()) == [verified.digest]
            empty = not store.versions() and not list(store.staging_dir.iterdir())
            code = 0 if adopted and removed and empty else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
