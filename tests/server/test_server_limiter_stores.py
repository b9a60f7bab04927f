"""The shared failed-key-check limiter on each store (SQLite file, PostgreSQL, Redis) against
a reference token bucket, with an injected clock; and its atomicity across connections."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmagg.server import Database
from mmagg.server.ratelimit import DatabaseFailureLimiter, FailureLimiter, RedisFailureLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Reference:
    """The specification: one token bucket per client, in memory, one process."""

    def __init__(self, failures: int, period: float) -> None:
        self.capacity = float(failures)
        self.rate = failures / period
        self.buckets: dict[str, tuple[float, float]] = {}

    def tokens(self, client: str, now: float) -> float:
        if client not in self.buckets:
            return self.capacity
        tokens, updated = self.buckets[client]
        return min(self.capacity, tokens + max(0.0, now - updated) * self.rate)

    def retry_after(self, client: str, now: float) -> int:
        tokens = self.tokens(client, now)
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.rate))

    def failed(self, client: str, now: float) -> None:
        updated = max(self.buckets.get(client, (0.0, now))[1], now)
        self.buckets[client] = (max(0.0, self.tokens(client, now) - 1), updated)


# A store builds limiters on one shared backing store: (failures, period, clock, namespace).
MakeLimiter = Callable[[int, float, Clock, str], FailureLimiter]


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "redis"])
def make_limiter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeLimiter]:
    opened: list[FailureLimiter] = []
    prefix = f"mmagg-test-{uuid.uuid4().hex[:12]}:"
    if request.param == "redis":
        redis = pytest.importorskip("redis")
        connection = redis.Redis.from_url(REDIS_URL)
        try:
            connection.ping()
        except redis.RedisError as error:
            connection.close()
            pytest.skip(f"Redis not reachable ({error})")

        def make(failures: int, period: float, clock: Clock, namespace: str) -> FailureLimiter:
            limiter = RedisFailureLimiter(
                REDIS_URL, failures, period, clock=clock, namespace=namespace, key_prefix=prefix
            )
            opened.append(limiter)
            return limiter

        try:
            yield make
        finally:
            for limiter in opened:
                limiter.close()
            stale = list(connection.scan_iter(match=prefix + "*"))
            if stale:
                connection.delete(*stale)
            connection.close()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('limiter') / 'limiter.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    # Four Databases: separate connections and write locks, as separate processes have.
    databases = [Database(url) for _ in range(4)]
    made = [0]

    def make_db(failures: int, period: float, clock: Clock, namespace: str) -> FailureLimiter:
        made[0] += 1
        return DatabaseFailureLimiter(
            databases[made[0] % len(databases)],
            failures,
            period,
            clock=clock,
            namespace=prefix + namespace,
        )

    try:
        yield make_db
    finally:
        for db in databases:
            db.close()


operations = st.lists(
    st.tuples(
        st.sampled_from(["fail", "check", "wait"]),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]),
        # Negative waits: the next request reaches a process whose clock is behind.
        st.floats(min_value=-20.0, max_value=40.0, allow_nan=False),
    ),
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    failures=st.integers(min_value=1, max_value=5),
    period=st.sampled_from([60.0, 90.0, 300.0]),
    steps=operations,
)
def test_two_processes_behave_as_the_reference_bucket(
    make_limiter: MakeLimiter, failures: int, period: float, steps: list[tuple[str, str, float]]
) -> None:
    clock = Clock(1_700_000_000.0)
    namespace = uuid.uuid4().hex
    # Two limiters on one store: "processes" the requests alternate between.
    limiters = [make_limiter(failures, period, clock, namespace) for _ in range(2)]
    reference = Reference(failures, period)
    for n, (operation, client, seconds) in enumerate(steps):
        limiter = limiters[n % 2]
        if operation == "wait":
            clock.now += seconds
        elif operation == "fail":
            limiter.failed(client)
            reference.failed(client, clock.now)
        else:
            assert limiter.retry_after(client) == reference.retry_after(client, clock.now)
            assert limiter.tokens(client) == pytest.approx(reference.tokens(client, clock.now))
    for client in ("10.0.0.1", "10.0.0.2", "::1"):
        assert limiters[0].retry_after(client) == reference.retry_after(client, clock.now)


def test_concurrent_failures_each_take_exactly_one_token(make_limiter: MakeLimiter) -> None:
    clock = Clock(1_700_000_000.0)  # frozen: no refill while they race
    namespace = uuid.uuid4().hex
    limiters = [make_limiter(1_000, 3_600.0, clock, namespace) for _ in range(4)]
    start = threading.Barrier(len(limiters))

    def hammer(limiter: FailureLimiter) -> None:
        start.wait()
        for _ in range(50):
            limiter.failed("10.9.9.9")

    threads = [threading.Thread(target=hammer, args=(limiter,)) for limiter in limiters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiters[0].tokens("10.9.9.9") == 1_000 - 4 * 50


def test_an_empty_bucket_refuses_until_a_token_is_back(make_limiter: MakeLimiter) -> None:
    clock = Clock(1_700_000_000.0)
    limiter = make_limiter(2, 60.0, clock, uuid.uuid4().hex)
    limiter.failed("10.0.0.7")
    limiter.failed("10.0.0.7")
    limiter.failed("10.0.0.7")  # none below zero
    assert limiter.retry_after("10.0.0.7") == 30
    clock.now += 29.5
    assert limiter.retry_after("10.0.0.7") == 1
    clock.now += 0.5
    assert limiter.retry_after("10.0.0.7") == 0


def test_long_client_names_are_stored_hashed(make_limiter: MakeLimiter) -> None:
    clock = Clock(1_700_000_000.0)
    limiter = make_limiter(1, 60.0, clock, uuid.uuid4().hex)
    long_name = "x" * 1_000
    limiter.failed(long_name)
    assert limiter.retry_after(long_name) == 60
    assert limiter.retry_after("x" * 999) == 0
    assert len(limiter.key(long_name)) < 200


def test_redis_down_does_not_stop_key_checks(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    limiter = RedisFailureLimiter("redis://127.0.0.1:1/0", 1, 60.0, timeout=0.2)
    try:
        limiter.failed("10.0.0.1")
        assert limiter.retry_after("10.0.0.1") == 0
    finally:
        limiter.close()


def test_refilled_buckets_leave_the_store(make_limiter: MakeLimiter) -> None:
    clock = Clock(1_700_000_000.0)
    limiter = make_limiter(2, 60.0, clock, uuid.uuid4().hex)
    limiter.failed("10.0.0.8")
    if isinstance(limiter, RedisFailureLimiter):
        # Redis expires the hash once it would be full again.
        assert 0 < limiter._redis.pttl(limiter.key("10.0.0.8")) <= 60_000
        return
    clock.now += 60.5  # refilled; the next failure sweeps this limiter's full buckets
    limiter.failed("10.0.0.9")
    assert limiter._load(limiter.key("10.0.0.8"), None) is None
    assert limiter._load(limiter.key("10.0.0.9"), None) is not None
