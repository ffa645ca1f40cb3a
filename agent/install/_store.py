"""Where the agent touches the disk: installed versions and the one state file.

Layout of a state directory::

    state.json            the agent's state (AgentState), replaced atomically
    state.json.bak        the same bytes, written right after: the recovery copy
    lock                  flock'ed while one process changes the state
    store/<digest>/       one installed version per manifest digest, read-only
    staging/              downloads and extractions in progress, and versions being deleted

A version only ever appears under ``store/`` by an atomic rename of a directory that
:func:`agent.bundle.verify_bundle` has completely verified and extracted, so whatever is
in ``store/`` is whole. Deletion goes the other way: rename into ``staging/`` first, then
remove, so a crash never leaves a half-deleted version in ``store/``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast, get_args

from agent.bundle.manifest import MANIFEST_PATH, Manifest
from agent.errors import StateError
from agent.plumbing.files import atomic_write, fsync_dir
from agent.plumbing.strict import Doc, load_json

__all__ = [
    "PHASES",
    "STATE_FORMAT",
    "AgentState",
    "Failure",
    "Pending",
    "Phase",
    "Store",
    "absolute_source",
    "partial_path",
]

STATE_FORMAT = 1
# The phases an install passes through while it is pending. Terminal outcomes (committed,
# rolled-back, failed) clear `pending`; failures are kept in `last_failure`.
Phase = Literal[
    "downloading", "verifying", "staged", "health-check", "shadow", "split", "probation"
]
# The stages a candidate that passed its gate may be held in before it serves everyone.
STAGES: tuple[Phase, ...] = ("shadow", "split")
PHASES: tuple[Phase, ...] = get_args(Phase)
Outcome = Literal["failed", "rolled-back"]
MAX_ATTEMPT_RECORDS = 64  # attempt counters kept; the oldest are dropped first

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Pending:
    """An install in progress: what was asked for and how far it got."""

    phase: Phase
    source: str  # path or URL the bundle comes from
    sha256: str | None = None  # the bundle file's sha256, when the request named it
    digest: str | None = None  # the manifest digest, known once verified
    sequence: int | None = None  # the manifest's sequence, known once verified
    started: float = 0.0  # unix time the install began

    def to_json(self) -> dict[str, Any]:
        """As state.json and the reported state hold it (times: unix seconds, ms)."""
        return {
            "phase": self.phase,
            "source": self.source,
            "sha256": self.sha256,
            "digest": self.digest,
            "sequence": self.sequence,
            "started": round(self.started, 3),
        }


@dataclass(frozen=True)
class Failure:
    """Why the last install failed or was rolled back."""

    outcome: Outcome
    reason: str
    time: float  # unix time
    digest: str | None = None
    phase: Phase | None = None  # where it failed

    def to_json(self) -> dict[str, Any]:
        """As state.json and the reported state hold it (times: unix seconds, ms)."""
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "time": round(self.time, 3),
            "digest": self.digest,
            "phase": self.phase,
        }


@dataclass(frozen=True)
class AgentState:
    """Everything the agent must remember across restarts.

    ``current`` is the committed version (what serves after a restart); during probation
    the candidate serves but stays in ``pending`` until committed, so a crash falls back
    to ``current`` by construction. ``floor`` is the highest sequence ever committed (the
    anti-rollback floor) and ``floor_digest`` the version that set it: the only digest
    that may be installed again at that same sequence.
    """

    current: str | None = None
    previous: str | None = None
    pending: Pending | None = None
    floor: int | None = None
    floor_digest: str | None = None
    attempts: Mapping[str, int] = field(default_factory=dict)
    last_failure: Failure | None = None

    def attempts_for(self, digest: str) -> int:
        return self.attempts.get(digest, 0)

    def with_attempt(self, digest: str) -> AgentState:
        """One more recorded attempt for ``digest``; the oldest records beyond the cap go."""
        counts = {k: v for k, v in self.attempts.items() if k != digest}
        counts[digest] = self.attempts_for(digest) + 1
        while len(counts) > MAX_ATTEMPT_RECORDS:
            del counts[next(iter(counts))]
        return replace(self, attempts=counts)

    def keep(self) -> frozenset[str]:
        """Digests whose store directories must survive garbage collection."""
        kept = {self.current, self.previous}
        if self.pending is not None:
            kept.add(self.pending.digest)
        return frozenset(d for d in kept if d is not None)

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, one trailing newline."""
        doc: dict[str, Any] = {
            "format": STATE_FORMAT,
            "current": self.current,
            "previous": self.previous,
            "pending": None if self.pending is None else self.pending.to_json(),
            "floor": self.floor,
            "floor_digest": self.floor_digest,
            "attempts": dict(self.attempts),
            "last_failure": None if self.last_failure is None else self.last_failure.to_json(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentState:
        """Parse a state file.

        Raises:
            StateError: the bytes are not a valid state document.
        """
        try:
            return _parse_state(data)
        except ValueError as exc:
            raise StateError(f"state file is corrupt: {exc}") from None


# Times in the state are unix seconds a person may be shown: beyond year 9999 no clock
# reads them, and datetime cannot print them.
_MAX_TIME_S = 253402300799.0


def _digest(d: Doc, key: str) -> str | None:
    return d.opt(d.text, key, max_len=64, pattern=_DIGEST_RE, what="a sha256 digest")


def _time(d: Doc, key: str) -> float:
    value = d.number(key, minimum=0.0)
    if value > _MAX_TIME_S:
        raise d.bad(key, "a unix time before the year 10000")
    return value


def _phase(d: Doc, key: str) -> Phase:
    return cast(Phase, d.choice(key, PHASES))


def _parse_pending(p: Doc) -> Pending:
    pending = Pending(
        phase=_phase(p, "phase"),
        source=p.text("source"),
        sha256=_digest(p, "sha256"),
        digest=_digest(p, "digest"),
        sequence=p.opt(p.integer, "sequence", minimum=0),
        started=_time(p, "started"),
    )
    p.done()
    return pending


def _parse_failure(f: Doc) -> Failure:
    failure = Failure(
        outcome=cast(Outcome, f.choice("outcome", get_args(Outcome))),
        reason=f.text("reason", max_len=65536),
        time=_time(f, "time"),
        digest=_digest(f, "digest"),
        phase=f.opt(partial(_phase, f), "phase"),
    )
    f.done()
    return failure


def _parse_state(data: bytes) -> AgentState:
    """Raises: ValueError naming what is wrong (every shape, never another exception)."""
    d = Doc(load_json(data, what="the state file", error=ValueError), "state", error=ValueError)
    if d.integer("format") != STATE_FORMAT:
        raise d.bad("format", str(STATE_FORMAT))
    attempts = d.any_obj("attempts")
    for key, count in attempts.items():
        if not _DIGEST_RE.fullmatch(key) or isinstance(count, bool) or not isinstance(count, int):
            raise ValueError("state.attempts must map sha256 digests to counts")
        if count < 0:
            raise ValueError("state.attempts counts must be >= 0")
    state = AgentState(
        current=_digest(d, "current"),
        previous=_digest(d, "previous"),
        pending=None if d.raw("pending", None) is None else _parse_pending(d.obj("pending")),
        floor=d.opt(d.integer, "floor", minimum=0),
        floor_digest=_digest(d, "floor_digest"),
        attempts=dict(attempts),
        last_failure=(
            None if d.raw("last_failure", None) is None else _parse_failure(d.obj("last_failure"))
        ),
    )
    d.done()
    return state


def absolute_source(source: str) -> str:
    """A local path made absolute: the pending install is resumed from any directory."""
    if urllib.parse.urlsplit(source).scheme:
        return source
    return str(Path(source).expanduser().resolve())


def partial_path(dest: Path) -> Path:
    """Where a fetch to ``dest`` keeps its bytes until complete (kept across restarts)."""
    return dest.with_name(dest.name + ".partial")


def _make_writable(root: Path) -> None:
    # Versions are read-only (0o555 / 0o444); a non-root agent must restore write
    # permission on a directory before it can move or delete it.
    for dirpath, _dirnames, _filenames in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, stat.S_IRWXU)


class Store:
    """The state directory: the state file, installed versions and the staging area."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.state_path = self.root / "state.json"
        self.backup_path = self.root / "state.json.bak"
        self.versions_dir = self.root / "store"
        self.staging_dir = self.root / "staging"

    def init(self) -> None:
        """Create the directory layout if missing.

        Raises:
            StateError: the state directory cannot be created.
        """
        try:
            for d in (self.root, self.versions_dir, self.staging_dir):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.root}: {exc}") from None

    # --- the state file ----------------------------------------------------------------

    def load(self) -> AgentState:
        """The persisted state; a fresh state when none was ever written.

        Raises:
            StateError: the state file is corrupt or missing while its recovery copy exists;
                run ``edgeship-agent recover-state`` (which keeps the rollback floor).
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            if self.backup_path.exists():
                raise StateError(
                    f"{self.state_path} is missing but {self.backup_path.name} exists; run"
                    " `edgeship-agent recover-state` to restore it"
                ) from None
            return AgentState()
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc}") from None
        try:
            return AgentState.from_bytes(data)
        except StateError as exc:
            # Never start over silently: that would reset the anti-rollback floor.
            raise StateError(
                f"{self.state_path}: {exc}. Run `edgeship-agent recover-state --state-dir"
                f" {self.root}` to restore the recovery copy (the rollback floor is kept)"
            ) from None

    def save(self, state: AgentState) -> None:
        """Persist ``state`` atomically, then its recovery copy.

        Raises:
            StateError: the state could not be written (the old state is still in place).
        """
        data = state.to_bytes()
        try:
            atomic_write(self.state_path, data)
            atomic_write(self.backup_path, data)
        except OSError as exc:
            raise StateError(f"cannot write {self.state_path}: {exc}") from None

    def recover(self, *, floor: int | None = None) -> AgentState:
        """Restore a corrupt or missing state file.

        From the recovery copy when it parses; otherwise a fresh state that keeps no
        version current, with the anti-rollback floor the operator gives (required then,
        since the true floor is unknown and guessing low would reopen rollback attacks).

        Raises:
            StateError: both copies are unusable and no ``floor`` was given.
        """
        with contextlib.suppress(OSError, StateError):
            state = AgentState.from_bytes(self.backup_path.read_bytes())
            if floor is not None and (state.floor is None or floor > state.floor):
                state = replace(state, floor=floor, floor_digest=None)
            self.save(state)
            return state
        if floor is None:
            raise StateError(
                "both state.json and its recovery copy are unusable; give the anti-rollback"
                " floor explicitly (--floor N, the highest sequence this device ever"
                " committed; see your fleet records)"
            )
        state = AgentState(floor=floor)
        self.save(state)
        return state

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the state directory's lock: one process changes the state at a time.

        Raises:
            StateError: another process holds the lock.
        """
        self.init()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise StateError(
                    f"another edgeship-agent process is changing {self.root}; wait for it"
                ) from None
            yield
        finally:
            os.close(fd)

    def claim(self) -> int:
        """Take the directory for one long-running agent until the returned fd is closed.

        Separate from :meth:`lock`, which serialises each state change: the daemon holds
        this for its whole life, and one-shot commands may still change the state.

        Raises:
            StateError: another agent runs on this state directory.
        """
        self.init()
        fd = os.open(self.root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"another edgeship agent is running on {self.root}; stop it first"
            ) from None
        return fd

    # --- versions --------------------------------------------------------------------

    def version_dir(self, digest: str) -> Path:
        if not _DIGEST_RE.fullmatch(digest):
            raise StateError(f"{digest!r} is not a version digest")
        return self.versions_dir / digest

    def has_version(self, digest: str) -> bool:
        return (self.version_dir(digest) / MANIFEST_PATH).is_file()

    def manifest(self, digest: str) -> Manifest:
        """The manifest of an installed version.

        Raises:
            StateError: the version is not in the store or its manifest is unreadable.
        """
        try:
            return Manifest.from_bytes((self.version_dir(digest) / MANIFEST_PATH).read_bytes())
        except (OSError, ValueError) as exc:
            raise StateError(f"installed version {digest[:12]} is unreadable: {exc}") from None

    def versions(self) -> list[str]:
        """Digests present in the store, sorted."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if _DIGEST_RE.fullmatch(p.name))

    def staging_path(self, kind: str) -> Path:
        """A fresh, not yet existing path in the staging area."""
        return self.staging_dir / f"{kind}-{secrets.token_hex(8)}"

    def adopt(self, extracted: Path, digest: str) -> Path:
        """Move a verified, extracted version into the store (atomic rename).

        If the store already holds ``digest`` (it is content-addressed, so the content is
        the same) the extracted copy is discarded.

        Raises:
            StateError: the rename failed.
        """
        target = self.version_dir(digest)
        if target.exists():
            self.remove_tree(extracted)
            return target
        try:
            # Moving a directory to another parent updates its "..": it must be writable.
            os.chmod(extracted, stat.S_IRWXU)
            os.rename(extracted, target)
            os.chmod(target, 0o555)  # noqa: S103 - read-only, not secret
            fsync_dir(self.versions_dir)
            fsync_dir(self.staging_dir)
        except OSError as exc:
            raise StateError(f"cannot move version {digest[:12]} into the store: {exc}") from None
        return target

    def remove_tree(self, path: Path) -> None:
        """Delete a (possibly read-only) directory tree or file; missing is fine."""
        if path.is_dir() and not path.is_symlink():
            _make_writable(path)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def collect_garbage(self, keep: frozenset[str], keep_staging: frozenset[Path]) -> list[str]:
        """Remove versions not in ``keep`` and staging leftovers not in ``keep_staging``.

        Returns the digests removed.
        """
        removed = []
        for digest in self.versions():
            if digest in keep:
                continue
            # Out of the store first, in one rename, so no half-deleted version is visible.
            trash = self.staging_path("trash")
            try:
                os.chmod(self.versions_dir / digest, stat.S_IRWXU)
                os.rename(self.versions_dir / digest, trash)
            except OSError:
                continue
            removed.append(digest)
            self.remove_tree(trash)
        if self.staging_dir.is_dir():
            for entry in self.staging_dir.iterdir():
                if entry not in keep_staging:
                    self.remove_tree(entry)
        return removed
