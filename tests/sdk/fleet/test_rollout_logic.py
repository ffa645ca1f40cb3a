"""The rollout's pure decisions: waves, settling, advancing, halting."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.errors import ConfigError
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import (
    DeviceProgress,
    DeviceView,
    Rollout,
    RolloutPlan,
    parse_waves,
    step,
    wave_order,
    wave_sizes,
)

DIGEST = "d" * 64
REF = BundleRef("http://h/b.edgeship", "s" * 64, DIGEST, 7, "digits", "1.1.0")
OK = DeviceView(current=DIGEST, probation_passed=True)
FAILED = DeviceView(failure="rolled-back: health check failed")


def make(n: int = 10, *, rate: float = 0.1, healthy_s: float = 5.0) -> Rollout:
    plan = RolloutPlan(
        waves=(0.1, 0.5, 1.0), max_failure_rate=rate, min_healthy_s=healthy_s, wave_timeout_s=60
    )
    devices = tuple(f"d{i:02}" for i in range(n))
    return Rollout("r1", "f", REF, devices, plan, created_at=0.0)


def publish(r: Rollout, devices: tuple[str, ...], now: float) -> Rollout:
    progress = dict(r.progress)
    for d in devices:
        progress[d] = DeviceProgress(d, r.wave, now)
    return replace(r, progress=progress)


def test_parse_waves_reads_percentages() -> None:
    assert parse_waves("1%,10%,50%,100%") == (0.01, 0.1, 0.5, 1.0)


@pytest.mark.parametrize("text", ["10%,5%,100%", "10%,50%", "0%,100%", "a,100%", "50%,50%,100%"])
def test_parse_waves_refuses_bad_plans(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_waves(text)


def test_wave_sizes_start_with_at_least_one_device_and_end_with_all() -> None:
    assert wave_sizes(200, (0.01, 0.1, 0.5, 1.0)) == [2, 20, 100, 200]
    assert wave_sizes(3, (0.01, 0.1, 0.5, 1.0)) == [1, 1, 2, 3]


def test_wave_order_is_stable_per_rollout_and_differs_between_rollouts() -> None:
    devices = tuple(f"d{i}" for i in range(20))
    assert wave_order("a", devices) == wave_order("a", devices)
    assert wave_order("a", devices) != wave_order("b", devices)
    assert sorted(wave_order("a", devices)) == sorted(devices)


def test_the_first_step_publishes_the_first_wave() -> None:
    r, decision = step(make(), {}, now=0.0)
    assert decision.action == "publish"
    assert decision.devices == ("d00",)
    assert r.wave == 0


def test_a_wave_waits_until_its_devices_stayed_healthy_for_the_minimum_time() -> None:
    r, d = step(make(), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    r, decision = step(r, {"d00": OK}, now=1.0)
    assert decision.action == "wait"
    r, decision = step(r, {"d00": OK}, now=5.9)
    assert decision.action == "wait"
    r, decision = step(r, {"d00": OK}, now=6.0)
    assert decision.action == "publish"
    assert decision.devices == ("d01", "d02", "d03", "d04")


def test_a_device_that_is_current_but_not_through_probation_is_not_healthy() -> None:
    r, d = step(make(healthy_s=0), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    r, decision = step(r, {"d00": DeviceView(current=DIGEST)}, now=30.0)
    assert decision.action == "wait"


def test_the_last_wave_settled_completes_the_rollout() -> None:
    r = make(n=2, healthy_s=0)
    views: dict[str, DeviceView] = {}
    for now in range(10):
        r, d = step(r, views, float(now))
        if d.action == "publish":
            r = publish(r, d.devices, float(now))
            views.update(dict.fromkeys(d.devices, OK))
        if d.action == "complete":
            break
    assert r.status == "completed"
    assert r.counts()["succeeded"] == 2


def test_failures_over_the_threshold_halt_and_name_the_devices() -> None:
    r, d = step(make(rate=0.0), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    r, decision = step(r, {"d00": FAILED}, now=1.0)
    assert decision.action == "halt"
    assert decision.devices == ("d00",)
    assert r.status == "halted"
    assert "1 of 1" in (r.reason or "")


def test_failures_within_the_threshold_let_the_rollout_go_on() -> None:
    r = make(n=10, rate=0.5, healthy_s=0)
    r = publish(replace(r, wave=1), r.devices[:5], 0.0)
    views = dict.fromkeys(r.devices[:4], OK) | {r.devices[4]: FAILED}
    r, decision = step(r, views, now=1.0)
    assert decision.action == "publish"
    assert decision.devices == r.devices[5:]


def test_a_device_silent_past_the_wave_timeout_counts_as_failed() -> None:
    r, d = step(make(rate=0.0), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    r, decision = step(r, {}, now=61.0)
    assert decision.action == "halt"
    assert "timeout" in (r.progress["d00"].reason or "")


def test_a_device_that_stops_running_the_bundle_after_passing_fails() -> None:
    r, d = step(make(rate=0.0, healthy_s=10), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    r, _ = step(r, {"d00": OK}, now=1.0)
    r, decision = step(r, {"d00": DeviceView()}, now=2.0)
    assert decision.action == "halt"


def test_a_stopped_rollout_does_nothing() -> None:
    r = replace(make(), status="aborted")
    assert step(r, {}, 0.0) == (r, step(r, {}, 0.0)[1])
    assert step(r, {}, 0.0)[1].action == "none"


def test_a_plan_round_trips_through_json() -> None:
    plan = RolloutPlan(
        (0.5, 1.0), 0.2, 3.0, 40.0, True, max_download_failures=5, runner_timeout_s=9
    )
    assert RolloutPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    "bad", [{"max_download_failures": 0}, {"runner_timeout_s": 0.0}, {"max_failure_rate": 1.0}]
)
def test_a_plan_refuses_settings_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RolloutPlan(**({"waves": (1.0,), "max_failure_rate": 0.0, "min_healthy_s": 0.0} | bad))  # type: ignore[arg-type]


def test_a_timeout_says_what_the_device_reported_last() -> None:
    r, d = step(make(rate=0.0), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    view = DeviceView(note="installing (downloading)")
    r, decision = step(r, {"d00": view}, now=61.0)
    assert decision.action == "halt"
    assert r.progress["d00"].reason == (
        "timeout: not committed within 60s (last reported: installing (downloading))"
    )


def test_devices_of_a_wave_not_yet_acknowledged_are_listed_as_such() -> None:
    r, d = step(make(), {}, 0.0)
    r = publish(r, d.devices, 0.0)
    assert r.unacknowledged == ["d00"]
    assert replace(r, acked_wave=0).unacknowledged == []
