"""The state machine's decisions and probation's verdicts, as pure functions."""

from __future__ import annotations

import pytest

from agent.bundle.manifest import Probation
from agent.errors import RollbackError, StateError
from agent.install._store import AgentState, Pending
from agent.install._updater import check_acceptance, commit_state, resume_action, rollback_state
from agent.serve._slot import judge_probation

A = "a" * 64
B = "b" * 64
C = "c" * 64


def _probation(digest: str = C, sequence: int = 6) -> Pending:
    return Pending("probation", "src", digest=digest, sequence=sequence)


def test_first_install_is_accepted_at_any_sequence() -> None:
    check_acceptance(AgentState(), sequence=0, digest=A, max_attempts=3)


def test_sequence_below_the_floor_is_refused() -> None:
    with pytest.raises(RollbackError, match="below this device's floor 5"):
        check_acceptance(AgentState(floor=5, floor_digest=A), sequence=4, digest=B, max_attempts=3)


def test_equal_sequence_is_accepted_for_the_version_that_set_the_floor() -> None:
    check_acceptance(AgentState(floor=5, floor_digest=A), sequence=5, digest=A, max_attempts=3)


def test_equal_sequence_with_other_content_is_refused() -> None:
    with pytest.raises(RollbackError, match="already committed with other content"):
        check_acceptance(AgentState(floor=5, floor_digest=A), sequence=5, digest=B, max_attempts=3)


def test_equal_sequence_is_refused_when_the_floor_digest_is_unknown() -> None:
    with pytest.raises(RollbackError):
        check_acceptance(AgentState(floor=5), sequence=5, digest=A, max_attempts=3)


def test_higher_sequence_is_accepted() -> None:
    check_acceptance(AgentState(floor=5, floor_digest=A), sequence=6, digest=B, max_attempts=3)


def test_digest_that_used_up_its_loop_budget_is_refused() -> None:
    state = AgentState().with_attempt(B).with_attempt(B)
    check_acceptance(state, sequence=1, digest=B, max_attempts=3)
    with pytest.raises(StateError, match="loop budget is 3"):
        check_acceptance(state.with_attempt(B), sequence=1, digest=B, max_attempts=3)


@pytest.mark.parametrize(
    ("phase", "action"),
    [
        ("downloading", "fetch"),
        ("verifying", "verify"),
        ("staged", "health-check"),
        ("health-check", "health-check"),
        ("probation", "roll-back"),
    ],
)
def test_resume_continues_each_phase_or_rolls_back_probation(phase: str, action: str) -> None:
    state = AgentState(pending=Pending(phase, "src"))  # type: ignore[arg-type]
    assert resume_action(state) == action


def test_resume_without_a_pending_install_does_nothing() -> None:
    assert resume_action(AgentState(current=A)) == "nothing"


def test_commit_makes_the_candidate_current_and_raises_the_floor() -> None:
    state = AgentState(
        current=A,
        previous=B,
        pending=_probation(),
        floor=5,
        floor_digest=A,
        attempts={C: 1, B: 2},
    )
    new = commit_state(state)
    assert (new.current, new.previous, new.pending) == (C, A, None)
    assert (new.floor, new.floor_digest) == (6, C)
    assert new.attempts == {B: 2}


def test_commit_at_the_floor_sequence_keeps_the_floor_and_its_digest() -> None:
    state = AgentState(current=B, floor=9, floor_digest=C, pending=_probation(sequence=9))
    new = commit_state(state)
    assert (new.floor, new.floor_digest) == (9, C)


def test_commit_without_probation_is_refused() -> None:
    with pytest.raises(StateError, match="nothing to commit"):
        commit_state(AgentState(current=A))


def test_rollback_in_probation_drops_the_candidate_and_keeps_current() -> None:
    state = AgentState(current=A, previous=B, pending=_probation())
    new = rollback_state(state, "p95 too high", now=10.0)
    assert (new.current, new.previous, new.pending) == (A, B, None)
    assert new.last_failure is not None
    assert (new.last_failure.outcome, new.last_failure.digest) == ("rolled-back", C)
    assert new.last_failure.reason == "p95 too high"


def test_rollback_by_hand_returns_to_previous() -> None:
    new = rollback_state(AgentState(current=A, previous=B, floor=7), "by hand", now=1.0)
    assert (new.current, new.previous, new.floor) == (B, None, 7)
    assert new.last_failure is not None
    assert new.last_failure.digest == A


def test_rollback_without_previous_is_refused() -> None:
    with pytest.raises(StateError, match="no previous version"):
        rollback_state(AgentState(current=A), "by hand", now=1.0)


WINDOW = Probation(requests=100, seconds=60.0, max_error_rate=0.05, max_p95_ms=10.0)


def _judge(window: Probation = WINDOW, **kw: object) -> str:
    args: dict[str, object] = {"requests": 0, "errors": 0, "latencies_s": [], "elapsed_s": 0.0}
    args.update(kw)
    return judge_probation(window, **args).state  # type: ignore[arg-type]


def test_probation_keeps_watching_inside_its_window() -> None:
    assert _judge(requests=50, errors=2, latencies_s=[0.001] * 48, elapsed_s=10.0) == "watching"


def test_probation_passes_after_its_request_count() -> None:
    assert _judge(requests=100, errors=5, latencies_s=[0.001] * 95) == "passed"


def test_probation_passes_after_its_time_even_with_little_traffic() -> None:
    assert _judge(requests=3, latencies_s=[0.001] * 3, elapsed_s=60.0) == "passed"


def test_probation_breaches_early_once_the_error_budget_is_certainly_exceeded() -> None:
    assert _judge(requests=6, errors=6, elapsed_s=1.0) == "breached"


def test_probation_breaches_on_error_rate_at_the_end_of_the_window() -> None:
    assert _judge(requests=10, errors=1, latencies_s=[0.001] * 9, elapsed_s=60.0) == "breached"


def test_probation_breaches_on_p95_latency_at_the_end_of_the_window() -> None:
    latencies = [0.001] * 90 + [0.05] * 10
    verdict = judge_probation(WINDOW, requests=100, errors=0, latencies_s=latencies, elapsed_s=5.0)
    assert verdict.state == "breached"
    assert "p95 latency 50 ms" in verdict.reason


def test_probation_with_an_empty_window_passes_at_once() -> None:
    assert _judge(Probation(requests=0, seconds=0.0)) == "passed"
