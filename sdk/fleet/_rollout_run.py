"""The rollout runner: the I/O around :func:`sdk.fleet.rollout.step`.

It watches the fleet's retained ``state`` and ``desired`` and the ``events`` stream
(a plain subscription: it must see every device's messages), turns them into
:class:`DeviceView` per device, publishes desired states when a wave starts, reverts on
a halt if asked, and writes the rollout record after every change, atomically, to
``<state_dir>/<id>.json``. Events missed while no runner was running are covered by the
retained state (``probation``, ``last_failure``), so ``resume`` picks up where it was.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, StateError
from agent.messages.topics import PREFIX, Topics
from agent.plumbing.files import atomic_write
from agent.plumbing.transport import Message, Transport, publish_many
from sdk.fleet.publish import desired_payload
from sdk.fleet.rollout import Decision, DeviceProgress, DeviceView, Rollout, step

__all__ = ["FleetWatcher", "RolloutFiles", "revert", "run_rollout"]


class RolloutFiles:
    """Rollout records, one JSON file each, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, rollout_id: str) -> Path:
        if not rollout_id or "/" in rollout_id or rollout_id.startswith("."):
            raise ConfigError(f"invalid rollout id {rollout_id!r}")
        return self.directory / f"{rollout_id}.json"

    def load(self, rollout_id: str) -> Rollout:
        """Raises: ConfigError when there is no such rollout or its record is malformed."""
        try:
            doc = json.loads(self.path(rollout_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no rollout {rollout_id!r} in {self.directory}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read rollout {rollout_id!r}: {e}") from None
        return Rollout.from_json(doc)

    def save(self, rollout: Rollout, *, unless_aborted: bool = False) -> bool:
        """Write the record (temp file, fsync, rename, fsync the directory); True if written.

        With ``unless_aborted`` nothing is written when the record on disk says aborted:
        ``edgeship rollout abort`` from another process wins over a running runner. A lock
        file serialises the check and the write between processes.

        Raises:
            ConfigError: on I/O errors.
        """
        target = self.path(rollout.id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with (self.directory / f".{rollout.id}.lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if unless_aborted and target.exists() and self.load(rollout.id).status == "aborted":
                    return False
                payload = json.dumps(rollout.to_json(), indent=2, sort_keys=True).encode()
                atomic_write(target, payload)
        except OSError as e:
            raise ConfigError(f"cannot write rollout record {target}: {e.strerror}") from None
        return True

    def list(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("[!.]*.json"))


class FleetWatcher:
    """The latest ``state`` and ``desired`` of each device of a fleet, and its events."""

    def __init__(self, transport: Transport, fleet: str) -> None:
        self._lock = threading.Lock()
        self.states: dict[str, dict[str, Any]] = {}
        self.desired: dict[str, bytes] = {}
        self.committed: set[tuple[str, str]] = set()  # (device, digest)
        self.failures: dict[tuple[str, str], str] = {}
        self._last = time.monotonic()
        base = f"{PREFIX}/{fleet}/+"
        transport.subscribe(f"{base}/state", self._on_state)
        transport.subscribe(f"{base}/desired", self._on_desired)
        transport.subscribe(f"{base}/events", self._on_event)

    def settle(self, quiet_s: float = 0.5, max_wait_s: float = 5.0) -> None:
        """Wait until the retained messages stopped arriving."""
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            with self._lock:
                if time.monotonic() - self._last >= quiet_s:
                    return
            time.sleep(0.05)

    @staticmethod
    def _doc(msg: Message) -> dict[str, Any] | None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def _on_state(self, msg: Message) -> None:
        doc = self._doc(msg)
        with self._lock:
            self._last = time.monotonic()
            if doc is not None:
                self.states[msg.topic.split("/")[3]] = doc

    def _on_desired(self, msg: Message) -> None:
        with self._lock:
            self._last = time.monotonic()
            device = msg.topic.split("/")[3]
            if msg.payload:
                self.desired[device] = msg.payload
            else:
                self.desired.pop(device, None)

    def _on_event(self, msg: Message) -> None:
        doc = self._doc(msg)
        if doc is None or not isinstance(doc.get("digest"), str):
            return
        key = (msg.topic.split("/")[3], doc["digest"])
        with self._lock:
            if doc.get("event") == "committed":
                self.committed.add(key)
            elif doc.get("event") in {"rolled-back", "failed"}:
                self.failures[key] = f"{doc['event']}: {doc.get('reason') or 'no reason given'}"

    def views(self, digest: str) -> dict[str, DeviceView]:
        """Each device's report about the bundle ``digest``."""
        with self._lock:
            devices = set(self.states) | {d for d, _ in self.committed | set(self.failures)}
            out = {}
            for device in devices:
                state = self.states.get(device, {})
                current = state.get("current") if isinstance(state.get("current"), dict) else {}
                probation = state.get("probation")
                last_failure = state.get("last_failure")
                failure = self.failures.get((device, digest))
                if (
                    failure is None
                    and isinstance(last_failure, dict)
                    and last_failure.get("digest") == digest
                ):
                    failure = f"failed: {last_failure.get('reason') or 'no reason given'}"
                runs = isinstance(current, dict) and current.get("digest") == digest
                passed = (device, digest) in self.committed or (
                    isinstance(probation, dict)
                    and probation.get("digest") == digest
                    and probation.get("passed") is True
                )
                out[device] = DeviceView(
                    current=digest if runs else None,
                    probation_passed=bool(runs and passed),
                    failure=failure,
                )
            return out

    def desired_of(self, device: str) -> str | None:
        with self._lock:
            payload = self.desired.get(device)
        return None if payload is None else payload.decode("utf-8", "replace")


def revert(transport: Transport, rollout: Rollout, devices: list[str] | None = None) -> list[str]:
    """Publish each touched device's desired state from before the rollout (or clear it).

    Raises:
        BrokerError: a publish was not acknowledged.
    """
    reverted = list(devices if devices is not None else sorted(rollout.progress))
    # No previous desired state: an empty retained payload clears it.
    messages = []
    for device in reverted:
        previous = rollout.progress[device].previous
        payload = b"" if previous is None else previous.encode()
        messages.append((Topics(rollout.fleet, device).desired, payload))
    publish_many(transport, messages, retain=True)
    return reverted


def _start_wave(
    watcher: FleetWatcher, rollout: Rollout, devices: tuple[str, ...], now: float
) -> tuple[Rollout, list[tuple[str, bytes]]]:
    """The rollout with ``devices`` recorded as published, and the messages to publish."""
    progress = dict(rollout.progress)
    messages = []
    for device in devices:
        # Recorded (with what to revert to) before it is published.
        progress[device] = DeviceProgress(
            device=device, wave=rollout.wave, published_at=now, previous=watcher.desired_of(device)
        )
        payload = desired_payload(rollout.fleet, device, rollout.bundle, rollout=rollout.id, ts=now)
        messages.append((Topics(rollout.fleet, device).desired, payload))
    return replace(rollout, progress=progress), messages


def run_rollout(
    transport: Transport,
    files: RolloutFiles,
    rollout: Rollout,
    *,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.time,
    on_change: Callable[[Rollout, Decision], None] | None = None,
    stop: threading.Event | None = None,
) -> Rollout:
    """Drive ``rollout`` until it completes, halts or is aborted (or ``stop`` is set).

    Raises:
        BrokerError: the broker did not acknowledge a publish.
        ConfigError: the rollout record cannot be written.
        StateError: the rollout is not running.
    """
    if rollout.status != "running":
        raise StateError(f"rollout {rollout.id} is {rollout.status}; only a running one can run")
    watcher = FleetWatcher(transport, rollout.fleet)
    watcher.settle()

    def aborted() -> Rollout:
        return files.load(rollout.id)

    if not files.save(rollout, unless_aborted=True):
        return aborted()
    while stop is None or not stop.is_set():
        now = clock()
        before = rollout
        rollout, decision = step(rollout, watcher.views(rollout.bundle.digest), now)
        messages: list[tuple[str, bytes]] = []
        if decision.action == "publish":
            rollout, messages = _start_wave(watcher, rollout, decision.devices, now)
        # Persist the decision (and what to revert to) before acting on it.
        if rollout != before and not files.save(rollout, unless_aborted=True):
            return aborted()
        # Pipelined, but every publish is acknowledged before the wave counts as published.
        publish_many(transport, messages, retain=True)
        if decision.action == "halt" and rollout.plan.revert_on_halt:
            revert(transport, rollout)
        if decision.action != "wait" and on_change is not None:
            on_change(rollout, decision)
        if rollout.status != "running":
            return rollout
        time.sleep(poll_s)
        # Another CLI may have aborted it meanwhile: the file is the authority.
        if files.load(rollout.id).status == "aborted":
            return aborted()
    return rollout
