"""One-time set-up happens before the first frame, and one HTTP pool serves each tenant.

Behaviour only (timing lives in benchmarks/first_call.py): the first ``run()`` of a new
block imports nothing and builds no HTTP client or TLS context on the caller's thread;
reporters of one tenant share one connection pool, other tenants never do; a forked child
builds its own; the pool closes with its last user.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import mmagg
from mmagg import MemoryCache, MemoryStore
from mmagg._http import live_pools
from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

KEY_A = "pool-test-key-a"
KEY_B = "pool-test-key-b"


def _run(code: str, url: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (URL bound); its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, "-c", f"URL = {url!r}\n" + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _aggregator(url: str, api_key: str, **kwargs: Any) -> mmagg.Aggregator:
    return mmagg.Aggregator(
        "m/1",
        frequency=60,
        api_key=api_key,
        api_base_url=url,
        store=MemoryStore(),
        cache=MemoryCache(),
        **kwargs,
    )


def test_first_run_of_a_new_block_does_no_setup_on_the_caller_thread(capture_server: Any) -> None:
    """In a fresh process: after the constructor, httpx is loaded and the tenant's pool
    exists; the first run() imports no module and builds no HTTP client or TLS context on
    any thread, and the report it leads to still arrives."""
    result = _run(
        """
        import json, sys, threading
        from mmagg import MemoryCache
        from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

        block = ModelMonitoringInferenceAggregatorBlockV1(
            cache=MemoryCache(), api_key="k-fresh", background_tasks=None,
            thread_pool_executor=None, api_base_url=URL)
        after_ctor = {"httpx": "httpx" in sys.modules, "payload": "mmagg.payload" in sys.modules}
        from mmagg._http import live_pools
        pools_after_ctor = live_pools()

        import httpx, ssl
        events = []  # (what, thread name) of every import / client / TLS context from now on

        class Recorder:
            def find_spec(self, name, path=None, target=None):
                events.append(("import " + name, threading.current_thread().name))
                return None

        sys.meta_path.insert(0, Recorder())
        client_init = httpx.Client.__init__
        def counting_init(self, *args, **kwargs):
            events.append(("httpx.Client", threading.current_thread().name))
            client_init(self, *args, **kwargs)
        httpx.Client.__init__ = counting_init
        context_new = ssl.SSLContext.__new__
        def counting_new(cls, *args, **kwargs):
            events.append(("SSLContext", threading.current_thread().name))
            return context_new(cls, *args, **kwargs)
        ssl.SSLContext.__new__ = counting_new

        preds = {"predictions": [{"class": "cat", "confidence": 0.9, "class_id": 0}]}
        first = block.run(True, preds, 60, "fresh-key", "m/1")
        on_first_run = list(events)
        reporter = block.reporter("fresh-key")
        delivered = reporter.flush(timeout=10)
        reporter.close(timeout=5)
        print(json.dumps({"after_ctor": after_ctor, "pools": pools_after_ctor,
                          "first": first, "on_first_run": on_first_run,
                          "delivered": delivered,
                          "sent": reporter.counters().sent}))
        """,
        capture_server.url,
    )
    assert result["after_ctor"] == {"httpx": True, "payload": True}
    assert result["pools"] == 1
    assert result["first"]["error_status"] is False
    assert result["on_first_run"] == []
    assert result["delivered"] is True and result["sent"] == 1
    posts = capture_server.wait_for_posts(1)
    assert [r["class_name"] for r in posts[0].json()["inference_results"]] == ["cat"]


def test_reporters_of_one_tenant_share_one_pool_other_tenants_never(
    capture_server: Any,
) -> None:
    url = capture_server.url
    a1, a2 = _aggregator(url, KEY_A), _aggregator(url, KEY_A)
    other_key = _aggregator(url, KEY_B)
    other_url = _aggregator(url + "/", KEY_A.upper())  # another key on the same backend
    try:
        pool = a1._reporter.exporter.client.http  # type: ignore[attr-defined]
        assert a1._reporter is not a2._reporter  # two aggregator keys, two reporters
        assert a2._reporter.exporter.client.http is pool  # type: ignore[attr-defined]
        assert other_key._reporter.exporter.client.http is not pool  # type: ignore[attr-defined]
        assert other_url._reporter.exporter.client.http is not pool  # type: ignore[attr-defined]
        # Each still reports under its own key, through its pool.
        for agg, name in ((a1, "a1"), (a2, "a2"), (other_key, "b")):
            agg.collect({"predictions": [{"class": name, "confidence": 0.5}]})
            assert agg.flush(timeout=10) is True
        keys = {p.query["api_key"][0] for p in capture_server.posts}
        assert keys == {KEY_A, KEY_B}
        by_key: dict[str, set[str]] = {}
        for post in capture_server.posts:
            classes = {r["class_name"] for r in post.json()["inference_results"]}
            by_key.setdefault(post.query["api_key"][0], set()).update(classes)
        assert by_key == {KEY_A: {"a1", "a2"}, KEY_B: {"b"}}
    finally:
        for agg in (a1, a2, other_key, other_url):
            agg.close(timeout=5)


def test_other_backends_never_share_a_pool(capture_server: Any) -> None:
    a = _aggregator(capture_server.url, KEY_A)
    b = _aggregator("http://127.0.0.1:9", KEY_A)
    try:
        assert a._reporter.exporter.client.http is not b._reporter.exporter.client.http  # type: ignore[attr-defined]
    finally:
        a.close(timeout=5)
        b.close(timeout=0)


def test_the_pool_closes_with_its_last_user(capture_server: Any) -> None:
    gc.collect()
    before = live_pools()
    a1, a2 = _aggregator(capture_server.url, KEY_A), _aggregator(capture_server.url, KEY_A)
    pool = a1._reporter.exporter.client.http  # type: ignore[attr-defined]
    assert live_pools() == before + 1
    a1.collect({"predictions": [{"class": "x", "confidence": 0.5}]})
    assert a1.close(timeout=5) is True
    assert live_pools() == before + 1 and not pool.is_closed  # a2 still uses it
    assert a2.close(timeout=5) is True
    assert live_pools() == before and pool.is_closed
    # A block holds its tenant's pool while it lives; its reporters use that pool.
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=KEY_A,
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=capture_server.url,
    )
    assert live_pools() == before + 1
    block.run(True, {"predictions": []}, 60, "pool-block", "m/1")
    reporter = block.reporter("pool-block")
    held = reporter.exporter.client.http  # type: ignore[attr-defined]
    agg = _aggregator(capture_server.url, KEY_A)
    assert agg._reporter.exporter.client.http is held  # type: ignore[attr-defined]
    agg.close(timeout=5)
    reporter.close(timeout=5)
    assert live_pools() == before + 1 and not held.is_closed
    del block
    gc.collect()
    assert live_pools() == before and held.is_closed


def test_disabled_block_builds_no_pool() -> None:
    gc.collect()
    before = live_pools()
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=None,
        background_tasks=None,
        thread_pool_executor=None,
        disable_sinks=True,
    )
    assert live_pools() == before
    assert block.run(True, None, 5, "k", "m/1")["error_status"] is False


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_builds_its_own_pool(capture_server: Any) -> None:
    result = _run(
        """
        import json, os
        import mmagg
        from mmagg import MemoryCache, MemoryStore

        agg = mmagg.Aggregator("m/1", frequency=60, api_key="fork-key", api_base_url=URL,
                               store=MemoryStore(), cache=MemoryCache())
        agg.collect({"predictions": [{"class": "parent", "confidence": 0.5}]})
        assert agg.flush(timeout=10)  # the parent's pool now holds a connection
        parent_pool = agg._reporter.exporter.client.http
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            agg.collect({"predictions": [{"class": "child", "confidence": 0.5}]})
            sent = agg.close(timeout=5)
            child_pool = agg._reporter.exporter.client.http
            os.write(write, json.dumps({
                "sent": sent,
                "same_pool": child_pool is parent_pool,
                "parent_pool_open": not parent_pool.is_closed,
            }).encode())
            os._exit(0)
        os.close(write)
        child = json.loads(os.read(read, 4096))
        os.waitpid(pid, 0)
        child["parent_still_sends"] = (
            agg.collect({"predictions": [{"class": "parent-2", "confidence": 0.5}]}) is not None
            and agg.flush(timeout=10)
        )
        child["parent_pool_open_after_child"] = not parent_pool.is_closed
        agg.close(timeout=5)
        print(json.dumps(child))
        """,
        capture_server.url,
    )
    assert result == {
        "sent": True,
        "same_pool": False,
        "parent_pool_open": True,  # the child never closes its parent's pool
        "parent_still_sends": True,
        "parent_pool_open_after_child": True,
    }
    classes = [
        r["class_name"]
        for p in capture_server.wait_for_posts(3)
        for r in p.json()["inference_results"]
    ]
    assert sorted(classes) == ["child", "parent", "parent-2"]


def test_docstring_examples_run() -> None:
    import doctest

    import mmagg._http

    failures, tried = doctest.testmod(mmagg._http, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_an_exporter_dropped_without_shutdown_gives_its_pool_back() -> None:
    from mmagg.client import HttpExporter

    gc.collect()
    before = live_pools()
    exporter = HttpExporter("dropped-key", api_base_url="http://127.0.0.1:9")
    pool = exporter.client.http
    assert live_pools() == before + 1
    del exporter
    gc.collect()
    assert live_pools() == before and pool.is_closed


def test_the_final_flush_at_exit_goes_through_the_pool(capture_server: Any) -> None:
    """The last window still goes out at interpreter exit through the tenant's pool (no
    finalizer closes it before the reporters' final flush), without a warning."""
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::ResourceWarning",
            "-c",
            textwrap.dedent(
                f"""
                import mmagg
                agg = mmagg.Aggregator("m/1", frequency=60, api_key="exit-key",
                                       api_base_url={capture_server.url!r})
                agg.collect({{"predictions": [{{"class": "first", "confidence": 0.5}}]}})
                assert agg.flush(timeout=10)  # the pool now holds a kept-alive connection
                agg.collect({{"predictions": [{{"class": "at-exit", "confidence": 0.5}}]}})
                """
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "ResourceWarning" not in out.stderr and "unclosed" not in out.stderr, out.stderr
    classes = [
        r["class_name"]
        for p in capture_server.wait_for_posts(2)
        for r in p.json()["inference_results"]
    ]
    assert classes == ["first", "at-exit"]


def test_a_close_that_gives_up_leaves_the_pool_to_the_send_in_flight(
    capture_server: Any,
) -> None:
    """close() past its deadline interrupts waits, not the request on the wire: the pool
    stays open for that send (its outcome still arrives), and is given back once the
    exporter is dropped."""
    import time

    from tests.conftest import Reply

    capture_server.replies.append(Reply(body={"status": "ok"}, delay=1.0))
    gc.collect()
    before = live_pools()
    agg = _aggregator(capture_server.url, "slow-key", request_timeout=5.0)
    agg.collect({"predictions": [{"class": "slow", "confidence": 0.5}]})
    pool = agg._reporter.exporter.client.http  # type: ignore[attr-defined]
    assert agg.close(timeout=0.2) is False  # the POST is still waiting for its answer
    assert not pool.is_closed
    assert len(capture_server.wait_for_posts(1)) == 1
    reporter = agg._reporter
    for _ in range(500):
        if reporter.counters().sent == 1:
            break
        time.sleep(0.02)
    assert reporter.counters().sent == 1
    assert reporter.counters().dropped.get("shutdown", 0) == 0  # corrected: it arrived
    del agg, reporter
    # The registry forgets closed reporters when it builds the next one.
    _aggregator(capture_server.url, "another-tenant").close(timeout=5)
    gc.collect()
    assert wait_for(lambda: gc.collect() >= 0 and live_pools() == before, 10.0)
    assert pool.is_closed


def wait_for(predicate: Any, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
