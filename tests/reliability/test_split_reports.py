"""A window over the backend's body limit goes as several reports, never dropped whole.

A capture server on loopback enforces a body limit the way the backend does (413 past it):
the wire's 1 MiB, or a smaller one the client does not know about. Every class must arrive
exactly once, with its whole count; each part must fit, carry the same envelope (system
info, timestamp, the ``mmagg`` object) and its own Idempotency-Key; a result that alone
exceeds the limit is dropped and counted as ``too_large``; and ``close()`` says True only
when everything was delivered.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from tests.conftest import Captured, CaptureServer, Reply

import mmagg
from mmagg import RetryPolicy
from mmagg.wire import MAX_BODY_BYTES, MAX_RESULTS

KEY = "rf_SPLIT_secret_key_7"
RETRY = RetryPolicy(deadline=10.0, base_delay=0.01, max_delay=0.05, max_attempts=3)


def limited(server: CaptureServer, limit: int) -> list[int]:
    """Make ``server`` answer 413 to bodies over ``limit`` bytes; returns the refused sizes."""
    refused: list[int] = []
    lock = threading.Lock()

    def on_post(request: Captured) -> Reply:
        if len(request.body) > limit:
            with lock:
                refused.append(len(request.body))
            return Reply(status=413, body={"detail": f"expected at most {limit} bytes"})
        return Reply(body={"status": "ok"})

    server.on_post = on_post
    return refused


def frame(classes: list[str], copies: dict[str, int]) -> dict[str, Any]:
    """One classification-style frame: class ``c`` ``copies[c]`` times, confidences in (0, 1)."""
    predictions = [
        {"class": name, "confidence": round(0.05 + 0.9 * (k + 1) / (copies[name] + 1), 6)}
        for name in classes
        for k in range(copies[name])
    ]
    return {"predictions": predictions}


def accepted(server: CaptureServer, limit: int) -> list[Captured]:
    return [p for p in server.posts if len(p.body) <= limit]


def delivered_counts(posts: list[Captured]) -> Counter[str]:
    """Results per class over the accepted posts (each class must appear exactly once)."""
    return Counter(r["class_name"] for p in posts for r in p.json()["inference_results"])


def delivered_predictions(posts: list[Captured]) -> dict[str, int]:
    return {
        r["class_name"]: r["stats"]["count"] for p in posts for r in p.json()["inference_results"]
    }


def aggregator(server: CaptureServer, **kwargs: Any) -> mmagg.Aggregator:
    kwargs.setdefault("extensions", True)
    return mmagg.Aggregator(
        "split/1",
        frequency=3600,
        api_key=KEY,
        api_base_url=server.url,
        request_timeout=5.0,
        flush_timeout=20.0,
        retry=RETRY,
        **kwargs,
    )


def names(n: int, width: int = 120) -> list[str]:
    return [f"class-{i:05d}-".ljust(width, "x") for i in range(n)]


def test_a_window_over_one_mib_is_split_before_sending(capture_server: CaptureServer) -> None:
    refused = limited(capture_server, MAX_BODY_BYTES)
    classes = names(5000)
    copies = {name: 1 + i % 4 for i, name in enumerate(classes)}
    agg = aggregator(capture_server, device_id="split-device")
    agg.collect(frame(classes, copies))
    assert agg.close(timeout=20)
    posts = capture_server.posts
    # Split before sending: no body over the limit ever left the client.
    assert refused == []
    assert len(posts) >= 2
    assert all(len(p.body) <= MAX_BODY_BYTES for p in posts)
    assert sum(len(p.body) for p in posts) > MAX_BODY_BYTES
    # Every class exactly once, with its whole count.
    assert delivered_counts(posts) == Counter({name: 1 for name in classes})
    assert delivered_predictions(posts) == copies
    # Each part is a whole report: same envelope, own Idempotency-Key, at most MAX_RESULTS.
    envelopes = [{k: v for k, v in p.json().items() if k != "inference_results"} for p in posts]
    assert all(e == envelopes[0] for e in envelopes)
    assert envelopes[0]["device_id"] == "split-device"
    assert "platform" in envelopes[0] and envelopes[0]["mmagg"]["aggregator_key"] == agg.key
    assert len({p.headers["idempotency-key"] for p in posts}) == len(posts)
    assert all(len(p.json()["inference_results"]) <= MAX_RESULTS for p in posts)
    counters = agg.counters
    assert counters.sent == len(posts) and counters.failed == 0
    assert counters.dropped_total == 0 and counters.collected == sum(copies.values())


def test_a_smaller_limit_is_learned_from_413_by_halving(capture_server: CaptureServer) -> None:
    limit = 16 * 1024
    refused = limited(capture_server, limit)
    classes = names(600)
    copies = {name: 1 + i % 3 for i, name in enumerate(classes)}
    agg = aggregator(capture_server)
    agg.collect(frame(classes, copies))
    assert agg.flush(timeout=20)
    first = accepted(capture_server, limit)
    assert delivered_counts(first) == Counter({name: 1 for name in classes})
    assert delivered_predictions(first) == copies
    # The window's body is ~150 KB: halving reaches 16 KiB in a few steps, not one per part.
    whole = sum(len(p.body) for p in first)
    assert whole > 8 * limit
    assert 1 <= len(refused) <= 8, refused
    assert agg.counters.sent == len(first) and agg.counters.dropped_total == 0

    # The next window is cut to the learned size at once: no 413 any more.
    refused.clear()
    agg.collect(frame(classes[:300], {name: 2 for name in classes[:300]}))
    assert agg.close(timeout=20)
    assert refused == []
    second = accepted(capture_server, limit)[len(first) :]
    assert delivered_counts(second) == Counter({name: 1 for name in classes[:300]})
    assert agg.counters.sent == len(first) + len(second)
    assert agg.counters.dropped_total == 0


def test_a_result_alone_over_the_limit_is_dropped_as_too_large(
    capture_server: CaptureServer,
) -> None:
    limit = 4096
    refused = limited(capture_server, limit)
    classes = names(40)
    giant = "g" * 5000  # its result alone makes a body over 4 KiB
    copies = {name: 2 for name in classes} | {giant: 3}
    agg = aggregator(capture_server)
    agg.collect(frame([*classes, giant], copies))
    assert not agg.close(timeout=20)  # not everything was delivered
    posts = accepted(capture_server, limit)
    assert delivered_counts(posts) == Counter({name: 1 for name in classes})
    counters = agg.counters
    assert dict(counters.dropped) == {"too_large": 3}
    assert counters.sent == len(posts)
    assert counters.collected == sum(copies.values())
    # Its body was refused once; the halving stopped there (bounded, not one try per byte).
    assert len(refused) <= 6


def test_a_result_over_the_wire_limit_is_never_sent(capture_server: CaptureServer) -> None:
    refused = limited(capture_server, MAX_BODY_BYTES)
    giant = "G" * (MAX_BODY_BYTES + 10)
    agg = aggregator(capture_server, extensions=False)
    agg.collect(
        {"predictions": [{"class": giant, "confidence": 0.5}, {"class": "ok", "confidence": 0.4}]}
    )
    assert not agg.close(timeout=20)
    assert refused == []
    (post,) = capture_server.posts
    assert [r["class_name"] for r in post.json()["inference_results"]] == ["ok"]
    assert dict(agg.counters.dropped) == {"too_large": 1}


def test_a_failed_part_is_carried_by_the_next_report_only(capture_server: CaptureServer) -> None:
    limit = 16 * 1024
    limited(capture_server, limit)
    plain = capture_server.on_post
    classes = names(300)
    copies = {name: 1 + i % 2 for i, name in enumerate(classes)}
    agg = aggregator(capture_server)
    # Learn the limit first (one 413), so that the parts below are cut before the failure.
    agg.collect(frame(classes, {name: 1 for name in classes}))
    assert agg.flush(timeout=20)
    learned = len(accepted(capture_server, limit))
    seen: list[bytes] = []
    failed: list[bytes] = []

    def second_part_fails(request: Captured) -> Reply:
        if len(request.body) <= limit:
            seen.append(request.body)
            if len(seen) == 2:  # 500: not retried at once, the part is merged back
                failed.append(request.body)
                return Reply(status=500, body={"detail": "database is down"})
        return plain(request)

    capture_server.on_post = second_part_fails
    agg.collect(frame(classes, copies))
    assert agg.flush(timeout=20)  # handled: one part delivered, the rest merged back
    assert len(failed) == 1
    assert agg.counters.failed == 1 and agg.counters.merged_back == 1
    assert agg.close(timeout=20)  # the next report carries the rest
    stored = [p for p in accepted(capture_server, limit)[learned:] if p.body not in failed]
    assert len(stored) >= 2
    assert delivered_counts(stored) == Counter({name: 1 for name in classes})
    assert delivered_predictions(stored) == copies
    counters = agg.counters
    assert counters.failed == 1 and counters.merged_back == 1
    assert counters.dropped_total == 0
    assert counters.sent == learned + len(stored)


@pytest.mark.parametrize("status", [401, 422])
def test_a_refused_part_is_dropped_by_status_and_close_says_false(
    capture_server: CaptureServer, status: int
) -> None:
    limit = 8 * 1024
    limited(capture_server, limit)
    plain = capture_server.on_post
    classes = names(100)
    refused_classes: set[str] = set()

    def refuse_one_part(request: Captured) -> Reply:
        body = request.json() if len(request.body) <= limit else None
        if body and any(r["class_name"] == classes[50] for r in body["inference_results"]):
            refused_classes.update(r["class_name"] for r in body["inference_results"])
            return Reply(status=status, body={"detail": "no"})
        return plain(request)

    capture_server.on_post = refuse_one_part
    agg = aggregator(capture_server)
    agg.collect(frame(classes, {name: 1 for name in classes}))
    assert not agg.close(timeout=20)
    stored = [
        p
        for p in accepted(capture_server, limit)
        if not any(r["class_name"] == classes[50] for r in p.json()["inference_results"])
    ]
    assert delivered_counts(stored) == Counter({n: 1 for n in classes if n not in refused_classes})
    counters = agg.counters
    assert dict(counters.dropped) == {f"http_{status}": len(refused_classes)}
    assert counters.failed == 1 and counters.sent == len(stored)
