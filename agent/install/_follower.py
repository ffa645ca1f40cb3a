"""Following the desired state: one background worker installs what the fleet asks for.

Desired state arrives untrusted (the updater's signature check is the trust; the message
only says what to fetch). Installs run in ONE worker thread, never on the transport's
network thread. Messages are coalesced: only the latest desired state matters. A bundle
that failed for good is not tried again for the same desired message (a re-publish with
a new ``ts`` is an explicit retry, still bounded by the updater's loop budget); a failed
download is retried later, after a jittered delay whose ceiling doubles from
``fetch.retry_initial_s`` up to ``fetch.retry_max_s`` (a
:class:`~agent.plumbing.backoff.Backoff`), so devices that failed together do not come
back to the server together. After an install the worker watches the candidate's
probation, which commits it or rolls it back.

With a :class:`~agent.install._trust.TrustKeeper`, the same worker applies trust roots and
heartbeats as they arrive, before it handles the desired state, and asks the keeper first
whether the desired bundle may be fetched at all: a desired state refused for the trust
(an expired root, updates being withheld) is not given up but handled again as soon as
the trust changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import BundleError, EdgeshipError, FetchError, StateError, TrustError
from agent.install._decisions import check_acceptance
from agent.install._trust import TrustKeeper
from agent.install._updater import Updater
from agent.install._vouch import VouchCheck
from agent.messages.desired import Desired
from agent.plumbing.backoff import Backoff

__all__ = ["DesiredFollower"]

log = logging.getLogger("edgeship.agent")

# Desired messages remembered as given up; only recent ones matter.
_MAX_GIVEN_UP = 64


class DesiredFollower:
    """Installs the latest desired bundle in a worker thread and watches its probation.

    ``emit`` receives the follower's own events (``desired-refused``); ``changed`` is
    called after the desired state changed or an install was refused, so the owner can
    publish its reported state. ``trust``: the device's trust keeper, if it has one.
    """

    def __init__(
        self,
        updater: Updater,
        *,
        emit: Callable[[str, Mapping[str, Any]], None],
        changed: Callable[[], None],
        trust: TrustKeeper | None = None,
    ) -> None:
        self.updater = updater
        self.trust = trust
        self._emit = emit
        self._changed = changed
        fetch = updater.config.fetch
        # Never sooner than half the initial delay: a server that just failed gets a rest.
        self._retry = Backoff(
            fetch.retry_initial_s, fetch.retry_max_s, min_s=fetch.retry_initial_s / 2
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._desired: Desired | None = None
        self._generation = 0
        self._given_up: dict[Desired, None] = {}  # insertion-ordered: oldest first
        self._retry_at: float | None = None
        self._held = False  # the latest desired waits for the trust to change
        self._worker: threading.Thread | None = None
        self._trust_generation = 0 if trust is None else trust.generation
        # Does the root still vouch for what serves? (checked in this worker)
        self.vouch = (
            None if trust is None else VouchCheck(trust, updater, emit=emit, changed=changed)
        )

    @property
    def desired(self) -> Desired | None:
        with self._lock:
            return self._desired

    def apply(self, desired: Desired | None) -> bool:
        """Ask for ``desired`` (None clears it); False if it is what was already asked."""
        with self._wake:
            if desired == self._desired:
                return False  # a retained message delivered again on reconnect
            self._desired = desired
            self._generation += 1
            self._retry_at = None
            self._retry.reset()
            self._wake.notify_all()
        return True

    def wake(self) -> None:
        """Something arrived for the trust keeper: let the worker apply it."""
        with self._wake:
            self._wake.notify_all()

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="edgeship-updater", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float) -> None:
        """Stop the worker; an install in progress is safe to abandon (its phase is persisted)."""
        with self._wake:
            self._stop.set()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s)

    def _work(self) -> None:
        handled = -1
        while not self._stop.is_set():
            self._watch_probation()
            if self._trust_changed() and self._held:
                handled = -1  # the desired state waited for the trust: handle it again
            with self._wake:
                due = self._retry_at is not None and time.monotonic() >= self._retry_at
                if self._generation == handled and not due:
                    # Woken by a new desired state, a due retry, or the trust keeper
                    # (something arrived, or an expiry passed): the loop sorts out which.
                    self._wake.wait(self._wait_s())
                    continue
                handled = self._generation
                desired = self._desired
                self._retry_at = None
            if desired is None and self.trust is not None:
                self.trust.clear_desired()
            if desired is not None:
                try:
                    self._install(desired)
                except Exception:
                    # The worker must survive anything; the next desired deserves a try.
                    log.exception("install of %s failed unexpectedly", desired.digest[:12])
                    self._give_up(desired)

    def _wait_s(self) -> float | None:
        """Until the download retry or the trust keeper's next deadline (None: until woken)."""
        waits = [] if self._retry_at is None else [max(0.0, self._retry_at - time.monotonic())]
        trust = None if self.trust is None else self.trust.wait_s()
        return min([*waits, trust] if trust is not None else waits, default=None)

    def _trust_changed(self) -> bool:
        """Apply what the trust keeper received; True when its root or heartbeat changed.

        Never with the wake lock held: a root may need its chain fetched, and the network
        thread must never wait for that. A root that no longer vouches for what serves
        may roll it back here, between installs.
        """
        if self.trust is None:
            return False
        try:
            changed = self.trust.process()
            if self.vouch is not None:
                self.vouch.check()
        except EdgeshipError as exc:
            log.error("applying the trust root failed: %s", exc)  # noqa: TRY400 - expected; no traceback
            return False
        # Another model's worker may have applied the change: it concerns this one too.
        generation = self.trust.generation
        changed = changed or generation != self._trust_generation
        self._trust_generation = generation
        return changed

    def _give_up(self, desired: Desired) -> None:
        with self._lock:
            self._given_up[desired] = None
            while len(self._given_up) > _MAX_GIVEN_UP:
                del self._given_up[next(iter(self._given_up))]

    def _install(self, desired: Desired) -> None:
        with self._lock:
            if desired in self._given_up:
                return
        self._held = False
        if self.trust is not None:
            try:
                self.trust.check_desired(desired.bundle.name, desired.sequence, desired.digest)
            except TrustError as exc:
                self._hold(exc)
                return
            except EdgeshipError as exc:  # below the signed floor: never
                self._refuse(
                    desired, exc, event="desired-refused", message="desired bundle not installed"
                )
                return
        state = self.updater.status()
        if desired.digest == state.current and state.pending is None:
            return
        try:
            # The sequence is untrusted here; this only saves a pointless download.
            check_acceptance(
                state,
                sequence=desired.sequence,
                digest=desired.digest,
                max_attempts=self.updater.config.update.max_attempts,
            )
        except EdgeshipError as exc:
            self._refuse(
                desired, exc, event="desired-refused", message="desired bundle not installed"
            )
            return
        log.info(
            "installing the desired bundle",
            extra={"fields": {"digest": desired.digest, "url": desired.url}},
        )
        try:
            result = self.updater.install(desired.url, sha256=desired.sha256)
        except FetchError as exc:
            self._retry_later(desired, exc)
            return
        except TrustError as exc:  # the trust changed during the download
            self._hold(exc)
            return
        except (BundleError, StateError) as exc:
            self._refuse(desired, exc, event=None, message="install refused")
            return
        with self._lock:
            self._retry.reset()
        if result.digest != desired.digest:
            log.warning(
                "the installed bundle is not the one the desired state named",
                extra={"fields": {"desired": desired.digest, "installed": result.digest}},
            )

    def _hold(self, exc: TrustError) -> None:
        """Not given up: handled again as soon as the trust changes."""
        log.warning("desired bundle held", extra={"fields": {"reason": str(exc)}})
        self._held = True
        self._changed()

    def _refuse(
        self, desired: Desired, exc: EdgeshipError, *, event: str | None, message: str
    ) -> None:
        log.warning(message, extra={"fields": {"digest": desired.digest, "reason": str(exc)}})
        if event is not None:
            self._emit(event, {"digest": desired.digest, "reason": str(exc)})
        self._give_up(desired)
        self._changed()

    def _retry_later(self, desired: Desired, exc: FetchError) -> None:
        with self._wake:
            delay = self._retry.next()
            if self._desired == desired:
                self._retry_at = time.monotonic() + delay
        log.warning(
            "download failed; retrying later",
            extra={
                "fields": {"digest": desired.digest, "retry_s": round(delay, 3), "reason": str(exc)}
            },
        )

    def _watch_probation(self) -> None:
        if self.updater.slot is None or self.updater.slot.monitor() is None:
            return
        try:
            self.updater.watch_probation(self._stop)
        except EdgeshipError as exc:
            log.error("probation could not be decided: %s", exc)  # noqa: TRY400 - expected; no traceback
