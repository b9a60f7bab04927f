"""A per-client token bucket for failed key checks (dashboard login, `GET /?api_key=`, and
every other keyed route), shared by every backend process.

Only failures take a token, so people who type their key right never wait; once a client's
bucket is empty every attempt is refused *before* the key is checked, otherwise a guesser
would still learn which key is right from the one answer that is not a 429. A success does
not refill the bucket: with a valid key of their own, an attacker could otherwise reset it
between guesses.

The buckets live where every process sees them, so N processes (`mmagg serve --workers N`,
or instances behind a load balancer) give a guesser the budget of one:

- `DatabaseFailureLimiter`: a row per client in `failure_buckets`, taken from by one
  `INSERT ... ON CONFLICT DO UPDATE` (atomic on SQLite and PostgreSQL alike);
- `RedisFailureLimiter` (`mmagg serve --redis-url`, extra `mmagg[redis]`): a hash per client,
  taken from by one Lua script, expiring once it would have refilled.

A client with no stored bucket has a full one. Times come from `clock` (wall-clock seconds:
processes on several machines compare them); tests inject one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from mmagg.server.db import Database, LimitCheck

logger = logging.getLogger("mmagg.server")

# Longest stored client key; longer ones (an odd X-Forwarded-For entry) are hashed.
MAX_CLIENT_KEY = 160  # failure_buckets.client is String(160)


class FailureLimiter(ABC):
    """At most `failures` failed attempts per `period` seconds per client, in bursts of
    `failures` (a token bucket refilled at `failures / period` per second).

    `namespace` separates limiters sharing one store (tests give each its own).

    Example:
        >>> limiter = DatabaseFailureLimiter(Database("sqlite://"), failures=2, period=60.0,
        ...                                  clock=lambda: 0.0)
        >>> limiter.retry_after("10.0.0.1")
        0
        >>> limiter.failed("10.0.0.1"); limiter.failed("10.0.0.1")
        >>> limiter.retry_after("10.0.0.1")
        30
    """

    def __init__(
        self,
        failures: int = 10,
        period: float = 60.0,
        *,
        clock: Callable[[], float] = time.time,
        namespace: str = "login",
    ) -> None:
        if failures < 1 or period <= 0:
            raise ValueError(
                f"failures: expected >= 1 per a positive period, got {failures} per {period} s"
            )
        self.capacity = float(failures)
        self.period = float(period)
        self.rate = failures / period
        self.namespace = namespace
        self._clock = clock

    def key(self, client: str) -> str:
        """Where `client`'s bucket is stored: `namespace:client` (hashed when too long)."""
        key = f"{self.namespace}:{client}"
        if len(key) > MAX_CLIENT_KEY:
            key = f"{self.namespace}:#" + hashlib.sha256(client.encode()).hexdigest()
        return key

    def tokens(self, client: str, conn: Connection | None = None) -> float:
        """Tokens left in `client`'s bucket now (`capacity` when nothing is stored).

        `conn`: an open connection to the backend's database that a database store reads
        through instead of checking out its own (the key check that follows uses it too).
        """
        return self._tokens(self._load(self.key(client), conn))

    def _tokens(self, stored: tuple[float, float] | None) -> float:
        if stored is None:
            return self.capacity
        tokens, updated = stored
        elapsed = max(0.0, self._clock() - updated)
        return min(self.capacity, tokens + elapsed * self.rate)

    def retry_after(self, client: str, conn: Connection | None = None) -> int:
        """0 if `client` may try now, else the whole seconds until it may (`conn`: as for
        `tokens`)."""
        return self.wait(self._load(self.key(client), conn))

    def wait(self, stored: tuple[float, float] | None) -> int:
        """`retry_after` for a bucket read already: its stored (tokens, updated) or None."""
        tokens = self._tokens(stored)
        if tokens >= 1:
            return 0
        return max(1, math.ceil((1 - tokens) / self.rate))

    def failed(self, client: str) -> None:
        """Take a token from `client`'s bucket for one failed attempt (none below zero)."""
        self._take(self.key(client), self._clock())

    def close(self) -> None:  # noqa: B027 - most stores hold nothing of their own
        """Release connections the limiter holds of its own (none by default)."""

    @abstractmethod
    def _load(self, key: str, conn: Connection | None) -> tuple[float, float] | None:
        """The stored (tokens, updated) of bucket `key`, None when there is none."""

    @abstractmethod
    def _take(self, key: str, now: float) -> None:
        """Refill bucket `key` up to `now`, then take one token, in one atomic step."""


# `excluded` is the row the INSERT proposed: a first failure leaves capacity - 1 tokens;
# later ones refill for the time since the last (never backwards: clocks of several
# machines differ) and take one.
_TAKE_SQL = """
INSERT INTO failure_buckets (client, tokens, updated) VALUES ({p}, {p}, {p})
ON CONFLICT (client) DO UPDATE SET
    tokens = {max}(0.0, {min}({p}, failure_buckets.tokens
        + {max}(0.0, excluded.updated - failure_buckets.updated) * {p}) - 1.0),
    updated = {max}(failure_buckets.updated, excluded.updated)
"""
_LOAD_SQL = "SELECT tokens, updated FROM failure_buckets WHERE client = {p}"
# Buckets that refilled completely (`period` after their last failure) mean the same as none.
# By prefix with substr, not a range: a locale's collation may not order ':' before ';'.
_SWEEP_SQL = "DELETE FROM failure_buckets WHERE updated < {p} AND substr(client, 1, {p}) = {p}"


