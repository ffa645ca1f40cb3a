"""The rollout runner: the I/O around :func:`sdk.fleet.rollout.step`.

It watches the fleet's retained ``state`` and ``desired`` and the ``events`` stream (a
plain subscription: it must see every device's messages), turns them into a
:class:`~sdk.fleet.rollout.DeviceView` per device (:mod:`sdk.fleet._reported`), publishes
desired states when a wave starts, reverts on a halt if asked, and saves the record in
the fleet store (:mod:`sdk.fleet._rollout_store`) before every action.

Publishing survives a crash at any point without a device published twice or skipped:

1. the wave's devices are recorded (with their previous desired state, and the
   ``published_at`` that is also the payload's ``ts``, so a payload is the same bytes
   whenever it is made);
2. their desired states are published, pipelined, each acknowledged by the broker;
3. the wave is recorded as acknowledged (``acked_wave``).

A runner that starts on a record whose last wave is not acknowledged publishes it again,
but only to the devices whose retained ``desired`` is not already that payload: what the
broker acknowledged, it retains. A revert goes the same way (``revert`` pending, then
done), and so does an A/B decision: recorded (the device's split stage ``promoted`` or
``dropped``, with the time that is also the payload's ``ts``), then published where the
retained payload differs. The numbers an A/B decision compares come from the collector's
``telemetry_versions`` table in the same store.

Events missed while no runner ran come back from the collector's ``events`` table when a
collector stores them, else from the retained state (``last_failure``,
``probation``), else the device waits out the wave timeout.

Crash tests stop the runner through the agent's one fault seam (:mod:`agent.install.faults`,
``EDGESHIP_CRASH_AT``) at :data:`CRASH_POINTS`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from agent.install import faults
from agent.messages.desired import DEFAULT_MODEL, Split, parse_desired
from agent.messages.topics import PREFIX, Topics
from agent.plumbing.backoff import Backoff
from agent.plumbing.transport import Message, Transport, publish_many
from sdk.errors import StoreUnavailableError
from sdk.fleet._ab import version_stats
from sdk.fleet._reported import ReportedState, Signal, device_view, parse_event, parse_state
from sdk.fleet._rollout_lease import Runner
from sdk.fleet.publish import desired_payload
from sdk.fleet.rollout import Decision, DeviceProgress, DeviceView, Rollout, SplitState, step

__all__ = ["CRASH_POINTS", "FleetWatcher", "finish_pending", "run_rollout"]

log = logging.getLogger(__name__)

# Where a crash test may stop the runner (``{k}``: the wave's index).
CRASH_POINTS = (
    "rollout-started",  # the record exists; nothing is published
    "rollout-wave-{k}-recorded",  # wave k is recorded; none of it is published
    "rollout-wave-{k}-published",  # wave k is acknowledged by the broker, not yet recorded so
    "rollout-reverting",  # the revert is recorded; none of it is published
)
_SIGNALS_KEPT = 64  # per device: the newest events that decide a rollout


class FleetWatcher:
    """The latest ``state`` and ``desired`` of one model of each device of a fleet, and
    the model's events."""

    def __init__(
        self,
        transport: Transport,
        fleet: str,
        *,
        model: str = DEFAULT_MODEL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._clock = clock
        self._states: dict[str, ReportedState] = {}
        self._desired: dict[str, bytes] = {}
        self._signals: dict[str, collections.deque[Signal]] = {}
        self._last = time.monotonic()
        base = f"{PREFIX}/{fleet}/+"
        # The device-level topics are model "default"'s (agent.messages.topics).
        leaf = base if model == DEFAULT_MODEL else f"{base}/models/{model}"
        transport.subscribe(f"{leaf}/state", self._on_state)
        transport.subscribe(f"{leaf}/desired", self._on_desired)
        transport.subscribe(f"{base}/events", self._on_event)

    def settle(self, quiet_s: float = 0.5, max_wait_s: float = 5.0) -> None:
        """Wait until the retained messages stopped arriving."""
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            with self._lock:
                if time.monotonic() - self._last >= quiet_s:
                    return
            time.sleep(0.05)

    def _on_state(self, msg: Message) -> None:
        device = msg.topic.split("/")[3]
        try:
            state = parse_state(msg.payload, device) if msg.payload else None
        except ValueError as e:
            log.warning("ignoring the state of %s: %s", device, e)
            state = None
        with self._lock:
            self._last = time.monotonic()
            if state is None:
                self._states.pop(device, None)
            else:
                self._states[device] = state

    def _on_desired(self, msg: Message) -> None:
        with self._lock:
            self._last = time.monotonic()
            device = msg.topic.split("/")[3]
            if msg.payload:
                self._desired[device] = msg.payload
            else:
                self._desired.pop(device, None)

    def _on_event(self, msg: Message) -> None:
        self.replay([(msg.topic.split("/")[3], self._clock(), msg.payload)])

    def replay(self, events: Iterable[tuple[str, float, bytes]]) -> None:
        """Take (device, received_at, payload) events, live or read back from the store."""
        for device, received_at, payload in events:
            try:
                signal = parse_event(payload, device, received_at)
            except ValueError as e:
                log.warning("ignoring an event of %s: %s", device, e)
                continue
            if signal is None or signal.model != self.model:
                continue
            with self._lock:
                kept = self._signals.setdefault(device, collections.deque(maxlen=_SIGNALS_KEPT))
                # The same event, live and from the store: keep one.
                if signal.seq is None or all(s.seq != signal.seq for s in kept):
                    kept.append(signal)

    def state(self, device: str) -> ReportedState | None:
        with self._lock:
            return self._states.get(device)

    def desired(self, device: str) -> bytes | None:
        """The device's retained desired payload (None: there is none)."""
        with self._lock:
            return self._desired.get(device)

    def published(self, device: str, payload: bytes) -> None:
        """The broker acknowledged ``payload`` for the device: it retains it now (its copy
        comes back on the subscription later)."""
        with self._lock:
            if payload:
                self._desired[device] = payload
            else:
                self._desired.pop(device, None)

    def views(self, rollout: Rollout) -> dict[str, DeviceView]:
        """What each device published so far reports about the rollout's bundle."""
        with self._lock:
            return {
                device: device_view(
                    rollout.bundle,
                    self._states.get(device),
                    tuple(self._signals.get(device, ())),
                    since=p.published_at,
                    max_download_failures=rollout.plan.max_download_failures,
                )
                for device, p in rollout.progress.items()
            }


def _publish_missing(
    transport: Transport, watcher: FleetWatcher, fleet: str, payloads: Mapping[str, bytes]
) -> int:
    """Publish each device's payload (empty: clear) unless the broker already retains it.

    Raises:
        BrokerError: a publish was not acknowledged.
    """
    missing = {
        device: payload
        for device, payload in sorted(payloads.items())
        if watcher.desired(device) != (payload or None)
    }
    messages = [(Topics(fleet, d).desired_for(watcher.model), p) for d, p in missing.items()]
    done = publish_many(transport, messages, retain=True)
    for device, payload in missing.items():
        watcher.published(device, payload)
    return done


def _payload(rollout: Rollout, p: DeviceProgress) -> bytes:
    """The wave's desired state: the bundle, after a shadow stage or in a split."""
    split = rollout.plan.split
    return desired_payload(
        rollout.fleet,
        p.device,
        rollout.bundle,
        rollout=rollout.id,
        ts=p.published_at,
        model=rollout.model,
        shadow=rollout.plan.shadow,
        split=None if split is None else Split(split.share),
        probation=rollout.plan.probation,
    )


def _decided_payload(rollout: Rollout, p: DeviceProgress, split: SplitState) -> bytes:
    """An A/B decision: the bundle without the split (promoted), or the version the device
    served before (dropped; without one known, its desired state before the rollout)."""
    assert split.decided_at is not None  # a decided stage has its time
    ref = rollout.bundle if split.stage == "promoted" else split.serving
    if ref is None:
        return (p.previous or "").encode()
    return desired_payload(
        rollout.fleet, p.device, ref, rollout=rollout.id, ts=split.decided_at, model=rollout.model
    )


def _decided(rollout: Rollout) -> dict[str, bytes]:
    """The payloads of the A/B decisions recorded."""
    return {
        d: _decided_payload(rollout, p, p.split)
        for d, p in rollout.progress.items()
        if p.split is not None and p.split.stage != "split"
    }


def _save(runner: Runner, rollout: Rollout) -> Rollout:
    """The rollout as saved: itself, or the record as another process left it (aborted)."""
    return rollout if runner.save(rollout) else runner.reload()


def finish_pending(
    transport: Transport, runner: Runner, watcher: FleetWatcher, rollout: Rollout
) -> Rollout:
    """Publish what the record says was decided and the broker does not retain: a running
    rollout's last wave, A/B decisions, a pending revert. Returns the rollout as saved
    afterwards.

    Raises:
        BrokerError: a publish was not acknowledged.
        RolloutError: the lease is lost.
    """
    if rollout.status == "running" and rollout.acked_wave < rollout.wave:
        k = rollout.wave
        faults.crash_point(f"rollout-wave-{k}-recorded")
        devices = rollout.unacknowledged
        _publish_missing(
            transport,
            watcher,
            rollout.fleet,
            {d: _payload(rollout, rollout.progress[d]) for d in devices},
        )
        faults.crash_point(f"rollout-wave-{k}-published")
        rollout = _save(runner, replace(rollout, acked_wave=k))
    if rollout.revert == "none":  # a revert overrides the A/B decisions
        _publish_missing(transport, watcher, rollout.fleet, _decided(rollout))
    if rollout.revert == "pending":
        faults.crash_point("rollout-reverting")
        previous = {d: (p.previous or "").encode() for d, p in rollout.progress.items()}
        _publish_missing(transport, watcher, rollout.fleet, previous)
        rollout = _save(runner, replace(rollout, revert="done"))
    return rollout


def _serving(rollout: Rollout, device: str, previous: bytes | None) -> SplitState:
    """A device starting an A/B split, with the version its desired state named before."""
    serving = None
    if previous:
        try:
            desired = parse_desired(
                previous, fleet=rollout.fleet, device=device, model=rollout.model
            )
        except ValueError as e:
            log.warning("%s: its desired state before the rollout is unreadable: %s", device, e)
        else:
            serving = None if desired is None else desired.bundle
    return SplitState("split", serving)


def _record_wave(
    watcher: FleetWatcher, rollout: Rollout, devices: tuple[str, ...], now: float
) -> Rollout:
    progress = dict(rollout.progress)
    for device in devices:
        # What to revert to (and, A/B, what to go back to) is recorded before publishing.
        previous = watcher.desired(device)
        split = None if rollout.plan.split is None else _serving(rollout, device, previous)
        progress[device] = DeviceProgress(
            device=device,
            wave=rollout.wave,
            published_at=now,
            previous=None if previous is None else previous.decode("utf-8", "replace"),
            split=split,
        )
    return replace(rollout, progress=progress)


def _with_ab(runner: Runner, rollout: Rollout, views: dict[str, DeviceView]) -> None:
    """Add to ``views`` what the candidate and the serving version of each splitting
    device answered since it was published (from the store's ``telemetry_versions``)."""
    splitting = {
        d: (p.published_at, p.split)
        for d, p in rollout.progress.items()
        if p.split is not None and p.split.stage == "split"
    }
    if not splitting:
        return
    since = min(published for published, _ in splitting.values())
    rows = runner.records.versions_since(rollout.fleet, rollout.model, since)
    for device, (published, split) in splitting.items():
        mine = [r for r in rows if r["device"] == device and float(r["received_at"]) >= published]
        serving = None if split.serving is None else split.serving.digest
        candidate = version_stats(
            r for r in mine if r["role"] == "candidate" and r["digest"] == rollout.bundle.digest
        )
        before = version_stats(
            r for r in mine if r["role"] == "serving" and serving in (None, r["digest"])
        )
        views[device] = replace(views.get(device, DeviceView()), ab=(candidate, before))


def _advance(
    runner: Runner, watcher: FleetWatcher, rollout: Rollout, now: float
) -> tuple[Rollout, Decision]:
    """One decision, saved before anything is done about it."""
    before = rollout
    views = watcher.views(rollout)
    if rollout.plan.split is not None:
        _with_ab(runner, rollout, views)
    rollout, decision = step(rollout, views, now)
    if decision.action == "publish":
        rollout = _record_wave(watcher, rollout, decision.devices, now)
    if decision.action == "halt" and rollout.plan.revert_on_halt:
        rollout = replace(rollout, revert="pending")
    if rollout != before:
        rollout = _save(runner, rollout)
    return rollout, decision


def run_rollout(
    transport: Transport,
    runner: Runner,
    rollout: Rollout,
    *,
    watcher: FleetWatcher | None = None,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.time,
    on_change: Callable[[Rollout, Decision], None] | None = None,
    stop: threading.Event | None = None,
) -> Rollout:
    """Drive ``rollout``, held by ``runner``, until it completes, halts or is aborted (or
    ``stop`` is set). A pending wave or revert of an earlier runner is finished first.

    A store that is out for a while (:class:`~sdk.errors.StoreUnavailableError`: a
    PostgreSQL restart) is waited out: nothing is published that is not recorded, so the
    runner reloads the record once the store answers and goes on from what it says.

    Raises:
        BrokerError: the broker did not acknowledge a publish.
        ConfigError: the store failed for good (StoreUnavailableError: ``stop`` was set
            during an outage).
        RolloutError: the runner lost its lease to another.
    """
    if watcher is None:
        watcher = FleetWatcher(transport, rollout.fleet, model=rollout.model, clock=clock)
        watcher.settle()
    faults.crash_point("rollout-started")
    stop = stop or threading.Event()
    outage = _Outage(runner, stop)
    pending = True  # what an earlier runner, or a failed write, may have left to publish
    while pending or (rollout.status == "running" and not stop.is_set()):
        try:
            if pending:
                rollout = finish_pending(transport, runner, watcher, rollout)
                pending = False
                outage.over()
                continue
            rollout, decision = _advance(runner, watcher, rollout, clock())
            rollout = finish_pending(transport, runner, watcher, rollout)
            outage.over()
            if decision.action != "wait" and on_change is not None:
                on_change(rollout, decision)
            if rollout.status != "running" or stop.wait(poll_s):
                break
            # Another process may have aborted it meanwhile: the store is the authority.
            if runner.aborted():
                rollout = runner.reload()
        except StoreUnavailableError as e:
            rollout = outage.ride_out(e)
            pending = True
    return rollout


class _Outage:
    """The runner's wait for its store: retried after a backoff, logged once each way."""

    def __init__(self, runner: Runner, stop: threading.Event) -> None:
        self._runner = runner
        self._stop = stop
        self._backoff = Backoff(0.2, 5.0)
        self._since: float | None = None

    def ride_out(self, error: StoreUnavailableError) -> Rollout:
        """The record as the store holds it, once it answers again.

        Raises:
            StoreUnavailableError: ``stop`` was set first.
        """
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "rollout %s: the store is out (%s); nothing more is published until it is"
                " back, retrying",
                self._runner.rollout.id,
                error,
            )
        while not self._stop.wait(self._backoff.next()):
            try:
                return self._runner.reload()
            except StoreUnavailableError as e:
                error = e
        raise error

    def over(self) -> None:
        self._backoff.reset()
        if self._since is not None:
            log.warning(
                "rollout %s: the store is back after %.1f s",
                self._runner.rollout.id,
                time.monotonic() - self._since,
            )
            self._since = None
