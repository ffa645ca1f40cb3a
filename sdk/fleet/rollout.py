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

A rollout is of one model of the devices (``model``; anti-rollback sequences are per
model on a device). It may put a stage before the candidate serves everyone:

- *shadow* (``plan.shadow``, a :class:`~agent.messages.desired.PromotionRule`): each
  device runs the candidate beside the serving version and decides by the rule; a device
  succeeds only after its ``shadow-passed`` verdict (then the usual commit);
- *A/B split* (``plan.split``, :class:`~sdk.fleet._ab.SplitPlan`): each device serves the
  candidate to a share of requests; once it answered enough, :func:`step` compares it
  with the serving version (:func:`sdk.fleet._ab.judge`) and promotes it on that device
  (the runner publishes the bundle without the split) or drops it (the runner publishes
  the version the device served when its wave started).

A rejection — a device's ``shadow-rejected`` or an A/B verdict against the candidate —
is a verdict on the candidate, not on a device: the device's outcome is ``rejected`` and
the rollout halts at once, whatever ``max_failure_rate``, with the numbers in its reason
(and, on any halt, the candidate is dropped on the devices still splitting).

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
from agent.messages.desired import DEFAULT_MODEL, ProbationRule, PromotionRule
from agent.plumbing.strict import Doc
from sdk.fleet._ab import SplitPlan, VersionStats, judge
from sdk.fleet.publish import BundleRef

__all__ = [
    "Decision",
    "DeviceProgress",
    "DeviceView",
    "Rollout",
    "RolloutPlan",
    "SplitState",
    "parse_waves",
    "step",
    "wave_order",
    "wave_sizes",
]