class DatabaseFailureLimiter(FailureLimiter):
    """`FailureLimiter` with its buckets in the backend's database (table `failure_buckets`).

    Every keyed request reads its client's row (a primary-key lookup); a failure writes it
    with one upsert. Rows of buckets that have refilled are deleted at most once a `period`.
    """

    def __init__(
        self,
        db: Database,
        failures: int = 10,
        period: float = 60.0,
        *,
        clock: Callable[[], float] = time.time,
        namespace: str = "login",
    ) -> None:
        super().__init__(failures, period, clock=clock, namespace=namespace)
        self.db = db
        p = "?" if db.dialect == "sqlite" else "%s"
        bigger, smaller = ("max", "min") if db.dialect == "sqlite" else ("greatest", "least")
        self._take_sql = _TAKE_SQL.format(p=p, max=bigger, min=smaller)
        self._load_sql = _LOAD_SQL.format(p=p)
        self._sweep_sql = _SWEEP_SQL.format(p=p)
        self._swept = -math.inf
        self._sweep_lock = threading.Lock()

    def deferred(self, client: str) -> LimitCheck:
        """The check of `client`'s bucket for the transaction storing its report to make
        (`PendingReport.limit`): ingest with a key checked lately reads no bucket before."""
        return LimitCheck(self.key(client), self.wait)

    def _load(self, key: str, conn: Connection | None) -> tuple[float, float] | None:
        if conn is None:
            with self.db.read() as own:
                return self._load(key, own)
        # The DBAPI cursor directly: this runs before every key check, ingest included.
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self._load_sql, (key,))
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else (float(row[0]), float(row[1]))

    def _take(self, key: str, now: float) -> None:
        with self.db.write() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(
                    self._take_sql, (key, self.capacity - 1, now, self.capacity, self.rate)
                )
                if self._sweep_due(now):
                    prefix = f"{self.namespace}:"  # this limiter's buckets only
                    cursor.execute(self._sweep_sql, (now - self.period, len(prefix), prefix))
            finally:
                cursor.close()

    def _sweep_due(self, now: float) -> bool:
        with self._sweep_lock:
            if now - self._swept < self.period:
                return False
            self._swept = now
            return True


# KEYS[1] the bucket; ARGV capacity, rate, now, expiry in ms. Same arithmetic as _TAKE_SQL.
_TAKE_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local stored = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = capacity
local updated = now
if stored[1] then
    local last = tonumber(stored[2])
    tokens = math.min(capacity, tonumber(stored[1]) + math.max(0, now - last) * rate)
    updated = math.max(last, now)
end
tokens = math.max(0, tokens - 1)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', updated))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Seconds between two warnings about an unreachable Redis.
_WARN_EVERY = 60.0


class RedisFailureLimiter(FailureLimiter):
    """`FailureLimiter` with its buckets in Redis (`mmagg serve --redis-url`).

    A bucket is a hash `{key_prefix}{namespace}:{client}` that expires `period` seconds
    (Redis's clock) after its last failure, when it would be full again. While Redis cannot
    be reached, key checks are not limited (logged once a minute): ingest must not stop
    because the limiter's store did.
    """

    def __init__(
        self,
        url: str,
        failures: int = 10,
        period: float = 60.0,
        *,
        clock: Callable[[], float] = time.time,
        namespace: str = "login",
        key_prefix: str = "mmagg:failures:",
        timeout: float = 0.5,
    ) -> None:
        super().__init__(failures, period, clock=clock, namespace=namespace)
        import redis  # the optional extra: imported only when Redis is asked for

        from mmagg.stores.redis import _CONNECTION_OPTIONS

        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self.key_prefix = key_prefix
        self._redis: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, **_CONNECTION_OPTIONS
        )
        self._script: Any = self._redis.register_script(_TAKE_LUA)
        self._expiry_ms = max(1, math.ceil(self.period * 1000))
        self._warned = -math.inf

    def key(self, client: str) -> str:
        """The Redis key of `client`'s bucket."""
        return self.key_prefix + super().key(client)

    def ping(self) -> None:
        """Raise the client's error when Redis cannot be reached (checked at start-up)."""
        self._redis.ping()

    def close(self) -> None:
        """Close the connection pool."""
        self._redis.close()

    def _load(self, key: str, conn: Connection | None) -> tuple[float, float] | None:
        try:
            tokens, updated = self._redis.hmget(key, "tokens", "updated")
        except self._errors as error:
            self._warn(error)
            return None
        if tokens is None or updated is None:
            return None
        return float(tokens), float(updated)

    def _take(self, key: str, now: float) -> None:
        try:
            self._script(keys=[key], args=[self.capacity, self.rate, repr(now), self._expiry_ms])
        except self._errors as error:
            self._warn(error)

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            logger.warning(
                "mmagg: Redis unreachable, failed key checks are not limited: %s",
                type(error).__name__,
            )
