"""CPU priority values and the clocks that time a model on a busy device."""

from __future__ import annotations

import time

import pytest

from agent.plumbing.sched import check_priority, cpu_wait_s, model_clocks


def test_gate_priority_values() -> None:
    assert check_priority("idle") == "idle"
    assert check_priority("normal") == "normal"
    assert check_priority(19) == 19
    for bad in (0, 20, -1, True, "low", 1.5, None):
        with pytest.raises(ValueError, match="idle"):
            check_priority(bad)


def test_model_clocks_never_count_more_than_the_wall_clock() -> None:
    wall_minus_wait, process_cpu = model_clocks()
    t0 = time.perf_counter()
    w0, c0 = wall_minus_wait(), process_cpu()
    sum(range(200_000))
    w1, c1 = wall_minus_wait(), process_cpu()
    t1 = time.perf_counter()
    assert 0 < w1 - w0 <= t1 - t0
    assert c1 - c0 > 0
    assert cpu_wait_s() >= 0