Status = Literal["running", "halted", "completed", "aborted"]
Outcome = Literal["pending", "succeeded", "failed", "rejected"]
Stage = Literal["split", "promoted", "dropped"]
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
    shadow: PromotionRule | None = None  # each wave's devices shadow the candidate first
    split: SplitPlan | None = None  # each wave's devices A/B the candidate first
    probation: ProbationRule | None = None  # ground truth in each device's probation

    def __post_init__(self) -> None:
        if self.shadow is not None and self.split is not None:
            raise ConfigError("a rollout has a shadow stage (--shadow) or a split (--split)")
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
            "shadow": None if self.shadow is None else self.shadow.to_json(),
            "split": None if self.split is None else self.split.to_json(),
            "probation": None if self.probation is None else self.probation.to_json(),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RolloutPlan:
        """Raises: KeyError, TypeError or ValueError when a field is missing or wrong."""
        shadow, split = doc.get("shadow"), doc.get("split")  # absent before stages existed
        probation = doc.get("probation")
        return cls(
            probation=None
            if probation is None
            else ProbationRule.read(Doc(probation, "probation", error=ValueError)),
            shadow=None
            if shadow is None
            else PromotionRule.read(Doc(shadow, "shadow", error=ValueError)),
            split=None if split is None else SplitPlan.from_json(split),
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
    shadow_passed: bool = False  # its shadow verdict was "promote" (or it ran it already)
    rejected: str | None = None  # its shadow verdict was "reject": the reason and numbers
    # A/B: what the candidate and the serving version answered since it was published
    ab: tuple[VersionStats, VersionStats] | None = None


@dataclass(frozen=True)
class SplitState:
    """Where a device of an A/B rollout is: splitting, or decided (and by what numbers)."""

    stage: Stage
    serving: BundleRef | None  # what it served when its wave started (None: unknown)
    decided_at: float | None = None  # also the ``ts`` of the desired state that says so
    verdict: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "serving": None if self.serving is None else self.serving.to_json(),
            "decided_at": self.decided_at,
            "verdict": self.verdict,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SplitState:
        """Raises: KeyError, TypeError or ValueError when a field is missing or wrong."""
        stage = str(doc["stage"])
        if stage not in ("split", "promoted", "dropped"):
            raise ValueError(f"unknown split stage {stage!r}")
        serving, decided = doc["serving"], doc["decided_at"]
        return cls(
            stage=stage,  # type: ignore[arg-type]
            serving=None if serving is None else BundleRef.from_json(serving),
            decided_at=None if decided is None else float(decided),
            verdict=doc["verdict"],
        )


@dataclass(frozen=True)
class DeviceProgress:
    device: str
    wave: int
    published_at: float  # also the desired payload's ts: a re-publish is byte-identical
    previous: str | None = None  # the desired payload before the rollout (None: there was none)
    outcome: Outcome = "pending"
    healthy_since: float | None = None
    reason: str | None = None
    split: SplitState | None = None  # A/B rollouts only

    def to_json(self) -> dict[str, Any]:
        return {
            "wave": self.wave,
            "published_at": self.published_at,
            "previous": self.previous,
            "outcome": self.outcome,
            "healthy_since": self.healthy_since,
            "reason": self.reason,
            "split": None if self.split is None else self.split.to_json(),
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
    model: str = DEFAULT_MODEL  # the model of the devices (agent.toml [models.NAME])

    @property
    def failure_rate(self) -> float:
        failed = sum(p.outcome in ("failed", "rejected") for p in self.progress.values())
        return failed / len(self.progress) if self.progress else 0.0

    @property
    def unacknowledged(self) -> list[str]:
        """Devices recorded as published in a wave the broker has not acknowledged yet."""
        return sorted(d for d, p in self.progress.items() if p.wave > self.acked_wave)

    def counts(self) -> dict[str, int]:
        counts = {"devices": len(self.devices), "published": len(self.progress)}
        for outcome in ("pending", "succeeded", "failed", "rejected"):
            counts[outcome] = sum(p.outcome == outcome for p in self.progress.values())
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fleet": self.fleet,
            "model": self.model,
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


def _split_verdict(
    p: DeviceProgress, view: DeviceView, plan: RolloutPlan, now: float
) -> DeviceProgress:
    """A splitting device: promoted or rejected once the candidate answered enough."""
    # Only devices published with a split have one, only in a rollout that splits.
    assert plan.split is not None
    assert p.split is not None
    answered = 0 if view.ab is None else view.ab[0].requests
    if view.ab is not None and answered >= plan.split.min_requests:
        promote, verdict = judge(*view.ab, plan.split)
        stage: Stage = "promoted" if promote else "dropped"
        p = replace(p, split=replace(p.split, stage=stage, decided_at=now, verdict=verdict))
        return p if promote else replace(p, outcome="rejected", reason=f"A/B rejected: {verdict}")
    if now - p.published_at > plan.wave_timeout_s:
        return replace(
            p,
            outcome="failed",
            reason=f"timeout: the candidate answered {answered} of the"
            f" {plan.split.min_requests} requests an A/B verdict needs within"
            f" {plan.wave_timeout_s:g}s (is a collector storing this --db's telemetry?)",
        )
    return p


def _settle(p: DeviceProgress, view: DeviceView, plan: RolloutPlan, now: float) -> DeviceProgress:
    if p.outcome in ("failed", "rejected"):
        return p
    if view.rejected is not None:
        return replace(p, outcome="rejected", reason=view.rejected)
    if view.failure is not None:
        return replace(p, outcome="failed", reason=view.failure)
    if p.split is not None and p.split.stage == "split":
        return _split_verdict(p, view, plan, now)
    passed = view.probation_passed and (plan.shadow is None or view.shadow_passed)
    running_it = view.current is not None and passed
    if p.healthy_since is not None and not running_it:
        return replace(p, outcome="failed", reason="stopped running the bundle")
    if p.outcome == "succeeded":
        return p
    if running_it:
        since = p.healthy_since if p.healthy_since is not None else now
        if now - since >= plan.min_healthy_s:
            return replace(p, outcome="succeeded", healthy_since=since)
        return replace(p, healthy_since=since)
    # A promoted device has the wave timeout again from its promotion to commit.
    started = p.split.decided_at if p.split is not None and p.split.decided_at else None
    if now - (started or p.published_at) > plan.wave_timeout_s:
        last = f" (last reported: {view.note})" if view.note else ""
        what = "passed in shadow and committed" if plan.shadow is not None else "committed"
        return replace(
            p,
            outcome="failed",
            reason=f"timeout: not {what} within {plan.wave_timeout_s:g}s{last}",
        )
    return p


def _halt(
    rollout: Rollout, devices: list[str], reason: str, now: float
) -> tuple[Rollout, Decision]:
    """Halt; the devices still splitting drop the candidate (the runner publishes what they
    served)."""
    progress = {
        d: replace(p, split=replace(p.split, stage="dropped", decided_at=now))
        if p.split is not None and p.split.stage == "split"
        else p
        for d, p in rollout.progress.items()
    }
    halted = replace(rollout, progress=progress, status="halted", reason=reason)
    return halted, Decision("halt", tuple(devices), reason)


def _rejection(rollout: Rollout) -> tuple[list[str], str] | None:
    """The devices that rejected the candidate (or where it was rejected), and why."""
    rejected = sorted(d for d, p in rollout.progress.items() if p.outcome == "rejected")
    if not rejected:
        return None
    reason = f"the candidate was rejected on {rejected[0]}: {rollout.progress[rejected[0]].reason}"
    if len(rejected) > 1:
        reason += f" (and on {len(rejected) - 1} more)"
    return rejected, reason


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
    rejection = _rejection(rollout)
    if rejection is not None:
        return _halt(rollout, *rejection, now)
    if rollout.failure_rate > rollout.plan.max_failure_rate:
        failed = sorted(d for d, p in progress.items() if p.outcome == "failed")
        reason = (
            f"{len(failed)} of {len(progress)} devices failed"
            f" ({rollout.failure_rate:.0%} > {rollout.plan.max_failure_rate:.0%})"
        )
        return _halt(rollout, failed, reason, now)
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
