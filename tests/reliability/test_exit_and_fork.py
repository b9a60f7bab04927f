"""Exit and fork: a hung backend never holds the interpreter beyond the flush timeout,
a healthy one gets the last window, and a forked child never re-sends its parent's data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from reliability_support import SECRET_KEY, Reply

FLUSH_TIMEOUT = 1.0

PRELUDE = textwrap.dedent(
    """
    import json, os, sys, time
    import mmagg
    from mmagg import MemoryCache, MemoryStore

    URL, MODE = sys.argv[1], sys.argv[2]

    def frame(names, confidence=0.5):
        return {"predictions": [{"class": n, "confidence": confidence} for n in names]}
    """
)


def run_script(body: str, *args: str, timeout: float = 30.0) -> tuple[float, Any]:
    """Run ``body`` in a fresh interpreter; (seconds from its last line to its exit, result)."""
    script = PRELUDE + textwrap.dedent(body) + "\nprint('END', time.time(), flush=True)\n"
    env = {**os.environ, "MMAGG_FLUSH_TIMEOUT": str(FLUSH_TIMEOUT)}
    env.pop("MMAGG_REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    exited = time.time()
    assert proc.returncode == 0, proc.stderr
    assert SECRET_KEY not in proc.stdout + proc.stderr
    end = [line for line in proc.stdout.splitlines() if line.startswith("END ")]
    assert end, proc.stdout
    return exited - float(end[-1].split()[1]), proc


def _stats_count(body: dict[str, Any]) -> int:
    return sum(item["stats"]["count"] for item in body["inference_results"])


@pytest.mark.parametrize("aggregators", [1, 6])
@pytest.mark.parametrize("where", ["lookup", "post"])
def test_hung_backend_exit_within_flush_timeout(
    capture_server: Any, where: str, aggregators: int
) -> None:
    """One flush deadline for the whole exit, however many aggregators are stuck."""
    if where == "lookup":
        capture_server.on_lookup = lambda req: Reply(action="hang")
    else:
        capture_server.on_post = lambda req: Reply(action="hang")
    # The default request timeout (10 s) is far above the flush timeout: exit must not wait
    # for it, with a report in flight and more data pending.
    seconds, proc = run_script(
        f"""
        aggs = [
            mmagg.Aggregator("m/1", frequency=1, api_key={SECRET_KEY!r}, api_base_url=URL,
                             store=MemoryStore(), cache=MemoryCache())
            for _ in range({aggregators})
        ]
        for i in range(45):
            for agg in aggs:
                agg.collect(frame(["a", "b"]))
            time.sleep(1 / 30)
        for agg in aggs:
            agg.collect(frame(["c"]))
        """,
        capture_server.url,
        "hung",
    )
    assert seconds <= FLUSH_TIMEOUT + 1.0, f"exit took {seconds:.2f}s"
    # The dropped window is visible: one line says what was given up at exit.
    assert "dropped" in proc.stderr or "not sent" in proc.stderr, proc.stderr


def test_healthy_backend_gets_the_last_window_at_exit(capture_server: Any) -> None:
    seconds, _ = run_script(
        f"""
        agg = mmagg.Aggregator("m/1", frequency=60, api_key={SECRET_KEY!r}, api_base_url=URL,
                               store=MemoryStore(), cache=MemoryCache(), extensions=True)
        for i in range(30):
            agg.collect(frame(["a", "b", "c"], confidence=i / 30))
        """,
        capture_server.url,
        "healthy",
    )
    posts = capture_server.wait_for_posts(1, timeout=2)
    assert len(posts) == 1
    body = posts[0].json()
    assert _stats_count(body) == 90
    assert {r["class_name"]: r["confidence"] for r in body["inference_results"]} == {
        "a": 29 / 30,
        "b": 29 / 30,
        "c": 29 / 30,
    }
    assert seconds <= FLUSH_TIMEOUT + 1.0


@pytest.mark.parametrize("store", ["default", "explicit"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "send_in_flight"])
def test_fork_child_does_not_resend_parent_data(
    capture_server: Any, store: str, in_flight: bool
) -> None:
    """Parent collects class "parent", forks; the child collects "child" and exits; the
    parent then closes. Each report holds only its own process's predictions."""
    if in_flight:
        # The parent's first report hangs for a while: the child must neither wait for it
        # nor send it.
        capture_server.replies.append(Reply(body={"status": "ok"}, delay=1.5))
    _, proc = run_script(
        f"""
        store = MemoryStore() if MODE == "explicit" else None
        agg = mmagg.Aggregator("m/1", frequency=60, api_key={SECRET_KEY!r}, api_base_url=URL,
                               store=store, cache=MemoryCache(), extensions=True,
                               unique_aggregator_key="shared-key")
        for _ in range(10):
            agg.collect(frame(["parent"]))
        if {in_flight!r}:
            assert agg.flush(timeout=0.3) is False  # a send is now in flight
            for _ in range(5):
                agg.collect(frame(["parent"]))
        pid = os.fork()
        if pid == 0:
            for _ in range(7):
                agg.collect(frame(["child"]))
            ok = agg.close(timeout=3)
            print("CHILD", ok, dict(agg.counters.dropped), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        print("PARENT", agg.close(timeout=5), flush=True)
        """,
        capture_server.url,
        store,
    )
    assert "CHILD True" in proc.stdout, proc.stdout + proc.stderr
    assert "PARENT True" in proc.stdout, proc.stdout + proc.stderr
    posts = [p.json() for p in capture_server.posts]
    per_class: dict[str, int] = {}
    for body in posts:
        for item in body["inference_results"]:
            per_class[item["class_name"]] = (
                per_class.get(item["class_name"], 0) + item["stats"]["count"]
            )
    assert per_class == {"parent": 15 if in_flight else 10, "child": 7}, posts
    child_posts = [
        b for b in posts if any(r["class_name"] == "child" for r in b["inference_results"])
    ]
    assert len(child_posts) == 1
    assert [r["class_name"] for r in child_posts[0]["inference_results"]] == ["child"]
