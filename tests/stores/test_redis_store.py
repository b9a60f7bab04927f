"""Redis-only behaviour: Lua merge parity, one winner, outages, fork, cost, selection."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_workers import claim_in_loop, claim_once  # tests/stores is on sys.path

from mmagg.predictions import to_batch
from mmagg.stores import Store, resolve_store
from mmagg.stores.redis import RedisStore, redact_url
from mmagg.window import HISTOGRAM_BUCKETS, ClassStats, Key, Sample, Window


@pytest.fixture
def stores(redis_url: str) -> Iterator[list[RedisStore]]:
    made: list[RedisStore] = []
    yield made
    for store in made:
        store.close()


def new_store(made: list[RedisStore], url: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, **kwargs)
    made.append(store)
    return store


def frame(*items: tuple[str, float]) -> Any:
    return to_batch({"predictions": [{"class": n, "confidence": c} for n, c in items]})


# -- Lua merge == Window.merge ---------------------------------------------------------------

texts = st.one_of(
    st.sampled_from(["", "a", "b", "é", "\ud800", "a\x00b", '"']), st.text(max_size=6)
)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def windows(draw: st.DrawFn) -> Window:
    window = Window(max_classes=10_000)
    best: dict[Key, Sample] = {}
    stats: dict[Key, ClassStats] = {}
    for _ in range(draw(st.integers(0, 6))):
        key = (draw(st.sampled_from(["m/1", "m/2"])), draw(texts), draw(st.sampled_from(["", "c"])))
        best[key] = Sample(
            class_name=key[1],
            confidence=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), finite)),
            inference_id=draw(texts),
            model_type=draw(texts),
            model_id=key[0],
            source_id=key[2],
            seen_at=draw(st.sampled_from([0.0, 1.5, 1e9 + 0.123456])),
            seq=draw(st.integers(0, 3)),
        )
        if draw(st.booleans()):
            low, high = sorted([draw(finite), draw(finite)])
            stats[key] = ClassStats(
                draw(st.integers(1, 10**6)),
                draw(finite),
                low,
                high,
                draw(st.lists(st.integers(0, 1000), min_size=10, max_size=10)),
            )
    window.merge_entries(best, stats)
    window.rejected_nonfinite = draw(st.integers(0, 3))
    window.dropped_max_classes = draw(st.integers(0, 3))
    return window


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(parts=st.lists(windows(), min_size=1, max_size=5), max_classes=st.sampled_from([2, 100]))
def test_lua_merge_equals_window_merge(
    redis_url: str, parts: list[Window], max_classes: int
) -> None:
    expected = Window(max_classes=max_classes)
    for part in parts:
        expected.merge_in(part)
    store = RedisStore(redis_url, prefix=f"prop-{uuid.uuid4().hex}", max_classes=max_classes)
    try:
        for part in parts:
            store.give_back("k", part)
        got = store.take("k")
    finally:
        store.close()
    want_best, want_stats, want_rejected, want_dropped = expected.snapshot()
    got_best, got_stats, got_rejected, got_dropped = got.snapshot()
    assert got_best == want_best
    assert got_stats == want_stats
    assert (got_rejected, got_dropped) == (want_rejected, want_dropped)
    assert store.counters()["push_failures"] == 0


# -- one winner --------------------------------------------------------------------------------


def test_threads_claiming_at_once_exactly_one_wins(
    redis_url: str, stores: list[RedisStore]
) -> None:
    team = [new_store(stores, redis_url) for _ in range(8)]
    for i, store in enumerate(team):
        store.window("k").add(frame(("cat", i / 10)), model_id="m")
    assert all(store.claim("k", 1) is None for store in team)  # Redis TIME starts it
    time.sleep(1.05)
    barrier = threading.Barrier(len(team))
    results: list[Window | None] = [None] * len(team)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = team[i].claim("k", 1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(team))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [w for w in results if w is not None]
    assert len(won) == 1
    assert won[0].to_results()[0]["confidence"] == pytest.approx(0.7)


def test_processes_claiming_at_once_exactly_one_wins(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    key = f"proc-{uuid.uuid4().hex}"
    procs = [
        ctx.Process(target=claim_once, args=(redis_url, key, i, barrier, results)) for i in range(4)
    ]
    for proc in procs:
        proc.start()
    won = [results.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    assert sorted(won) == [False, False, False, True]


def test_processes_polling_win_one_interval_each(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    key = f"poll-{uuid.uuid4().hex}"
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=claim_in_loop, args=(redis_url, key, 3.5, ready, go, results))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=30)
    go.set()
    per_process = [results.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    end = max(end for _, end in per_process)
    times = sorted(t for wins, _ in per_process for t in wins)
    assert len(times) >= 2, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Never two winners in one interval, and no interval skipped while everyone polls.
    assert all(0.99 <= gap <= 1.15 for gap in gaps), gaps
    assert end - times[-1] < 1.15


def test_a_caller_pacing_itself_wins_every_interval(
    redis_url: str, stores: list[RedisStore]
) -> None:
    # Its own clock says "due" a little before the shared interval ends (the interval
    # started when Redis answered); the claim waits out the difference instead of missing.
    store = new_store(stores, redis_url)
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    own_start = time.monotonic()
    assert store.claim("k", 1) is None
    for n in (1, 2):
        time.sleep(max(0.0, own_start + n - time.monotonic()))
        assert store.claim("k", 1) is not None, n
    assert store.counters()["claims_won"] == 2


def test_nothing_is_lost_while_pushes_and_takes_race_the_caller(
    redis_url: str, stores: list[RedisStore]
) -> None:
    store = new_store(stores, redis_url, push_interval=0.005)
    held = store.window("k")  # the caller may keep the object: it is never swapped out
    batch = frame(("cat", 0.5), ("dog", 0.25))
    added = 0

    def caller() -> None:
        # At least 3,000 frames, and on until pushes have raced the takes more than once
        # (a fast or a starved caller alike), within a bound.
        nonlocal added
        deadline = time.monotonic() + 20
        while added < 3000 or (store.counters()["pushes"] < 2 and time.monotonic() < deadline):
            held.add(batch, model_id="m")
            added += 1

    thread = threading.Thread(target=caller)
    thread.start()
    counted = 0
    while thread.is_alive():
        counted += sum(s.count for s in store.take("k").stats().values())
        time.sleep(0.002)
    thread.join()
    counted += sum(s.count for s in store.take("k").stats().values())
    assert counted == 2 * added
    assert store.counters()["pushes"] > 1


# -- outages -----------------------------------------------------------------------------------


def test_outage_keeps_data_reports_locally_logs_once_and_rejoins(
    own_redis: Any, stores: list[RedisStore], clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = new_store(stores, own_redis.url, clock=clock, push_interval=60, reconnect_interval=0.01)
    store.window("k").add(frame(("cat", 0.4)), model_id="m")
    assert store.claim("k", 1) is None and store.healthy
    own_redis.kill()
    caplog.set_level(logging.WARNING, logger="mmagg.stores.redis")
    store.window("k").add(frame(("cat", 0.9), ("dog", 0.3)), model_id="m")
    assert store.push() is False
    time.sleep(0.02)
    assert store.push() is False
    assert store.degraded and store.counters()["outages"] == 1
    assert store.counters()["push_failures"] == 2
    clock.advance(1)
    time.sleep(0.02)
    local = store.claim("k", 1)  # Redis is down: this process reports by itself
    assert local is not None
    assert {r["class_name"]: r["confidence"] for r in local.to_results()} == {
        "cat": 0.9,
        "dog": 0.3,
    }
    assert store.counters()["local_claims"] == 1
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    own_redis.start()  # back, empty
    store.window("k").add(frame(("bird", 0.5)), model_id="m")
    time.sleep(0.02)
    assert store.push() is True and store.healthy
    taken = store.take("k")
    # What was already reported locally is not pushed again.
    assert [r["class_name"] for r in taken.to_results()] == ["bird"]
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


def test_failed_push_is_kept_and_pushed_after_restart(
    own_redis: Any, stores: list[RedisStore]
) -> None:
    store = new_store(stores, own_redis.url, push_interval=60, reconnect_interval=0.01)
    store.window("k").add(frame(("cat", 0.6)), model_id="m")
    own_redis.kill()
    assert store.push() is False
    own_redis.start()
    time.sleep(0.02)
    assert store.push() is True
    other = new_store(stores, own_redis.url)
    assert [r["confidence"] for r in other.take("k").to_results()] == [0.6]


def test_give_back_goes_to_redis_and_stays_local_when_down(
    own_redis: Any, stores: list[RedisStore]
) -> None:
    one = new_store(stores, own_redis.url, push_interval=60, reconnect_interval=0.01)
    two = new_store(stores, own_redis.url, push_interval=60)
    failed = Window()
    failed.add(frame(("cat", 0.8)), model_id="m")
    one.give_back("k", failed)
    assert one.counters()["given_back"] == 1
    assert [r["confidence"] for r in two.take("k").to_results()] == [0.8]
    own_redis.kill()
    one.give_back("k", failed)
    assert one.degraded
    own_redis.start()
    time.sleep(0.02)
    assert [r["confidence"] for r in one.take("k").to_results()] == [0.8]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_caller_never_waits_on_a_hung_redis(own_redis: Any, stores: list[RedisStore]) -> None:
    store = new_store(
        stores, own_redis.url, push_interval=0.01, reconnect_interval=0.01, socket_timeout=2.0
    )
    batch = frame(("cat", 0.5))
    store.window("k").add(batch, model_id="m")
    assert store.push()
    own_redis.process.send_signal(signal.SIGSTOP)  # round trips now hang until the timeout
    try:
        slowest = 0.0
        started = time.perf_counter()
        # Past the socket timeout, so the hung push has failed and the store degraded.
        while time.perf_counter() - started < 2.6:
            t0 = time.perf_counter()
            store.window("k").add(batch, model_id="m")
            slowest = max(slowest, time.perf_counter() - t0)
        assert store.degraded
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    # A wait on Redis would take the 2 s socket timeout; a preempted caller on a loaded
    # 2-core machine is seen well under 1 s (per-call cost is measured in benchmarks/).
    assert slowest < 1.0


def test_log_never_shows_the_password(
    stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"redis://user:s3cret-pw@127.0.0.1:{_closed_port()}/0?password=s3cret-pw"
    store = new_store(stores, closed, push_interval=60)
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    caplog.set_level(logging.WARNING, logger="mmagg.stores.redis")
    assert store.push() is False
    assert caplog.records and all("s3cret" not in r.getMessage() for r in caplog.records)
    assert "s3cret" not in repr(store) and "degraded" in repr(store)
    assert store.safe_url == f"redis://***@127.0.0.1:{closed.split(':')[3].split('/')[0]}/0"
    assert redact_url("rediss://:pw@[::1]:6380/1") == "rediss://***@[::1]:6380/1"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- fork ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_inherit_the_parent_window(
    redis_url: str, stores: list[RedisStore]
) -> None:
    store = new_store(stores, redis_url, push_interval=60)
    store.window("k").add(frame(("cat", 0.5)), model_id="m")
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = store.window("k").is_empty() and store.take("k").is_empty()
            store.window("k").add(frame(("dog", 0.1)), model_id="m")
            ok = ok and store.push()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read)
    taken = {r["class_name"] for r in store.take("k").to_results()}
    assert taken == {"cat", "dog"}  # the parent's own, plus what the child pushed


# -- cost ---------------------------------------------------------------------------------------


def test_round_trips_stay_bounded_at_any_frame_rate(
    redis_url: str, stores: list[RedisStore]
) -> None:
    store = new_store(stores, redis_url)
    batch = frame(("cat", 0.5), ("dog", 0.7))
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        store.window("k").add(batch, model_id="m")
        store.claim("k", 1)  # a reporter polling every frame
    elapsed = time.monotonic() - started
    assert store.counters()["claims_won"] >= 1
    assert store.counters()["round_trips"] <= 4 * elapsed + 2


def test_keys_carry_prefix_and_ttl(redis_url: str, stores: list[RedisStore]) -> None:
    store = new_store(stores, redis_url, prefix="app", ttl=30)
    assert store.keys_for("cam") == [
        "app:{cam}:best",
        "app:{cam}:stats",
        "app:{cam}:meta",
        "app:{cam}:clock",
    ]
    store.window("cam").add(frame(("cat", 0.5)), model_id="m")
    store.claim("cam", 20)
    with redis.Redis.from_url(redis_url) as client:
        best, stats, meta, clock = (client.pttl(k) for k in store.keys_for("cam"))
    assert meta == -2  # nothing rejected or dropped: no key
    assert all(59_000 < ttl <= 60_000 for ttl in (best, stats, clock))  # 3 intervals > ttl
    store.window("cam").add(frame(("cat", 0.5)), model_id="m")
    store._frequency["cam"] = 5  # as a later claim with frequency 5 would record
    assert store.push()
    with redis.Redis.from_url(redis_url) as client:
        assert 29_000 < client.pttl(store.keys_for("cam")[0]) <= 30_000


# -- selection ----------------------------------------------------------------------------------


def test_shared_instance_and_resolution(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore.for_url(redis_url)
    assert store is RedisStore.for_url(redis_url)
    assert store.shared is True
    assert store.shared is True
    assert isinstance(store, Store)
    assert resolve_store(redis_url) is store
    monkeypatch.setenv("MMAGG_REDIS_URL", redis_url)
    assert resolve_store() is store
    store.close()


def test_import_mmagg_does_not_import_redis() -> None:
    code = (
        "import sys, mmagg, mmagg.stores, mmagg.window, mmagg.block, mmagg.aggregator\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_histogram_bucket_count_matches_lua() -> None:
    # The Lua scripts sum whatever length they get; the wire format says 10.
    assert HISTOGRAM_BUCKETS == 10


@pytest.mark.parametrize("name", ["mmagg.stores", "mmagg.stores.memory", "mmagg.stores.redis"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
