"""Rollouts in waves: the pure decision logic and the persistent rollout record.

A rollout publishes one bundle's desired state to a growing share of a device list:
waves ``1%,10%,50%,100%`` are cumulative fractions. The next wave starts only when every
device published so far has *settled*: it reported the bundle as current, passed
probation (a ``committed`` event or ``state.probation.passed``) and stayed so for
``min_healthy_s`` — or it failed (it refused the bundle, could not download it, failed
to verify or health-check it, rolled it back, did not succeed within ``wave_timeout_s``,
or stopped running it; :mod:`sdk.fleet._reported` reads that from what it reports).
When failed devices exceed ``max_failure_rate`` of the devices published so far, the
rollout halts (and the runner may revert them).

Everything here is pure: :func:`step` takes a rollout, what each device reports, and
``now``, and returns the next rollout and what to do. The runner
(:mod:`sdk.fleet._rollout_run`) does the MQTT; the record lives in the fleet store
(:mod:`sdk.fleet._rollout_store`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.errors import ConfigError
from sdk.fleet.publish import BundleRef

__all__ = [
    "Decision",
    "DeviceProgress",
    "DeviceView",
    "Rollout",
    "RolloutPlan",
    "parse_waves",
    "step",
    "wave_order",
    "wave_sizes",
]

Status = Literal["running", "halted", "completed", "aborted"]
Outcome = Literal["pending", "succeeded", "failed"]
Revert = Literal["none", "pending", "done"]


def parse_waves(text: str) -> tuple[float, ...]:
    """``"1%,10%,50%,100%"`` -> ``(0.01, 0.1, 0.5, 1.0)``.

    Raises:
        ConfigError: not percentages, not increasing, or not ending at 100%.
    """
    try:
        waves = tuple(float(part.strip().removesuffix("%")) / 100 for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--waves {text!r} must be percentages like 1%,10%,50%,100%") from None
    if any(not 0 < w <= 1 for w in waves) or list(waves) != sorted(set(waves)):
        raise ConfigError(f"--waves {text!r} must increase strictly within (0%, 100%]")
    if waves[-1] != 1.0:
        raise ConfigError(f"--waves {text!r} must end at 100%")
    return waves


def wave_sizes(n_devices: int, waves: tuple[float, ...]) -> list[int]:
    """Cumulative device counts per wave: at least one device, never shrinking, all at the end."""
    sizes, last = [], 0
    for w in waves:
        last = min(n_devices, max(last, 1, math.ceil(w * n_devices)))
        sizes.append(last)
    return sizes


def wave_order(rollout_id: str, devices: tuple[str, ...]) -> tuple[str, ...]:
    """Devices in a stable pseudo-random order, so the canaries differ between rollouts."""
    return tuple(
        sorted(devices, key=lambda d: hashlib.sha256(f"{rollout_id}\0{d}".encode()).digest())
    )


@dataclass(frozen=True)
class RolloutPlan:
    waves: tuple[float, ...]
    max_failure_rate: float
    min_healthy_s: float
    wave_timeout_s: float = 600.0
    revert_on_halt: bool = False
    # Transient download failures (network, HTTP 5xx) a device may report for the bundle
    # before it counts as failed; a refused download (HTTP 4xx, another file) counts at once.
    max_download_failures: int = 3
    # A runner heartbeats every quarter of this; one silent for longer is gone.
    runner_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_failure_rate < 1:
            raise ConfigError("--max-failure-rate must be in [0, 1)")
        if self.min_healthy_s < 0 or self.wave_timeout_s <= 0:
            raise ConfigError("--min-healthy-time must be >= 0 and --wave-timeout > 0")
        if self.max_download_failures < 1 or self.runner_timeout_s <= 0:
            raise ConfigError("--download-failures must be >= 1 and --runner-timeout > 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "waves": list(self.waves),
            "max_failure_rate": self.max_failure_rate,
            "min_healthy_s": self.min_healthy_s,
            "wave_timeout_s": self.wave_timeout_s,
            "revert_on_halt": self.revert_on_halt,
            "max_download_failures": self.max_download_failures,
            "runner_timeout_s": self.runner_timeout_s,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RolloutPlan:
        """Raises: KeyError, TypeError or ValueError when a field is missing or wrong."""
        return cls(
            waves=tuple(float(w) for w in doc["waves"]),
            max_failure_rate=float(doc["max_failure_rate"]),
            min_healthy_s=float(doc["min_healthy_s"]),
            wave_timeout_s=float(doc["wave_timeout_s"]),
            revert_on_halt=bool(doc["revert_on_halt"]),
            max_download_failures=int(doc["max_download_failures"]),
            runner_timeout_s=float(doc["runner_timeout_s"]),
        )


@dataclass(frozen=True)
class DeviceView:
    """What a device reports about the rollout's bundle (derived from state and events)."""

    current: str | None = None  # digest of the bundle it runs
    probation_passed: bool = False  # for the rollout's digest
    failure: str | None = None  # reason, when it refused, could not get, or rolled back the bundle
    note: str | None = None  # the latest trouble short of a failure, for a timeout's reason


