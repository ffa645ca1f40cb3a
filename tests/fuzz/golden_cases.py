"""Fuzz the device's reader of golden case files (``health.cases``, schema 1.2).

A signed bundle's case files are the publisher's, but a device reads them at every install
and a buggy or hostile build may write anything the signature then covers. Invariants:
reading an ``.npz`` and splitting it into cases returns or raises ``HealthCheckError``
(a failed health gate, never a traceback); what it accepts holds only cases below the
count, each with at least one array.
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.bundle.arrays import read_npz, split_cases
    from agent.errors import HealthCheckError

COUNT = 3


def target(data: bytes) -> None:
    try:
        cases = split_cases(read_npz(data, "cases.npz"), COUNT, "cases.npz")
    except HealthCheckError as exc:
        assert "\n" not in str(exc)  # noqa: PT017 - a fuzz invariant, not a test
        return
    assert len(cases) == COUNT
    assert all(cases)


if __name__ == "__main__":
    run(target, "golden_cases", max_len=8192)
