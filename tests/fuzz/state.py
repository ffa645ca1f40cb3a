"""Fuzz the reader of the agent's own state file (``state.json``).

A state file is the agent's, but a disk, a crash or a person can damage it; the agent
must then say so clearly (``StateError``, naming ``edgeship-agent recover-state``) rather
than fail with a traceback. Invariants: ``AgentState.from_bytes`` returns or raises
``StateError``; what it accepts writes back to bytes that read back to the same bytes.
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.errors import StateError
    from agent.install._store import AgentState


def target(data: bytes) -> None:
    try:
        state = AgentState.from_bytes(data)
    except StateError:
        return
    # Times are written to the millisecond: writing once is a fixed point.
    written = state.to_bytes()
    assert AgentState.from_bytes(written).to_bytes() == written


if __name__ == "__main__":
    run(target, "state")
