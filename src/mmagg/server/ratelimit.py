"""A per-client token bucket for failed key checks (dashboard login, `GET /?api_key=`).

Only failures take a token, so people who type their key right never wait; once a client's
bucket is empty every attempt is refused *before* the key is checked, otherwise a guesser
would still learn which key is right from the one answer that is not a 429. A success does
not refill the bucket: with a valid key of their own, an attacker could otherwise reset it
between guesses. State is in memory, per app instance.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailureLimiter:
    """At most `failures` failed attempts per `period` seconds per client, in bursts of
    `failures` (a token bucket refilled at `failures / period` per second).

    Example:
        >>> limiter = FailureLimiter(failures=2, period=60.0, clock=lambda: 0.0)
        >>> limiter.retry_after("10.0.0.1")
        0
        >>> limiter.failed("10.0.0.1"); limiter.failed("10.0.0.1")
        >>> limiter.retry_after("10.0.0.1")
        30
    """

    # Past this many tracked clients, buckets that have refilled are forgotten.
    MAX_CLIENTS = 10_000

    def __init__(
        self,
        failures: int = 10,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or period <= 0:
            raise ValueError(
                f"failures: expected >= 1 per a positive period, got {failures} per {period} s"
            )
        self.capacity = float(failures)
        self.rate = failures / period
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # Login runs in the thread pool: several requests may touch one bucket at once.
        self._lock = threading.Lock()

    def _refilled(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            return _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket

    def retry_after(self, client: str) -> int:
        """0 if `client` may try now, else the whole seconds until it may."""
        with self._lock:
            bucket = self._refilled(client, self._clock())
            if bucket.tokens >= 1:
                return 0
            return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def failed(self, client: str) -> None:
        """Take a token from `client`'s bucket for one failed attempt."""
        with self._lock:
            now = self._clock()
            bucket = self._refilled(client, now)
            bucket.tokens = max(0.0, bucket.tokens - 1)
            self._buckets[client] = bucket
            if len(self._buckets) > self.MAX_CLIENTS:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for client in list(self._buckets):
            if self._refilled(client, now).tokens >= self.capacity:
                del self._buckets[client]
        if len(self._buckets) > self.MAX_CLIENTS:
            # Still too many (a spread-out attack): keep the most recent half, so that
            # memory stays bounded and this sweep runs once per MAX_CLIENTS / 2 failures.
            recent = sorted(self._buckets.items(), key=lambda item: item[1].updated)
            self._buckets = dict(recent[-(self.MAX_CLIENTS // 2) :])
