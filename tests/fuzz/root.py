"""Fuzz the trust root and heartbeat readers and the rules that believe them.

Each input is a file a device receives on ``edgeship/v1/<fleet>/trust/root`` or
``.../trust/heartbeat`` (or fetches as ``root/<N>.json``); the seeds are root v2 signed
as a rotation must be, by the old keys only, unsigned, and heartbeats. Invariants: every
reader and rule returns or raises a ``TrustError``; an accepted root is version 2, signed
by 2 of root v1's 3 root keys, and its own document reads back the same from its
canonical bytes with printable text; an accepted heartbeat is for this fleet, signed by
the freshness key and fresh at ``NOW``.
"""

from __future__ import annotations

from datetime import timedelta

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.bundle.heartbeat import heartbeat_envelope, read_heartbeat
    from agent.bundle.root import TrustRoot, read_root
    from agent.bundle.trust import verify_heartbeat, verify_root
    from agent.errors import TrustError

from tests.support.hostile import assert_printable
from tests.support.trust import (
    FLEET,
    NOW,
    ONLINE,
    ROOT_A,
    ROOT_B,
    ROOT_C,
    believed,
    first_root,
    signed,
)

SLACK_S = 300.0
V1 = believed(
    signed(
        first_root(root_keys=(ROOT_A, ROOT_B, ROOT_C), root_threshold=2, freshness=(ONLINE,)),
        ROOT_A,
        ROOT_B,
    )
)
OLD_ROOT_KEYS = {ROOT_A.keyid, ROOT_B.keyid, ROOT_C.keyid}


def _read(data: bytes) -> None:
    try:
        _, root = read_root(data, unsigned=True)
    except TrustError:
        pass
    else:
        assert_printable(root.to_json())
        assert TrustRoot.from_payload(root.to_payload()) == root
    try:
        beat = read_heartbeat(data)
    except TrustError:
        return
    assert_printable(beat.to_json())
    assert beat.expires > beat.issued


def target(data: bytes) -> None:
    _read(data)
    try:
        new = verify_root(data, V1, fleet=FLEET)
    except TrustError:
        pass
    else:
        assert new.version == 2
        assert new.envelope == data
        envelope, _ = read_root(data)
        assert len({s.keyid for s in envelope.signatures} & OLD_ROOT_KEYS) >= 2
    try:
        beat = verify_heartbeat(data, V1, fleet=FLEET, now=NOW, last=None, slack_s=SLACK_S)
    except TrustError:
        return
    assert beat.fleet == FLEET
    slack = timedelta(seconds=SLACK_S)
    assert beat.issued - slack <= NOW <= beat.expires + slack
    assert ONLINE.keyid in {s.keyid for s in heartbeat_envelope(data).signatures}


if __name__ == "__main__":
    run(target, "root")
