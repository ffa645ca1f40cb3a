"""The install state machine: fetch, verify, stage, health-check, activate, probation, commit.

::

    idle -> downloading -> verifying -> staged -> health-check -> probation -> committed
                 |              |          |            |              |
                 +--------------+----------+------------+--> failed    +--> rolled-back

Every transition is persisted in ``state.json`` *before* the side effect it announces,
and every step can run again after a crash: downloads resume, verification starts over
from the downloaded file, a version already in the store is adopted as is, the health
gate runs again (counted against the loop budget). :meth:`Updater.resume` continues an
interrupted install or, from probation, rolls back: ``current`` only ever names a
committed, verified version, so after any crash the agent serves one.

The decisions themselves are pure functions of the state
(:mod:`agent.install._decisions`); the :class:`Updater` around them does the I/O. Crash
tests stop the process at named points through the one fault seam,
:mod:`agent.install.faults`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent.bundle import DeviceInfo, Limits, verify_bundle
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.errors import BundleError, DownloadError, DownloadRefusedError, EdgeshipError, StateError
from agent.install import faults
from agent.install._config import UpdaterConfig
from agent.install._decisions import check_acceptance, commit_state, resume_action, rollback_state
from agent.install._health import HealthReport
from agent.install._loading import ModelLoader, ModelLoading
from agent.install._policy import PolicySource, policy_at
from agent.install._store import (
    STAGES,
    AgentState,
    Failure,
    Pending,
    Phase,
    Store,
    absolute_source,
    partial_path,
)
from agent.serve._slot import ModelSlot, ProbationMonitor, ProbationVerdict, ServingModel
from agent.serve.runtimes import installed_runtimes

if TYPE_CHECKING:
    from agent.install._fetch import Fetcher

__all__ = ["EventSink", "InstallResult", "Updater"]


_log = logging.getLogger("edgeship.agent")


class EventSink(Protocol):
    """Receives lifecycle events (the daemon connects telemetry here)."""

    def __call__(self, kind: str, fields: Mapping[str, Any], /) -> None: ...


@dataclass(frozen=True)
class InstallResult:
    digest: str
    name: str
    version: str
    sequence: int
    outcome: Literal["probation", "already-current", "shadow", "split"]
    health: HealthReport | None = None


class Updater:
    """Runs installs against one state directory; serves through ``slot`` when given.

    ``policy`` may be None for an updater that only reports, commits or rolls back.
    """

    def __init__(
        self,
        state_dir: Path,
        policy: TrustPolicy | PolicySource | None,
        *,
        config: UpdaterConfig | None = None,
        device: DeviceInfo | None = None,
        fetcher: Fetcher | None = None,
        loader: ModelLoader | None = None,
        slot: ModelSlot | None = None,
        events: EventSink | None = None,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = Store(state_dir)
        self.policy = policy
        self.config = config or UpdaterConfig()
        self._limits = Limits(
            max_bundle_bytes=self.config.fetch.max_bundle_bytes,
            clock_slack_s=self.config.update.clock_slack_s,
        )
        self._device = device
        self._fetcher = fetcher
        self.models = ModelLoading(
            self.config, lambda: self.device, loader, self.store.root / "providers.json", events
        )
        self.key = self.models.key
        self.slot = slot
        self._events = events
        self._wall_clock = wall_clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.RLock()  # one state change at a time within this process

    @property
    def fetcher(self) -> Fetcher:
        """The transport for bundle sources; by default HTTP(S) with ``fetch.tls``."""
        if self._fetcher is None:
            from agent.install._fetch import UrlFetcher  # noqa: PLC0415 - HTTP and TLS when used

            self._fetcher = UrlFetcher.from_tls(self.config.fetch.tls, setting="fetch")
        return self._fetcher

    @property
    def device(self) -> DeviceInfo:
        if self._device is None:
            self._device = DeviceInfo(runtimes=installed_runtimes())
        return self._device

    # --- public operations -----------------------------------------------------------

    def status(self) -> AgentState:
        """The persisted state. Raises: StateError if the state file is corrupt."""
        return self.store.load()

    def install(self, source: str, *, sha256: str | None = None) -> InstallResult:
        """Fetch, verify, stage and health-check a bundle, then activate it in probation.

        With a slot, the candidate serves from here on while probation watches it
        (:meth:`check_probation`); without one the caller decides (:meth:`commit`).
        An interrupted install of the same source continues where it stopped.

        Raises:
            DownloadError: the bundle could not be fetched (the install stays pending and
                resumes on the next attempt).
            BundleError: the bundle is refused (verification, rollback floor, health).
            StateError: a version is in probation, or the loop budget is used up.
        """
        source = absolute_source(source)
        with self._lock, self.store.lock():
            self.store.init()
            state = self.store.load()
            p = state.pending
            if p is not None and p.phase == "probation":
                raise StateError(
                    f"version {(p.digest or '')[:12]} is in probation; wait for it to be"
                    " committed or roll it back first"
                )
            if p is None or (p.source, p.sha256) != (source, sha256):
                if p is not None:
                    state = self._fail(state, "superseded by a new install request")
                self.store.collect_garbage(state.keep(), frozenset())
                pending = Pending("downloading", source, sha256, started=time.time())
                state = self._save(replace(state, pending=pending))
                self._emit("install-started", source=source)
            return self._run(state)

    def resume(self) -> InstallResult | None:
        """On start: continue an interrupted install, or roll back a candidate in probation.

        Raises:
            EdgeshipError: as :meth:`install` for the continued install.
        """
        with self._lock, self.store.lock():
            self.store.init()
            state = self.store.load()
            action = resume_action(state)
            if action == "nothing":
                self.store.collect_garbage(state.keep(), frozenset())
                return None
            if action == "roll-back":
                self._rollback(state, "the agent restarted during probation")
                return None
            return self._run(state)

    def commit(self) -> AgentState:
        """Commit the candidate in probation: it becomes current, the floor rises.

        Raises:
            StateError: nothing is in probation.
        """
        with self._lock, self.store.lock():
            state = self.store.load()
            new = self._save(commit_state(state), crash_point="committed")
            if self.slot is not None:
                self.slot.end_probation()
            self._collect(new)
            sequence = None if state.pending is None else state.pending.sequence
            self._emit("committed", digest=new.current, sequence=sequence)
            return new

    def rollback(self, reason: str = "rolled back by hand") -> AgentState:
        """Roll back at once: drop the candidate in probation, or return to ``previous``.

        Raises:
            StateError: there is nothing to roll back to.
        """
        with self._lock, self.store.lock():
            return self._rollback(self.store.load(), reason)

    def start_serving(self) -> str | None:
        """Load the current version into an empty slot (on start, after :meth:`resume`).

        A slot already serving (a candidate that :meth:`resume` activated) is left alone.
        Returns the digest being served, if any.

        Raises:
            StateError: the current version cannot be loaded.
        """
        with self._lock:
            if self.slot is None or self.slot.digest is not None:
                return None if self.slot is None else self.slot.digest
            current = self.store.load().current
            self._serve(current)
            return current

    def check_probation(self) -> ProbationVerdict | None:
        """Judge the candidate in probation; commit or roll back when decided.

        Returns the verdict, or None when nothing is in probation here.
        """
        with self._lock:
            monitor = None if self.slot is None else self.slot.monitor()
            if monitor is None:
                return None
            verdict = monitor.verdict()
            if verdict.state == "passed":
                self.commit()
            elif verdict.state == "breached":
                self.rollback(f"probation breached: {verdict.reason}")
            return verdict

    def watch_probation(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        """Check probation until it is decided or ``stop`` is set (a daemon thread's loop)."""
        while not stop.is_set():
            verdict = self.check_probation()
            if verdict is None or verdict.state != "watching":
                return
            stop.wait(poll_seconds)

    # --- the steps ---------------------------------------------------------------------

    def _run(self, state: AgentState) -> InstallResult:
        """The pending install's remaining steps.

        A candidate must never stop the agent from serving what it runs: an unforeseen
        failure (a bug, a runtime raising what it should not) abandons the install and
        records why, so that the next start does not meet it again, every time.
        """
        try:
            return self._steps(state)
        except EdgeshipError:
            raise
        except Exception as exc:
            _log.exception("the install failed unexpectedly; abandoning it")
            reason = f"internal error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(EdgeshipError, OSError):
                self._fail(self.store.load(), reason)
            raise StateError(
                f"the install was abandoned after an internal error ({reason}); the current"
                " version keeps serving"
            ) from exc

    def _steps(self, state: AgentState) -> InstallResult:
        while True:
            p = state.pending
            if p is None:  # pragma: no cover - every step ends in a phase or raises
                raise StateError("install ended without a result")
            if p.phase == "downloading":
                state = self._download(state, p)
            elif p.phase == "verifying":
                state, done = self._verify(state, p)
                if done is not None:
                    return done
            elif p.phase in ("staged", "health-check", *STAGES):
                return self._health_and_activate(state, p)
            else:
                raise StateError(f"cannot continue an install in phase {p.phase}")

    def _bundle_path(self, p: Pending) -> Path:
        key = hashlib.sha256(f"{p.source}\0{p.sha256 or ''}".encode()).hexdigest()[:16]
        return self.store.staging_dir / f"bundle-{key}"

    def _download(self, state: AgentState, p: Pending) -> AgentState:
        dest = self._bundle_path(p)
        if not dest.exists():  # a crash after the download completed: use what we have
            try:
                self.fetcher.fetch(p.source, dest, sha256=p.sha256, config=self.config.fetch)
            except DownloadError as exc:
                # Keep the install pending: the partial file stays and the next try resumes.
                failure = Failure("failed", str(exc), time.time(), phase="downloading")
                self._save(replace(state, last_failure=failure), crash_point=None)
                # The digest is not known yet: sha256 names the bundle for the fleet.
                self._emit(
                    "download-failed",
                    source=p.source,
                    sha256=p.sha256,
                    permanent=isinstance(exc, DownloadRefusedError),
                    reason=str(exc),
                )
                raise
        faults.crash_point("downloaded")
        self._emit("downloaded", source=p.source)
        return self._save(replace(state, pending=replace(p, phase="verifying")))

    def _verify(self, state: AgentState, p: Pending) -> tuple[AgentState, InstallResult | None]:
        bundle = self._bundle_path(p)
        if not bundle.exists():  # the file went missing: fetch it again
            return self._save(replace(state, pending=replace(p, phase="downloading"))), None
        now = self._wall_clock()  # a trust root may refuse now: TrustError, still pending
        policy = policy_at(self.policy, now)
        extract = self.store.staging_path("extract")
        try:
            with bundle.open("rb") as f:
                verified = verify_bundle(
                    f,
                    policy,
                    now=now,
                    limits=self._limits,
                    min_sequence=state.floor,
                    device=self.device,
                    extract_to=extract,
                )
            check_acceptance(
                state,
                sequence=verified.manifest.sequence,
                digest=verified.digest,
                max_attempts=self.config.update.max_attempts,
            )
            if verified.manifest.encryption is not None:
                # An encrypted bundle this device cannot open fails here, before it is
                # staged or counted against the loop budget.
                from agent.bundle.crypto import open_data_key  # noqa: PLC0415 - when encrypted

                open_data_key(verified.manifest.encryption, self.key)
        except (BundleError, StateError) as exc:
            self.store.remove_tree(extract)
            self._fail(state, str(exc))
            raise
        except OSError as exc:
            self.store.remove_tree(extract)
            self._fail(state, f"cannot stage the bundle: {exc}")
            raise StateError(f"cannot stage the bundle: {exc}; free some disk space") from None
        m = verified.manifest
        self._emit("verified", digest=verified.digest, name=m.name, sequence=m.sequence)
        if verified.digest == state.current:
            self.store.remove_tree(extract)
            new = self._save(replace(state, pending=None))
            self._collect(new)
            return new, InstallResult(
                verified.digest, m.name, m.version, m.sequence, "already-current"
            )
        faults.crash_point("extracted")
        self.store.adopt(extract, verified.digest)
        faults.crash_point("adopted")
        staged = replace(p, phase="staged", digest=verified.digest, sequence=m.sequence)
        new = self._save(replace(state, pending=staged))
        # The bundle file is no longer needed: its verified content is in the store.
        self.store.remove_tree(bundle)
        self._emit("staged", digest=verified.digest)
        return new, None

    def _health_and_activate(self, state: AgentState, p: Pending) -> InstallResult:
        digest = p.digest
        if digest is None or not self.store.has_version(digest):
            # Staged content is gone (should not happen): verify again from the start.
            self._fail(state, "the staged version vanished from the store")
            raise StateError("the staged version vanished from the store; install it again")
        try:
            check_acceptance(
                state,
                sequence=p.sequence or 0,
                digest=digest,
                max_attempts=self.config.update.max_attempts,
            )
        except EdgeshipError as exc:
            self._fail(state, str(exc))
            raise
        # Count the attempt before loading: a candidate that crashes the agent while
        # loading or running must use up its budget, not loop forever (one held in a
        # stage was counted when it entered it).
        if p.phase not in STAGES:
            p = replace(p, phase="health-check")
            state = self._save(replace(state.with_attempt(digest), pending=p))
        manifest = self.store.manifest(digest)
        try:
            model, report = self._gate(manifest, digest)
        except EdgeshipError as exc:
            self._fail(state, str(exc))
            raise
        return self._activate(state, p, manifest, model, report)

    def _activate(
        self,
        state: AgentState,
        p: Pending,
        manifest: Manifest,
        model: ServingModel,
        report: HealthReport | None,
    ) -> InstallResult:
        """Swap the candidate that passed its gate in, in probation."""
        digest = p.digest
        assert digest is not None  # verified before it was gated
        self._save(replace(state, pending=replace(p, phase="probation")))
        if self.slot is not None:
            monitor = ProbationMonitor(manifest.health.probation)
            self.slot.swap(model, digest, monitor)
        else:
            model.close()
        self._emit("activated", digest=digest, sequence=manifest.sequence)
        return InstallResult(
            digest, manifest.name, manifest.version, manifest.sequence, "probation", report
        )

    # --- helpers ---------------------------------------------------------------------

    def _gate(self, manifest: Manifest, digest: str) -> tuple[ServingModel, HealthReport]:
        """Load the candidate and run the health gate on it.

        Raises:
            EdgeshipError: incompatible, does not load, or fails the gate.
        """
        passed = self.models.gate(manifest, self.store.version_dir(digest), digest)
        self._emit("health-check-passed", digest=digest, **passed.event_fields())
        return passed.model, passed.report

    def _serve(self, digest: str | None) -> None:
        if self.slot is None:
            return
        if digest is None:
            self.slot.clear()
            return
        if self.slot.digest == digest and self.slot.monitor() is None:
            return
        manifest = self.store.manifest(digest)
        self.slot.swap(self.models.load(manifest, self.store.version_dir(digest), digest), digest)

    def _rollback(self, state: AgentState, reason: str) -> AgentState:
        new = rollback_state(state, reason, time.time())
        if new.current is not None and not self.store.has_version(new.current):
            raise StateError(f"version {new.current[:12]} is missing from the store")
        new = self._save(new, crash_point=None)
        self._serve(new.current)
        self._collect(new)
        rolled = None if new.last_failure is None else new.last_failure.digest  # rolled away from
        self._emit("rolled-back", digest=rolled, current=new.current, reason=reason)
        return new

    def _fail(self, state: AgentState, reason: str) -> AgentState:
        p = state.pending
        phase: Phase | None = None if p is None else p.phase
        digest = None if p is None else p.digest
        new = self._save(
            replace(
                state,
                pending=None,
                last_failure=Failure("failed", reason, time.time(), digest=digest, phase=phase),
            ),
            crash_point=None,
        )
        self._collect(new)
        sha256 = None if p is None else p.sha256  # names the bundle before it is verified
        self._emit("failed", digest=digest, sha256=sha256, phase=phase, reason=reason)
        return new

    def _collect(self, state: AgentState) -> None:
        keep_staging: frozenset[Path] = frozenset()
        if state.pending is not None:
            bundle = self._bundle_path(state.pending)
            keep_staging = frozenset({bundle, partial_path(bundle)})
        self.store.collect_garbage(state.keep(), keep_staging)
        faults.crash_point("collected")

    def _save(self, state: AgentState, *, crash_point: str | None = "phase") -> AgentState:
        self.store.save(state)
        if crash_point == "phase" and state.pending is not None:
            faults.crash_point(state.pending.phase)
        elif crash_point is not None and crash_point != "phase":
            faults.crash_point(crash_point)
        return state

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._events is not None:
            self._events(kind, fields)
