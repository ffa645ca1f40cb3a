"""Rollouts in waves: the pure decision logic and the persistent rollout record.

A rollout publishes one bundle's desired state to a growing share of a device list:
waves ``1%,10%,50%,100%`` are cumulative fractions. The next wave starts only when every
device published so far has *settled*: it reported the bundle as current, passed
probation (a ``committed`` event or ``state.probation.passed``) and stayed so for
``min_healthy_s`` — or it failed (a ``rolled-back`` / ``failed`` event for the digest,
``state.last_failure`` naming it, no success within ``wave_timeout_s``, or it stopped
running the bundle). When failed devices exceed ``max_failure_rate`` of the devices
published so far, the rollout halts (and the runner may revert them).

Everything here is pure: :func:`step` takes a rollout, what each device reports, and
``now``, and returns the next rollout and what to do. The runner
(:mod:`sdk.fleet._rollout_run`) does the MQTT and the file writes.
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

    def __post_init__(self) -> None:
        if not 0 <= self.max_failure_rate < 1:
            raise ConfigError("--max-failure-rate must be in [0, 1)")
        if self.min_healthy_s < 0 or self.wave_timeout_s <= 0:
            raise ConfigError("--min-healthy-time must be >= 0 and --wave-timeout > 0")


@dataclass(frozen=True)
class DeviceView:
    """What a device reports about the rollout's bundle (derived from state and events)."""

    current: str | None = None  # digest of the bundle it runs
    probation_passed: bool = False  # for the rollout's digest
    failure: str | None = None  # reason, when it rolled back or refused the rollout's digest


@dataclass(frozen=True)
class DeviceProgress:
    device: str
    wave: int
    published_at: float
    previous: str | None = None  # the desired payload before the rollout (None: there was none)
    outcome: Outcome = "pending"
    healthy_since: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Rollout:
    id: str
    fleet: str
    bundle: BundleRef
    devices: tuple[str, ...]  # in wave order
    plan: RolloutPlan
    created_at: float
    status: Status = "running"
    wave: int = -1  # index of the last wave published
    progress: Mapping[str, DeviceProgress] = field(default_factory=dict)
    reason: str | None = None  # why it halted or was aborted

    @property
    def failure_rate(self) -> float:
        failed = sum(p.outcome == "failed" for p in self.progress.values())
        return failed / len(self.progress) if self.progress else 0.0

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
            "plan": {
                "waves": list(self.plan.waves),
                "max_failure_rate": self.plan.max_failure_rate,
                "min_healthy_s": self.plan.min_healthy_s,
                "wave_timeout_s": self.plan.wave_timeout_s,
                "revert_on_halt": self.plan.revert_on_halt,
            },
            "created_at": self.created_at,
            "status": self.status,
            "wave": self.wave,
            "reason": self.reason,
            "progress": {
                d: {
                    "wave": p.wave,
                    "published_at": p.published_at,
                    "previous": p.previous,
                    "outcome": p.outcome,
                    "healthy_since": p.healthy_since,
                    "reason": p.reason,
                }
                for d, p in sorted(self.progress.items())
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Rollout:
        """Raises: ConfigError when the record is not a rollout this version wrote."""
        try:
            plan = doc["plan"]
            return cls(
                id=str(doc["id"]),
                fleet=str(doc["fleet"]),
                bundle=BundleRef.from_json(doc["bundle"]),
                devices=tuple(doc["devices"]),
                plan=RolloutPlan(
                    waves=tuple(float(w) for w in plan["waves"]),
                    max_failure_rate=float(plan["max_failure_rate"]),
                    min_healthy_s=float(plan["min_healthy_s"]),
                    wave_timeout_s=float(plan["wave_timeout_s"]),
                    revert_on_halt=bool(plan["revert_on_halt"]),
                ),
                created_at=float(doc["created_at"]),
                status=doc["status"],
                wave=int(doc["wave"]),
                reason=doc.get("reason"),
                progress={
                    d: DeviceProgress(device=d, **p) for d, p in dict(doc["progress"]).items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"rollout record is malformed: {e!r}") from None


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
        return replace(
            p,
            outcome="failed",
            reason=f"timeout: not committed within {plan.wave_timeout_s:g}s",
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
