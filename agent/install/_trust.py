"""The device's trust: its root and last heartbeat, persisted, updated over the air,
consulted before every install.

The I/O edge around :mod:`agent.bundle.trust`, which decides everything: this module
keeps the files (:mod:`agent.install._trust_files`), fetches missing roots from the
bundle server, keeps time, and reports (events, the ``trust`` part of the reported
state). The device starts from its bootstrap (agent.toml ``trust_policy``: a root, or a bare
policy standing for root 0) unless ``root.json`` holds a newer root. Roots and heartbeats
arrive on the MQTT network thread and are only queued there (:meth:`TrustKeeper.offer_root`);
the install worker applies them (:meth:`TrustKeeper.process`) before it decides anything,
so a root received before a desired state is in force when that desired state is handled.
Nothing offered changes anything unless it verifies against the current root.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle.manifest import format_time
from agent.bundle.root import MAX_ROOT_BYTES, TrustRoot, load_trust, peek_version
from agent.bundle.signing import TrustPolicy
from agent.errors import (
    ConfigError,
    DownloadError,
    HeartbeatError,
    HeldBackError,
    RootError,
    RootExpiredError,
    RootVersionError,
)
from agent.install._config import FetchConfig, TrustConfig
from agent.install._trust_files import TrustFiles
from agent.plumbing.backoff import Backoff

if TYPE_CHECKING:
    from agent.bundle.heartbeat import Heartbeat
    from agent.install._fetch import Fetcher

__all__ = ["TrustKeeper"]

log = logging.getLogger("edgeship.agent")

Emit = Callable[[str, Mapping[str, Any]], None]


@dataclass
class _Inbox:
    """What arrived and waits for the worker: only the latest of each matters."""

    root: bytes | None = None
    heartbeat: bytes | None = None
    retry_root: bytes | None = None  # a root whose chain could not be fetched yet
    retry_at: float | None = None  # monotonic


class TrustKeeper:
    """The trust of one device (or one CLI command): root, heartbeat, what they allow.

    ``follow``: this device follows the fleet's desired state (the daemon), so a root
    naming a freshness key requires a fresh heartbeat before an install; a person at the
    device (``edgeship-agent install``) chooses the bundle and needs none.

    Raises (constructor):
        ConfigError: the bootstrap file is unusable or for another fleet.
    """

    def __init__(
        self,
        state_dir: Path,
        bootstrap: Path,
        *,
        fleet: str | None = None,
        config: TrustConfig | None = None,
        fetch: FetchConfig | None = None,
        slack_s: float = 300.0,
        follow: bool = True,
        fetcher: Callable[[], Fetcher] | None = None,
        events: Emit | None = None,
        changed: Callable[[], None] | None = None,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.files = TrustFiles(state_dir)
        self.fleet = fleet
        self.config = config or TrustConfig()
        self._fetch_config = replace(
            fetch or FetchConfig(), max_bundle_bytes=MAX_ROOT_BYTES, max_resumes=1, min_free_bytes=0
        )
        self.slack_s = slack_s
        self.follow = follow
        self._fetcher = fetcher
        self._events = events
        self._changed = changed
        self._clock = wall_clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.RLock()
        self._inbox = _Inbox()
        self._retry = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        self._stale: str | None = None  # why the desired state is stale, if it is
        self._reported: dict[str, str | None] = {}  # last reason per event kind: no repeats
        self.generation = 0  # counts changes: each model's follower notices every one
        self._expired_keys: frozenset[str] = frozenset()
        # Right after a start the retained heartbeat is on its way: no alarm before it can
        # have arrived (installs wait for it all the same).
        self._quiet_until = time.monotonic() + self.config.startup_grace_s
        self._root = self._start_root(bootstrap)
        self._heartbeat = self.files.heartbeat()

    # --- what the device holds ---------------------------------------------------------

    @property
    def root(self) -> TrustRoot:
        with self._lock:
            return self._root

    @property
    def heartbeat(self) -> Heartbeat | None:
        with self._lock:
            return self._heartbeat

    def _start_root(self, bootstrap: Path) -> TrustRoot:
        """The bootstrap, unless the device persisted a newer root (a root of the same
        version but other content loses to the file an operator placed)."""
        boot = self._check_fleet(load_trust(bootstrap), f"trust file {bootstrap}")
        kept = self.files.root()
        if kept is not None and self.fleet is not None and kept.fleet not in (None, self.fleet):
            log.warning("ignoring the persisted trust root: it is for fleet %r", kept.fleet)
            kept = None
        if kept is not None and (kept.version > boot.version or kept == boot):
            return kept
        if boot.version > 0:
            self.files.save_root(boot)
        return boot

    def _check_fleet(self, root: TrustRoot, what: str) -> TrustRoot:
        if self.fleet is not None and root.fleet not in (None, self.fleet):
            raise ConfigError(
                f"{what} is a trust root for fleet {root.fleet!r}, not {self.fleet!r}"
            )
        return root

    def reload(self, bootstrap: Path) -> None:
        """Re-read the bootstrap file; a newer root there replaces the current one.

        Raises:
            ConfigError: the file is unusable (the current root stays).
        """
        boot = self._check_fleet(load_trust(bootstrap), f"trust file {bootstrap}")
        with self._lock:
            if boot.version > self._root.version or (boot.version == 0 == self._root.version):
                self._root = boot
                if boot.version > 0:
                    self.files.save_root(boot)

    # --- arrivals (any thread) -----------------------------------------------------------

    def offer_root(self, payload: bytes) -> None:
        """Queue a root received over MQTT; :meth:`process` applies it. Never raises."""
        if payload:
            with self._lock:
                self._inbox.root = payload

    def offer_heartbeat(self, payload: bytes) -> None:
        """Queue a heartbeat received over MQTT; :meth:`process` applies it. Never raises."""
        if payload:
            with self._lock:
                self._inbox.heartbeat = payload

    def wait_s(self) -> float | None:
        """Seconds until the worker should call :meth:`process` (0: now; None: only when
        something is offered)."""
        now = self._clock()
        with self._lock:
            if self._inbox.root is not None or self._inbox.heartbeat is not None:
                return 0.0
            due = [d for t in self._deadlines() if (d := self._deadline(t, now)) is not None]
            if self._inbox.retry_at is not None:  # cleared once retried
                due.append(max(0.0, self._inbox.retry_at - time.monotonic()))
            if (quiet := self._quiet_until - time.monotonic()) > 0:
                due.append(quiet)
        return min(due, default=None)

    def _deadlines(self) -> list[datetime]:
        """Times at which what the device may do changes by itself: expiries."""
        root, beat = self._root, self._heartbeat
        times = [k.expires for k in root.keys.values() if k.expires is not None]
        if root.expires is not None:
            times.append(root.expires)
        if beat is not None and root.freshness is not None:
            times.append(beat.expires)
        return times

    def _deadline(self, t: datetime, now: datetime) -> float | None:
        """Seconds until ``t`` plus the clock slack; None once passed (it was noted then)."""
        left = (t + timedelta(seconds=self.slack_s) - now).total_seconds()
        return left if left > 0 else None

    # --- the worker ------------------------------------------------------------------------

    def process(self) -> bool:
        """Apply what arrived, catch up on roots a heartbeat names, note what the clock
        changed. Returns True when the root, the heartbeat or the set of expired keys
        changed. Never raises for bad input: a refused document is reported and changes
        nothing."""
        with self._lock:
            root_data, beat_data = self._inbox.root, self._inbox.heartbeat
            self._inbox.root = self._inbox.heartbeat = None
            retry = None
            if self._inbox.retry_at is not None and time.monotonic() >= self._inbox.retry_at:
                retry, self._inbox.retry_root = self._inbox.retry_root, None
                self._inbox.retry_at = None
        changed = False
        for data in (retry, root_data):
            if data is not None:
                changed |= self._take_root(data)
        if beat_data is not None:
            changed |= self._take_heartbeat(beat_data)
        beat = self.heartbeat
        if beat is not None and beat.root_version > self.root.version:
            changed |= self._catch_up(beat.root_version)
        changed |= self._note_clock()
        if changed:
            self.generation += 1
            self._notify()
        return changed

    def apply_root(self, data: bytes) -> TrustRoot:
        """Verify root N+1, given by hand, and make it the device's root.

        Raises:
            RootError: it does not verify against the current root (nothing changes).
        """
        self._accept(self._verified(data))
        return self.root

    def _take_root(self, data: bytes) -> bool:
        if data == self.root.envelope:
            return False  # the retained root again, on every reconnect
        try:
            self._accept(self._verified(data))
        except RootVersionError as exc:
            claimed = peek_version(data)
            if claimed is None or claimed <= self.root.version:
                self._report("root-refused", str(exc), version=claimed)
                return False
            return self._catch_up(claimed, last=data)
        except RootError as exc:
            self._report("root-refused", str(exc), version=peek_version(data))
            return False
        return True

    def _catch_up(self, target: int, last: bytes | None = None) -> bool:
        """Fetch roots N+1..target (the last one may be in hand) and walk them in order."""
        start = self.root.version
        try:
            for version in range(start + 1, target + 1):
                data = last if version == target and last is not None else self._fetch(version)
                self._accept(self._verified(data))
        except (RootError, DownloadError) as exc:
            retry = isinstance(exc, DownloadError) and last is not None and self.config.server_url
            reason = f"cannot reach trust root v{target} from v{self.root.version}: {exc}"
            self._report(
                "root-refused", reason + ("; retrying later" if retry else ""), version=target
            )
            if retry:
                with self._lock:
                    self._inbox.retry_root = last
                    self._inbox.retry_at = time.monotonic() + self._retry.next()
        else:
            self._retry.reset()
        return self.root.version > start

    def _fetch(self, version: int) -> bytes:
        """Root ``version`` from the bundle server.

        Raises:
            DownloadError: no server configured, or the download failed.
        """
        base = self.config.server_url
        if base is None or self._fetcher is None:
            raise DownloadError(
                f"root v{version} is missing and no bundle server is configured to fetch it"
                " from (agent.toml [trust] server_url)"
            )
        url = f"{base.rstrip('/')}/root/{version}.json"
        return self.files.fetch(self._fetcher(), url, version, self._fetch_config)

    def _verified(self, data: bytes) -> TrustRoot:
        """Root N+1 verified against the current root.

        The rules (:mod:`agent.bundle.trust`) are imported when first needed: an idle
        agent whose root names no freshness key never needs them (bench/footprint.py).

        Raises:
            RootError: as :func:`agent.bundle.trust.verify_root`.
        """
        from agent.bundle.trust import verify_root  # noqa: PLC0415

        return verify_root(data, self.root, fleet=self.fleet)

    def _freshness(self, root: TrustRoot, beat: Heartbeat | None, now: datetime) -> str | None:
        """Why updates may be withheld (None: fresh, or the root names no freshness key)."""
        if root.freshness is None:
            return None
        from agent.bundle.trust import freshness_problem  # noqa: PLC0415 - see _verified

        return freshness_problem(root, beat, now=now, slack_s=self.slack_s)

    def _accept(self, new: TrustRoot) -> None:
        with self._lock:
            old = self._root
            self.files.save_root(new)
            self._root = new
            if _online_keys(new) != _online_keys(old):
                # TUF 5.3.11: new online keys start a new heartbeat history.
                self._heartbeat = None
                self.files.forget_heartbeat()
        log.info("trust root updated", extra={"fields": {"version": new.version}})
        self._emit(
            "root-updated",
            version=new.version,
            previous=old.version,
            expires=None if new.expires is None else format_time(new.expires),
        )

    def _take_heartbeat(self, data: bytes) -> bool:
        now = self._clock()
        with self._lock:
            root, last = self._root, self._heartbeat
        if last is not None and data == last.envelope:
            return False
        try:
            from agent.bundle.trust import verify_heartbeat  # noqa: PLC0415 - see _verified

            beat = verify_heartbeat(
                data, root, fleet=self.fleet or "", now=now, last=last, slack_s=self.slack_s
            )
        except HeartbeatError as exc:
            self._report("heartbeat-refused", str(exc))
            return False
        self.files.save_heartbeat(data)
        with self._lock:
            self._heartbeat = beat
        self._reported.pop("heartbeat-refused", None)
        return True

    def _note_clock(self) -> bool:
        """Events for what the clock changed: the root expired, the heartbeat went stale.
        True when a key expired since the last look (what serves may be unvouched now)."""
        now = self._clock()
        root = self.root
        try:  # the root, or every bundle key in it, expired: say so once
            root.bundle_policy(now, self.slack_s)
        except RootExpiredError as exc:
            self._report("root-expired", str(exc), version=root.version)
        if self.follow and time.monotonic() >= self._quiet_until:
            problem = self._freshness(root, self.heartbeat, now)
            if problem is not None:
                self._report("held-back", problem)
            elif self._stale is None and self._reported.get("held-back") is not None:
                self._reported["held-back"] = None
                self._notify()
        expired = frozenset(k for k, key in root.keys.items() if key.expired(now, self.slack_s))
        changed, self._expired_keys = expired != self._expired_keys, expired
        return changed

    # --- decisions for the updater and the follower ------------------------------------

    def install_policy(self, now: datetime) -> TrustPolicy:
        """What a bundle must satisfy now (the updater's policy); applies arrivals first.

        Raises:
            RootExpiredError: the root, or every bundle key in it, has expired.
            HeldBackError: following the fleet, with no fresh heartbeat the root requires.
        """
        if self.follow:
            self.process()
        from agent.bundle.trust import install_policy  # noqa: PLC0415 - see _verified

        return install_policy(
            self.root, self.heartbeat, now=now, slack_s=self.slack_s, require_fresh=self.follow
        )

    def check_desired(self, name: str, sequence: int, digest: str) -> None:
        """Should the desired bundle be fetched? Reports a stale one (``held-back``).

        Raises:
            RootExpiredError, HeldBackError: not now (the desired state stays; it is tried
                again when the trust changes).
            RollbackError: below the signed floor: never.
        """
        from agent.bundle.trust import check_desired  # noqa: PLC0415 - see _verified

        now = self._clock()
        try:
            check_desired(
                self.root,
                self.heartbeat,
                name=name,
                sequence=sequence,
                now=now,
                slack_s=self.slack_s,
            )
        except HeldBackError as exc:
            with self._lock:
                self._stale = str(exc)
            self._report("held-back", str(exc), digest=digest, sequence=sequence)
            raise
        except RootExpiredError as exc:
            self._report("root-expired", str(exc), version=self.root.version)
            raise
        self.clear_desired()

    def clear_desired(self) -> None:
        """The desired state is not stale (any more, or there is none)."""
        with self._lock:
            was, self._stale = self._stale, None
        if was is not None:
            self._reported["held-back"] = None
            self._notify()

    # --- reporting -----------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The ``trust`` part of the reported state (docs/mqtt.md, "state")."""
        now = self._clock()
        with self._lock:
            root, beat, stale = self._root, self._heartbeat, self._stale
        held = stale
        if self.follow and held is None:
            held = self._freshness(root, beat, now)
        return {
            "root_version": root.version,
            "root_expires": None if root.expires is None else format_time(root.expires),
            "root_expired": root.expired(now, self.slack_s),
            "heartbeat_expires": None if beat is None else format_time(beat.expires),
            "held_back": held,
            # Each model's own: what it serves, when the root no longer vouches for it
            # (agent.install._vouch).
            "unvouched": None,
        }

    def now(self) -> datetime:
        """The keeper's wall clock (UTC)."""
        return self._clock()

    def _report(self, kind: str, reason: str, **fields: Any) -> bool:
        """Emit ``kind`` unless its last report said the same; True when emitted."""
        if self._reported.get(kind) == reason:
            return False
        self._reported[kind] = reason
        log.warning("%s: %s", kind, reason)
        self._emit(kind, reason=reason, **fields)
        self._notify()
        return True

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._events is not None:
            self._events(kind, fields)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed()


def _online_keys(root: TrustRoot) -> tuple[str, ...]:
    return () if root.freshness is None else root.freshness.keyids
