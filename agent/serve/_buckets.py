"""Per-client token buckets: the HTTP endpoint's rate limit and its TLS warning limit."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """Per-client token buckets, bounded in the number of clients. Thread-safe."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def take(self, client: str) -> float:
        """0.0 if ``client`` may proceed (one token taken), else seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self._rate
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait
