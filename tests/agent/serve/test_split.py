"""The A/B split: the candidate's share of requests, sticky by key, dealt anew by salt."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from agent.plumbing.compat import zip_strict
from agent.serve._split import MAX_SALT_BYTES, SplitRouter

N = 20_000
KEYS = [f"user-{i}" for i in range(N)]
SIGMAS = 4.5


def _within_binomial(hits: int, n: int, p: float) -> bool:
    """Whether ``hits`` of ``n`` draws lies within SIGMAS binomial sd of ``n * p``."""
    return abs(hits - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_candidate_gets_its_share_of_distinct_keys(share: float) -> None:
    router = SplitRouter(share, salt=b"candidate-digest")
    hits = sum(router.choose(k) for k in KEYS)
    assert _within_binomial(hits, N, share), hits


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_consecutive_keys_are_not_dealt_in_runs(share: float) -> None:
    # Sequential ids (user-0, user-1, ...) must spread like any others: each half of them
    # holds its own share.
    router = SplitRouter(share, salt=b"s")
    for half in (KEYS[: N // 2], KEYS[N // 2 :]):
        assert _within_binomial(sum(router.choose(k) for k in half), len(half), share)


def test_the_same_key_always_gets_the_same_answer() -> None:
    router = SplitRouter(0.3, salt=b"sticky")
    keys = KEYS[:1000]
    first = [router.choose(k) for k in keys]
    for _ in range(3):
        assert [router.choose(k) for k in reversed(keys)] == first[::-1]
    # Another router with the same salt (a restart, another device) agrees.
    assert [SplitRouter(0.3, salt=b"sticky").choose(k) for k in keys] == first


def test_a_str_key_is_its_utf8_bytes() -> None:
    router = SplitRouter(0.5, salt=b"u")
    keys = [*KEYS[:500], "clé-ü-€", "\U0001f600"]
    assert [router.choose(k) for k in keys] == [router.choose(k.encode()) for k in keys]


def test_the_choice_is_the_documented_keyed_hash() -> None:
    # The fleet side can tell where a key went from the salt alone.
    salt, share = bytes(range(32)), 0.2
    router = SplitRouter(share, salt=salt)
    for k in KEYS[:2000]:
        digest = hashlib.blake2b(k.encode(), key=salt, digest_size=8).digest()
        assert router.choose(k) is (int.from_bytes(digest, "big") < share * 2**64)


def test_another_salt_deals_the_keys_anew() -> None:
    share = 0.5
    a = [SplitRouter(share, salt=b"candidate-a").choose(k) for k in KEYS]
    b = [SplitRouter(share, salt=b"candidate-b").choose(k) for k in KEYS]
    assert _within_binomial(sum(b), N, share)
    # Independent deals: a key is the candidate's under both salts with probability share².
    both = sum(x and y for x, y in zip_strict(a, b))
    assert _within_binomial(both, N, share * share), both


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_requests_without_a_key_go_to_the_candidate_at_random_with_the_share(
    share: float,
) -> None:
    router = SplitRouter(share, rng=random.Random(14))
    hits = sum(router.choose(None) for _ in range(N))
    assert _within_binomial(hits, N, share), hits


def test_requests_without_a_key_are_not_sticky() -> None:
    router = SplitRouter(0.5, rng=random.Random(7))
    answers = {router.choose(None) for _ in range(100)}
    assert answers == {True, False}


@pytest.mark.parametrize(("share", "expected"), [(0.0, False), (1.0, True)])
def test_shares_zero_and_one_send_nobody_or_everybody(share: float, expected: bool) -> None:
    router = SplitRouter(share, salt=b"edge", rng=random.Random(0))
    assert {router.choose(k) for k in KEYS[:2000]} == {expected}
    assert {router.choose(None) for _ in range(2000)} == {expected}
    assert router.choose(b"") is expected


@pytest.mark.parametrize("share", [-0.1, 1.5, math.nan, math.inf, True])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        SplitRouter(share)


def test_a_salt_longer_than_blake2b_keys_is_refused() -> None:
    SplitRouter(0.5, salt=b"s" * MAX_SALT_BYTES)
    with pytest.raises(ValueError, match="salt"):
        SplitRouter(0.5, salt=b"s" * (MAX_SALT_BYTES + 1))
