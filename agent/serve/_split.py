"""Which requests an A/B split sends to the candidate: sticky by request key.

A request with a key goes to the candidate when ``blake2b(key, key=salt, digest_size=8)``,
read as a big-endian integer, is below ``share * 2**64``: the same key always gets the same
answer for a salt, across restarts and devices, and anyone holding the salt can tell where
a key went. A new salt (say, each candidate's digest) deals the keys anew. A request
without a key goes to the candidate with probability ``share``.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Union

__all__ = ["MAX_SALT_BYTES", "SplitRouter"]

MAX_SALT_BYTES = 64  # blake2b's longest key
_SPACE = 2**64  # the keyed hash's 8 bytes as an integer

Key = Union[str, bytes, None]


class SplitRouter:
    """Chooses, per request, between the candidate (``share`` of requests) and the serving
    version. Thread-safe."""

    def __init__(
        self, share: float, *, salt: bytes = b"", rng: random.Random | None = None
    ) -> None:
        """``rng`` draws for requests without a key (default: seeded from the OS).

        Raises:
            ValueError: ``share`` is not a number from 0 to 1, or ``salt`` is longer than
                :data:`MAX_SALT_BYTES`.
        """
        if isinstance(share, bool) or not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise ValueError(f"a split share is a number from 0 to 1, not {share!r}")
        if len(salt) > MAX_SALT_BYTES:
            raise ValueError(f"a split salt has at most {MAX_SALT_BYTES} bytes, not {len(salt)}")
        self.share = share
        self._salt = bytes(salt)
        # Exact integer threshold: share 1 takes every key, share 0 none.
        self._threshold = math.ceil(share * _SPACE)
        self._rng = random.Random() if rng is None else rng  # noqa: S311 - no secret: a fair coin

    def choose(self, key: Key) -> bool:
        """True when the request goes to the candidate. ``str`` keys count as their UTF-8."""
        if key is None:
            return self._rng.random() < self.share
        data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
        digest = hashlib.blake2b(data, key=self._salt, digest_size=8).digest()
        return int.from_bytes(digest, "big") < self._threshold
