"""Tenant isolation (issue 10 item 2): two backends, two API keys, one aggregator key.

Faces (blocks, aggregators, sinks) of different tenants that name their aggregator alike
never share a window, a reporter, an HTTP client or a Redis key; faces of the same tenant
and key share one aggregation and must agree on its settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.conftest import CaptureServer, FakeClock

import mmagg
from mmagg import MemoryCache
from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1
from mmagg.reporter import MESSAGE_NOT_IN_RANGE, ConfigMismatchError
from mmagg.sinks import MonitoringSink
from mmagg.stores import MemoryStore, Store

KEY_A = "tenant_A_SECRET_111"
KEY_B = "tenant_B_SECRET_222"
AGGREGATOR_KEY = "camera-1"
FRAMES = 6


@pytest.fixture
def servers() -> Iterator[tuple[CaptureServer, CaptureServer]]:
    a, b = CaptureServer("ws-a").start(), CaptureServer("ws-b").start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    """The store each tenant's face uses: one process-wide memory store, or two Redis
    stores on one server (two processes' worth of local state and connections)."""
    if request.param == "memory":
        shared = MemoryStore()
        yield shared, shared
        return
    from mmagg.stores.redis import RedisStore

    url = request.getfixturevalue("redis_url")
    one, two = RedisStore(url, push_interval=0.01), RedisStore(url, push_interval=0.01)
    try:
        yield one, two
    finally:
        one.close()
        two.close()


Feed = Callable[[str, float], None]


def make_face(
    kind: str, server: CaptureServer, api_key: str, store: Store, cache: MemoryCache, clock: Any
) -> tuple[Feed, Callable[[], bool]]:
    """A face of one tenant: ``feed(class_name, confidence)`` and ``close()``."""
    if kind == "block":
        block = ModelMonitoringInferenceAggregatorBlockV1(
            cache=cache,
            api_key=api_key,
            background_tasks=None,
            thread_pool_executor=None,
            api_base_url=server.url,
            store=store,
            extensions=True,
            clock=clock,
        )

        def feed(name: str, confidence: float) -> None:
            result = block.run(
                False,
                {"predictions": [{"class": name, "confidence": confidence}]},
                1,
                AGGREGATOR_KEY,
                "m/1",
            )
            assert result["error_status"] is False, result

        return feed, lambda: block.reporter(AGGREGATOR_KEY).close(timeout=5)
    options: dict[str, Any] = dict(
        frequency=1,
        api_key=api_key,
        api_base_url=server.url,
        fire_and_forget=False,
        unique_aggregator_key=AGGREGATOR_KEY,
        store=store,
        extensions=True,
        clock=clock,
    )
    if kind == "aggregator":
        agg = mmagg.Aggregator("m/1", **options)

        def feed(name: str, confidence: float) -> None:
            result = agg.collect({"predictions": [{"class": name, "confidence": confidence}]})
            assert result["error_status"] is False, result

        return feed, lambda: agg.close(timeout=5)
    sink = MonitoringSink.for_model("m/1", **options)

    def feed_sink(name: str, confidence: float) -> None:
        sink({"predictions": [{"class": name, "confidence": confidence}]})

    return feed_sink, lambda: sink.close(timeout=5)


def delivered(server: CaptureServer) -> dict[str, int]:
    """Predictions per class the server received (from the per-class statistics)."""
    counts: dict[str, int] = {}
    for post in server.posts:
        for item in post.json()["inference_results"]:
            counts[item["class_name"]] = counts.get(item["class_name"], 0) + item["stats"]["count"]
    return counts


def keys_seen(server: CaptureServer) -> set[str]:
    return {key for request in server.requests for key in request.query.get("api_key", [])}


@pytest.mark.parametrize("kind", ["block", "aggregator", "sink"])
def test_two_tenants_with_one_aggregator_key_never_mix(
    kind: str, servers: tuple[CaptureServer, CaptureServer], stores: tuple[Store, Store]
) -> None:
    server_a, server_b = servers
    cache = MemoryCache()  # one process-wide cache, as in an inference server
    clock = FakeClock()
    feed_a, close_a = make_face(kind, server_a, KEY_A, stores[0], cache, clock)
    feed_b, close_b = make_face(kind, server_b, KEY_B, stores[1], cache, clock)
    for i in range(FRAMES):
        feed_a("apple", 0.5 + i / 100)
        feed_b("banana", 0.6 + i / 100)
        feed_b("cherry", 0.7)
        clock.advance(0.6)
    assert close_a() and close_b()

    assert delivered(server_a) == {"apple": FRAMES}
    assert delivered(server_b) == {"banana": FRAMES, "cherry": FRAMES}
    assert keys_seen(server_a) == {KEY_A}
    assert keys_seen(server_b) == {KEY_B}
    for server, other_key in ((server_a, KEY_B), (server_b, KEY_A)):
        for request in server.requests:
            assert other_key.encode() not in request.body
            assert other_key not in str(request.query) and other_key not in str(request.headers)


def test_redis_keys_are_tenant_scoped_and_carry_no_api_key(
    servers: tuple[CaptureServer, CaptureServer], redis_url: str
) -> None:
    import redis

    from mmagg.stores.redis import RedisStore

    store = RedisStore(redis_url, push_interval=60)
    try:
        aggregators = [
            mmagg.Aggregator(
                "m/1",
                api_key=key,
                api_base_url=server.url,
                unique_aggregator_key=AGGREGATOR_KEY,
                store=store,
            )
            for key, server in ((KEY_A, servers[0]), (KEY_B, servers[1]))
        ]
        for agg, name in zip(aggregators, ("apple", "banana"), strict=True):
            agg.collect({"predictions": [{"class": name, "confidence": 0.5}]})
        assert store.push()
        client = redis.Redis.from_url(redis_url)
        try:
            names = sorted(k.decode() for k in client.keys("mmagg:*"))
            fields = {
                k: sorted(f.decode() for f in client.hkeys(k)) for k in names if k.endswith(":best")
            }
        finally:
            client.close()
        best = sorted(fields)
        assert len(best) == 2, names  # one shared-state key set per tenant
        assert all(AGGREGATOR_KEY in name for name in names)
        assert not any(KEY_A in n or KEY_B in n for n in names)
        assert [len(fields[k]) for k in best] == [1, 1]  # each holds its own class only
        assert {f for k in best for f in fields[k]} == {
            '["m/1","apple",""]',
            '["m/1","banana",""]',
        }
        for agg in aggregators:
            assert agg.close(timeout=5)
    finally:
        store.close()
    for server, name in zip(servers, ("apple", "banana"), strict=True):
        sent = {r["class_name"] for p in server.posts for r in p.json()["inference_results"]}
        assert sent == {name}


def test_same_tenant_and_key_share_one_aggregation(
    servers: tuple[CaptureServer, CaptureServer],
) -> None:
    server = servers[0]
    store = MemoryStore()
    clock = FakeClock()
    make = lambda: mmagg.Aggregator(  # noqa: E731
        "m/1",
        frequency=2,
        api_key=KEY_A,
        api_base_url=server.url + "/",  # the same backend, spelled with a trailing slash
        fire_and_forget=False,
        unique_aggregator_key=AGGREGATOR_KEY,
        store=store,
        extensions=True,
        clock=clock,
    )
    one, two = make(), make()
    one.collect({"predictions": [{"class": "apple", "confidence": 0.4}]})
    two.collect({"predictions": [{"class": "apple", "confidence": 0.9}]})
    two.collect({"predictions": [{"class": "pear", "confidence": 0.3}]})
    clock.advance(2)
    assert one.collect(None)["message"] == "Data sent successfully"
    (post,) = server.posts
    results = {r["class_name"]: r for r in post.json()["inference_results"]}
    assert {k: (r["confidence"], r["stats"]["count"]) for k, r in results.items()} == {
        "apple": (0.9, 2),
        "pear": (0.3, 1),
    }
    assert one.counters == two.counters  # one reporter
    assert one.close(timeout=5) and two.close(timeout=5)


@pytest.mark.parametrize(
    ("setting", "first", "second"),
    [("frequency", 5, 10), ("extensions", False, True), ("flush_timeout", 1.0, 2.0)],
)
def test_same_tenant_and_key_with_other_settings_is_a_clear_error(
    servers: tuple[CaptureServer, CaptureServer], setting: str, first: Any, second: Any
) -> None:
    server_a, server_b = servers
    store = MemoryStore()

    def make(server: CaptureServer, key: str, value: Any) -> mmagg.Aggregator:
        return mmagg.Aggregator(
            "m/1",
            api_key=key,
            api_base_url=server.url,
            unique_aggregator_key=AGGREGATOR_KEY,
            store=store,
            **{setting: value},
        )

    agg = make(server_a, KEY_A, first)
    with pytest.raises(ConfigMismatchError) as raised:
        make(server_a, KEY_A, second)
    text = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert f"{setting}={first!r} (asked: {second!r})" in text
    assert AGGREGATOR_KEY in text and KEY_A not in text
    # Another tenant with the same aggregator key is free to choose its own settings.
    other = make(server_b, KEY_B, second)
    other_key = make(server_a, KEY_B, second)  # same backend, another API key
    for face in (agg, other, other_key):
        face.close(timeout=0)
    # Once the first is closed, the key can be reused with new settings.
    again = make(server_a, KEY_A, second)
    again.close(timeout=0)


def test_block_run_at_another_frequency_for_a_live_key_is_a_clear_error(
    servers: tuple[CaptureServer, CaptureServer],
) -> None:
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=KEY_A,
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=servers[0].url,
        store=MemoryStore(),
    )
    first = block.run(True, None, 5, AGGREGATOR_KEY, "m/1")
    assert first == {"error_status": False, "message": MESSAGE_NOT_IN_RANGE}
    with pytest.raises(ValueError, match=r"frequency=5 \(asked: 10\)"):
        block.run(True, None, 10, AGGREGATOR_KEY, "m/1")
    assert block.reporter(AGGREGATOR_KEY).frequency == 5
    assert block.reporter(AGGREGATOR_KEY).close(timeout=0)
    assert block.run(True, None, 10, AGGREGATOR_KEY, "m/1")["error_status"] is False
    assert block.reporter(AGGREGATOR_KEY).frequency == 10
    block.reporter(AGGREGATOR_KEY).close(timeout=0)


def test_two_tenants_in_two_processes_share_one_redis_but_no_data(
    servers: tuple[CaptureServer, CaptureServer], redis_url: str
) -> None:
    import multiprocessing

    from redis_workers import stream_one_tenant  # tests/stores is on sys.path

    ctx = multiprocessing.get_context("spawn")
    frames = 60
    procs = [
        ctx.Process(
            target=stream_one_tenant,
            args=(redis_url, server.url, key, AGGREGATOR_KEY, name, frames),
        )
        for server, key, name in (
            (servers[0], KEY_A, "apple"),
            (servers[1], KEY_B, "banana"),
            (servers[0], KEY_A, "avocado"),  # a second replica of tenant A: shares with it
        )
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert delivered(servers[0]) == {"apple": frames, "avocado": frames}
    assert delivered(servers[1]) == {"banana": frames}
    assert keys_seen(servers[0]) == {KEY_A}
    assert keys_seen(servers[1]) == {KEY_B}
