"""The install state machine's decisions: pure functions of the persisted state.

The :class:`~agent.install.Updater` does the I/O around them; everything that decides
what may be installed, what to do after a restart, and what the state becomes on commit
or rollback is here, testable without a disk.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from agent.errors import RollbackError, StateError
from agent.install._store import AgentState, Failure

__all__ = [
    "ResumeAction",
    "check_acceptance",
    "commit_state",
    "resume_action",
    "rollback_state",
]


def check_acceptance(state: AgentState, *, sequence: int, digest: str, max_attempts: int) -> None:
    """May a verified bundle with this sequence and digest be installed? Pure.

    Raises:
        RollbackError: the sequence is below the floor, or equal to it with other content
            (only the version that set the floor may be installed again at that sequence).
        StateError: the digest used up its loop budget.
    """
    if state.floor is not None:
        if sequence < state.floor:
            raise RollbackError(
                f"bundle sequence {sequence} is below this device's floor {state.floor}; to"
                " return to older content, publish it again with a higher sequence"
            )
        if sequence == state.floor and digest != state.floor_digest:
            raise RollbackError(
                f"sequence {sequence} was already committed with other content; a new version"
                " needs a higher sequence"
            )
    if state.attempts_for(digest) >= max_attempts:
        raise StateError(
            f"version {digest[:12]} failed {state.attempts_for(digest)} install attempts (the"
            f" loop budget is {max_attempts}); it will not be tried again: publish a fixed"
            " bundle"
        )


ResumeAction = Literal["nothing", "fetch", "verify", "health-check", "roll-back"]


def resume_action(state: AgentState) -> ResumeAction:
    """What to do on start with the persisted state. Pure.

    An install continues from its last persisted phase; a candidate in probation is rolled
    back, because a restart in probation may well be the candidate's fault.
    """
    if state.pending is None:
        return "nothing"
    return {
        "downloading": "fetch",
        "verifying": "verify",
        "staged": "health-check",
        "health-check": "health-check",
        # Held in a stage (shadow, A/B split): gated again, then back in its stage.
        "shadow": "health-check",
        "split": "health-check",
        "probation": "roll-back",
    }[state.pending.phase]  # type: ignore[return-value]


def commit_state(state: AgentState) -> AgentState:
    """The state after the candidate in probation is committed. Pure.

    Raises:
        StateError: nothing is in probation.
    """
    p = state.pending
    if p is None or p.phase != "probation" or p.digest is None or p.sequence is None:
        raise StateError("no version is in probation; nothing to commit")
    floor, floor_digest = state.floor, state.floor_digest
    if floor is None or p.sequence > floor:
        floor, floor_digest = p.sequence, p.digest
    attempts = {k: v for k, v in state.attempts.items() if k != p.digest}
    previous = state.current if state.current != p.digest else state.previous
    return replace(
        state,
        current=p.digest,
        previous=previous,
        pending=None,
        floor=floor,
        floor_digest=floor_digest,
        attempts=attempts,
    )


def rollback_state(state: AgentState, reason: str, now: float) -> AgentState:
    """The state after rolling back. Pure.

    From probation: the candidate is dropped and ``current`` keeps serving. Otherwise an
    unfinished install is abandoned and ``current`` goes back to ``previous``.

    Raises:
        StateError: there is nothing to roll back to.
    """
    p = state.pending
    if p is not None and p.phase == "probation":
        failure = Failure("rolled-back", reason, now, digest=p.digest, phase="probation")
        return replace(state, pending=None, last_failure=failure)
    if state.previous is None:
        raise StateError("there is no previous version to roll back to")
    failure = Failure("rolled-back", reason, now, digest=state.current)
    return replace(state, current=state.previous, previous=None, pending=None, last_failure=failure)
