"""Backoff: an exponential ceiling with full jitter, reset by a success."""

from __future__ import annotations

import pytest

from agent.plumbing.backoff import Backoff


def waits(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next() for _ in range(n)]


def test_the_ceiling_doubles_from_the_initial_wait_up_to_the_maximum() -> None:
    top = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    assert waits(top, 8) == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60], rel=1e-5)


def test_each_wait_is_drawn_below_the_ceiling() -> None:
    draws = iter([0.5, 0.25, 0.1])
    assert waits(Backoff(2.0, 60.0, rand=lambda: next(draws)), 3) == pytest.approx([1, 1, 0.8])


def test_a_reset_starts_again_from_the_initial_wait() -> None:
    backoff = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    waits(backoff, 5)
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next() == pytest.approx(1.0, rel=1e-5)


def test_a_wait_never_drops_to_a_hot_loop() -> None:
    assert Backoff(1.0, 60.0, rand=lambda: 0.0).next() == 0.05
    assert Backoff(5.0, 300.0, min_s=2.5, rand=lambda: 0.0).next() == 2.5


def test_thousands_of_failures_stay_at_the_maximum() -> None:
    backoff = Backoff(1.0, 60.0, rand=lambda: 0.999999)
    assert max(waits(backoff, 5000)) == pytest.approx(60.0, rel=1e-5)


@pytest.mark.parametrize(("initial_s", "max_s", "min_s"), [(0, 1, 0), (2, 1, 0), (1, 2, -1)])
def test_nonsense_settings_are_refused(initial_s: float, max_s: float, min_s: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial_s, max_s, min_s=min_s)