@dataclass(frozen=True)
class DeviceProgress:
    device: str
    wave: int
    published_at: float  # also the desired payload's ts: a re-publish is byte-identical
    previous: str | None = None  # the desired payload before the rollout (None: there was none)
    outcome: Outcome = "pending"
    healthy_since: float | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "wave": self.wave,
            "published_at": self.published_at,
            "previous": self.previous,
            "outcome": self.outcome,
            "healthy_since": self.healthy_since,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Rollout:
    id: str
    fleet: str
    bundle: BundleRef
    devices: tuple[str, ...]  # in wave order
    plan: RolloutPlan
    created_at: float
    status: Status = "running"
    wave: int = -1  # index of the last wave recorded (its devices are in ``progress``)
    progress: Mapping[str, DeviceProgress] = field(default_factory=dict)
    reason: str | None = None  # why it halted or was aborted
    # The last wave whose every publish the broker acknowledged; between it and ``wave``
    # the runner stopped after recording a wave and before knowing it was published.
    acked_wave: int = -1
    revert: Revert = "none"  # "pending": recorded, not yet acknowledged by the broker

    @property
    def failure_rate(self) -> float:
        failed = sum(p.outcome == "failed" for p in self.progress.values())
        return failed / len(self.progress) if self.progress else 0.0

    @property
    def unacknowledged(self) -> list[str]:
        """Devices recorded as published in a wave the broker has not acknowledged yet."""
        return sorted(d for d, p in self.progress.items() if p.wave > self.acked_wave)

    def counts(self) -> dict[str, int]:
        counts = {"devices": len(self.devices), "published": len(self.progress)}
        for outcome in ("pending", "succeeded", "failed"):
            counts[outcome] = sum(p.outcome == outcome for p in self.progress.values())
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fleet": self.fleet,
            "bundle": self.bundle.to_json(),
            "devices": list(self.devices),
            "plan": self.plan.to_json(),
            "created_at": self.created_at,
            "status": self.status,
            "wave": self.wave,
            "acked_wave": self.acked_wave,
            "revert": self.revert,
            "reason": self.reason,
            "counts": self.counts(),
            "progress": {d: p.to_json() for d, p in sorted(self.progress.items())},
        }


@dataclass(frozen=True)
class Decision:
    """What the runner does next. ``publish``: these devices get the bundle now."""

    action: Literal["wait", "publish", "halt", "complete", "none"]
    devices: tuple[str, ...] = ()
    reason: str | None = None


def _settle(p: DeviceProgress, view: DeviceView, plan: RolloutPlan, now: float) -> DeviceProgress:
    if p.outcome == "failed":
        return p
    if view.failure is not None:
        return replace(p, outcome="failed", reason=view.failure)
    running_it = view.current is not None and view.probation_passed
    if p.healthy_since is not None and not running_it:
        return replace(p, outcome="failed", reason="stopped running the bundle")
    if p.outcome == "succeeded":
        return p
    if running_it:
        since = p.healthy_since if p.healthy_since is not None else now
        if now - since >= plan.min_healthy_s:
            return replace(p, outcome="succeeded", healthy_since=since)
        return replace(p, healthy_since=since)
    if now - p.published_at > plan.wave_timeout_s:
        last = f" (last reported: {view.note})" if view.note else ""
        return replace(
            p,
            outcome="failed",
            reason=f"timeout: not committed within {plan.wave_timeout_s:g}s{last}",
        )
    return p


def step(rollout: Rollout, views: Mapping[str, DeviceView], now: float) -> tuple[Rollout, Decision]:
    """Update each published device from what it reports, then decide.

    ``views`` has the devices that reported something; a device absent from it has
    reported nothing yet. ``DeviceView.current`` must be the rollout's digest or None
    (the caller maps other digests to None).
    """
    if rollout.status != "running":
        return rollout, Decision("none")
    progress = {
        d: _settle(p, views.get(d, DeviceView()), rollout.plan, now)
        for d, p in rollout.progress.items()
    }
    rollout = replace(rollout, progress=progress)
    if rollout.failure_rate > rollout.plan.max_failure_rate:
        failed = sorted(d for d, p in progress.items() if p.outcome == "failed")
        reason = (
            f"{len(failed)} of {len(progress)} devices failed"
            f" ({rollout.failure_rate:.0%} > {rollout.plan.max_failure_rate:.0%})"
        )
        return replace(rollout, status="halted", reason=reason), Decision(
            "halt", tuple(failed), reason
        )
    if any(p.outcome == "pending" for p in progress.values()):
        return rollout, Decision("wait")
    sizes = wave_sizes(len(rollout.devices), rollout.plan.waves)
    next_wave = rollout.wave + 1
    # Waves that add no device (tiny fleets) are skipped.
    while next_wave < len(sizes) and sizes[next_wave] <= len(progress):
        next_wave += 1
    if next_wave >= len(sizes):
        return replace(rollout, status="completed", wave=len(sizes) - 1), Decision("complete")
    devices = rollout.devices[len(progress) : sizes[next_wave]]
    return replace(rollout, wave=next_wave), Decision("publish", devices)
