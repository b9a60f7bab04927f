"""Issue 10 item 3: a sink with Prometheus metrics on a shared (Redis) store reports
during the stream, not only at close; loopback backend, real redis-server."""

from __future__ import annotations

import time
import uuid

import pytest
from tests.conftest import CaptureServer

from mmagg.sinks import MonitoringSink
from mmagg.stores.metered import MeteredStore

prometheus_client = pytest.importorskip("prometheus_client")


def test_metered_redis_sink_reports_while_streaming(
    capture_server: CaptureServer, redis_url: str
) -> None:
    registry = prometheus_client.CollectorRegistry()
    sink = MonitoringSink.for_model(
        "yard/3",
        store=redis_url,
        metrics_registry=registry,
        frequency=1,
        api_key="metered_SECRET_1",
        api_base_url=capture_server.url,
        unique_aggregator_key=f"metered-{uuid.uuid4().hex[:8]}",
    )
    store = sink.aggregator._reporter.store
    assert isinstance(store, MeteredStore) and store.shared
    frames = 0
    deadline = time.monotonic() + 8.0
    while not capture_server.posts and time.monotonic() < deadline:
        sink({"predictions": [{"class": "car", "confidence": 0.8}]})
        frames += 1
        time.sleep(0.02)
    posts = capture_server.posts
    assert posts, "no report during the stream"
    assert dict(sink.errors) == {}
    assert "internal_error" not in sink.aggregator.counters.dropped
    assert {r["class_name"] for r in posts[0].json()["inference_results"]} == {"car"}
    assert sink.close(timeout=5)
    counters = sink.aggregator.counters
    assert counters.collected == frames and counters.dropped_total == 0
    text = prometheus_client.generate_latest(registry).decode()
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("mmagg_prediction_confidence_count") and 'class_name="car"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == frames
