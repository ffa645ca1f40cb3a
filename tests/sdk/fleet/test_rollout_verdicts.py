"""The verdicts on a candidate, pure: the A/B rule (a table of numbers, each with the
verdict it must give), what shadow reports mean, and the plan's stages in the record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from agent.errors import ConfigError
from agent.messages.desired import ProbationRule, PromotionRule
from sdk.fleet._ab import SplitPlan, VersionStats, judge, version_stats
from sdk.fleet._reported import ReportedState, Signal, device_view
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import (
    DeviceProgress,
    DeviceView,
    Rollout,
    RolloutPlan,
    SplitState,
    step,
)

PLAN = SplitPlan(share=0.2, min_requests=100, min_labels=50)
SERVING = VersionStats(requests=1000, errors=10, p95_ms=2.0, labels=200, correct=190)
REF = BundleRef("http://h/b", "11" * 32, "cc" * 32, 7, "digits", "1.1.0")


@pytest.mark.parametrize(
    ("candidate", "promoted", "broken"),
    [
        (VersionStats(200, 2, 2.2, 60, 57), True, ""),
        # error rate 1% + 1% margin: 2% passes, 2.5% does not
        (VersionStats(200, 4, 2.0, 60, 57), True, ""),
        (VersionStats(200, 5, 2.0, 60, 57), False, "error rate 2.50% > 2.00%"),
        # p95 within 1.2x of 2.0 ms
        (VersionStats(200, 2, 2.5, 60, 57), False, "p95 2.50 ms > 2.40 ms"),
        (VersionStats(200, 2, None, 60, 57), True, ""),  # no p95 reported: not compared
        # accuracy 95% - 2%: 93% passes, 90% does not, but only with 50 labels each
        (VersionStats(200, 2, 2.0, 100, 90), False, "accuracy 90.0% < 93.0%"),
        (VersionStats(200, 2, 2.0, 40, 30), True, ""),
        (VersionStats(200, 9, 3.0, 100, 80), False, "error rate 4.50% > 2.00%; p95 3.00 ms"),
    ],
)
def test_the_ab_rule_promotes_only_a_candidate_within_every_margin(
    candidate: VersionStats, promoted: bool, broken: str
) -> None:
    ok, verdict = judge(candidate, SERVING, PLAN)
    assert ok is promoted
    assert verdict.startswith(broken)
    assert f"serving {SERVING.describe()}" in verdict


def test_version_stats_weigh_each_windows_p95_by_its_requests() -> None:
    rows = [
        {"requests": 100, "error_count": 1, "p95_ms": 2.0, "labels": 10, "correct": 9},
        {"requests": 300, "error_count": 0, "p95_ms": 4.0, "labels": None, "correct": None},
        {"requests": 0, "error_count": 0, "p95_ms": 90.0, "labels": 0, "correct": 0},
    ]
    assert version_stats(rows) == VersionStats(400, 1, 3.5, 10, 9)


def test_a_split_plan_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        SplitPlan(share=1.0)
    with pytest.raises(ConfigError, match="a shadow stage"):
        RolloutPlan((1.0,), 0.0, 0.0, shadow=PromotionRule(), split=PLAN)


def test_a_plans_stages_survive_the_record() -> None:
    plan = RolloutPlan((0.5, 1.0), 0.0, 1.0, shadow=PromotionRule(min_samples=50))
    assert RolloutPlan.from_json(plan.to_json()) == plan
    plan = RolloutPlan((1.0,), 0.0, 1.0, split=PLAN)
    assert RolloutPlan.from_json(plan.to_json()) == plan
    older = {k: v for k, v in plan.to_json().items() if k not in ("shadow", "split")}
    assert RolloutPlan.from_json(older) == replace(plan, split=None)


def sig(event: str, **fields: object) -> Signal:
    return Signal(event=event, received_at=10.0, digest=REF.digest, **fields)  # type: ignore[arg-type]


RUNS = ReportedState(current_digest=REF.digest, probation_digest=REF.digest, probation_passed=True)


@pytest.mark.parametrize(
    ("state", "signals", "passed", "rejected"),
    [
        (None, [sig("shadow-passed"), sig("committed")], True, None),
        (RUNS, [sig("committed")], False, None),  # committed after a shadow without a verdict
        (RUNS, [], True, None),  # ran it before it was published
        (ReportedState(shadow_digest=REF.digest, shadow_verdict="promote"), [], True, None),
        (None, [sig("shadow-rejected", reason="too slow", shadow="9 samples")], False,
         "shadow rejected: too slow (9 samples)"),
        (ReportedState(shadow_digest=REF.digest, shadow_verdict="reject",
                       shadow_numbers="80 samples"), [], False, "shadow rejected (80 samples)"),
        (ReportedState(shadow_digest=REF.digest, shadow_verdict="watching"), [], False, None),
    ],
)  # fmt: skip
def test_what_shadow_reports_mean_for_the_candidate(
    state: ReportedState | None, signals: list[Signal], passed: bool, rejected: str | None
) -> None:
    view = device_view(REF, state, signals, since=5.0, max_download_failures=3)
    assert (view.shadow_passed, view.rejected) == (passed, rejected)


def test_a_committed_device_without_a_shadow_verdict_does_not_succeed() -> None:
    plan = RolloutPlan((0.5, 1.0), 0.0, 0.0, wave_timeout_s=60.0, shadow=PromotionRule())
    rollout = Rollout("r1", "f", REF, ("d0", "d1"), plan, 0.0, wave=0,
                      progress={"d0": DeviceProgress("d0", 0, 1.0)})  # fmt: skip
    committed = DeviceView(current=REF.digest, probation_passed=True)
    rollout, decision = step(rollout, {"d0": committed}, now=2.0)
    assert (decision.action, rollout.progress["d0"].outcome) == ("wait", "pending")
    rollout, decision = step(rollout, {"d0": replace(committed, shadow_passed=True)}, now=3.0)
    assert (decision.action, decision.devices) == ("publish", ("d1",))


def test_a_split_device_is_decided_once_the_candidate_answered_enough() -> None:
    plan = RolloutPlan((1.0,), 0.0, 0.0, wave_timeout_s=60.0, split=PLAN)
    splitting = DeviceProgress("d0", 0, 1.0, split=SplitState("split", None))
    rollout = Rollout("r1", "f", REF, ("d0",), plan, 0.0, wave=0, progress={"d0": splitting})
    few = DeviceView(ab=(VersionStats(99, 0, 2.0), SERVING))
    rollout, decision = step(rollout, {"d0": few}, now=2.0)
    assert (decision.action, rollout.progress["d0"].split) == ("wait", SplitState("split", None))
    bad = DeviceView(ab=(VersionStats(100, 50, 2.0), SERVING))
    rollout, decision = step(rollout, {"d0": bad}, now=3.0)
    p = rollout.progress["d0"]
    assert (decision.action, rollout.status, p.outcome) == ("halt", "halted", "rejected")
    assert p.split is not None
    assert (p.split.stage, p.split.decided_at) == ("dropped", 3.0)
    assert p.reason is not None
    assert p.reason.startswith("A/B rejected: error rate 50.00% > 2.00%")


def test_a_plan_with_ground_truth_in_probation_survives_its_record_and_reaches_devices() -> None:
    from sdk.fleet.publish import desired_payload  # noqa: PLC0415
    from sdk.fleet.rollout import RolloutPlan  # noqa: PLC0415

    rule = ProbationRule(min_accuracy=0.92, min_feedback=40)
    plan = RolloutPlan(waves=(1.0,), max_failure_rate=0.0, min_healthy_s=0.0, probation=rule)
    assert RolloutPlan.from_json(plan.to_json()) == plan
    ref = BundleRef("http://x/b.edgeship", "a" * 64, "b" * 64, 3, "m", "1.3")
    payload = desired_payload("f", "d1", ref, rollout="r", ts=1.0, probation=rule)
    assert json.loads(payload)["probation"] == {"min_accuracy": 0.92, "min_feedback": 40}
