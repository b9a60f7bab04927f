"""The Model Monitoring client over real loopback HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from mmagg import MemoryCache, ModelMonitoringClient, ReportError, RetryPolicy
from mmagg.client import workspace_cache_key
from tests.conftest import CaptureServer, Reply

KEY = "rf_SECRET_key_123"


class RecordingCache(MemoryCache):
    def __init__(self) -> None:
        super().__init__()
        self.sets: list[tuple[str, Any, float | None]] = []

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        self.sets.append((key, value, expire))
        super().set(key, value, expire)


_MADE: list[ModelMonitoringClient] = []


@pytest.fixture(autouse=True)
def _close_made_clients() -> Iterator[None]:
    """Every client `make_client` built is closed after its test (its pooled connections
    would otherwise be closed by the garbage collector, with a ResourceWarning, anywhere
    later)."""
    yield
    while _MADE:
        _MADE.pop().close()


def make_client(server: CaptureServer, **kwargs: Any) -> ModelMonitoringClient:
    kwargs.setdefault("retry", RetryPolicy(deadline=5, base_delay=0.01, max_delay=0.05))
    kwargs.setdefault("request_timeout", 2.0)
    client = ModelMonitoringClient(KEY, api_base_url=server.url + "/", **kwargs)
    _MADE.append(client)
    return client


def test_lookup_and_send_follow_the_original_dialect(capture_server: CaptureServer) -> None:
    cache = RecordingCache()
    client = make_client(capture_server, cache=cache)
    client.send({"inference_results": []}, idempotency_key="idem-1")
    client.send({"inference_results": []})
    (lookup,) = capture_server.lookups  # second send used the cache
    assert lookup.query == {"api_key": [KEY], "nocache": ["true"]}
    assert cache.sets == [(workspace_cache_key(KEY), "test-ws", 900)]
    import hashlib

    assert workspace_cache_key(KEY).endswith(hashlib.md5(KEY.encode()).hexdigest())
    first, second = capture_server.posts
    assert first.path == "/test-ws/inference-stats"
    assert first.query == {"api_key": [KEY]}
    assert first.headers["idempotency-key"] == "idem-1"
    assert second.headers["idempotency-key"] not in ("", "idem-1")
    assert first.json() == {"inference_results": []}


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried(capture_server: CaptureServer, status: int) -> None:
    capture_server.replies = [Reply(status=status), Reply(status=status)]
    retries: list[int] = []
    client = make_client(capture_server, on_retry=lambda: retries.append(1))
    client.send({"inference_results": []}, idempotency_key="same")
    posts = capture_server.posts
    assert len(posts) == 3 and len(retries) == 2
    assert {p.headers["idempotency-key"] for p in posts} == {"same"}


@pytest.mark.parametrize("header", ["seconds", "http-date"])
def test_retry_after_is_honoured(capture_server: CaptureServer, header: str) -> None:
    value = "1"
    if header == "http-date":
        value = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    capture_server.replies = [Reply(status=429, headers={"Retry-After": value})]
    client = make_client(capture_server)
    client.send({"inference_results": []})
    first, second = capture_server.posts
    assert second.at - first.at >= 0.9


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_other_4xx_are_not_retried(capture_server: CaptureServer, status: int) -> None:
    capture_server.on_post = lambda req: Reply(status=status, body={"detail": f"no {KEY}"})
    client = make_client(capture_server)
    with pytest.raises(ReportError) as info:
        client.send({"inference_results": []})
    assert len(capture_server.posts) == 1
    assert info.value.status == status and not info.value.retryable
    assert KEY not in str(info.value)


def test_500_is_not_retried_now_but_the_data_is_kept(capture_server: CaptureServer) -> None:
    capture_server.on_post = lambda req: Reply(status=500)
    with pytest.raises(ReportError) as info:
        make_client(capture_server).send({"inference_results": []})
    assert len(capture_server.posts) == 1 and info.value.retryable


def test_connection_refused_error_has_no_key_anywhere() -> None:
    client = ModelMonitoringClient(
        KEY,
        api_base_url="http://127.0.0.1:9",
        retry=RetryPolicy(deadline=0.5, base_delay=0.01, max_delay=0.02),
    )
    with pytest.raises(ReportError) as info:
        client.send({"inference_results": []})
    error = info.value
    assert error.kind == "connection" and error.retryable
    assert KEY not in str(error)
    assert error.__cause__ is None and error.__context__ is None


def test_a_hung_server_costs_at_most_the_deadline(capture_server: CaptureServer) -> None:
    capture_server.on_post = lambda req: Reply(action="hang")
    client = make_client(
        capture_server, request_timeout=0.3, retry=RetryPolicy(deadline=1.0, base_delay=0.01)
    )
    started = time.monotonic()
    with pytest.raises(ReportError) as info:
        client.send({"inference_results": []})
    assert time.monotonic() - started < 2.0
    assert info.value.kind == "timeout"


@pytest.mark.parametrize(
    "reply",
    [Reply(raw=b"not json"), Reply(body={"name": "x"}), Reply(body={"workspace": ""})],
)
def test_bad_lookup_answers_are_clear_errors(capture_server: CaptureServer, reply: Reply) -> None:
    capture_server.on_lookup = lambda req: reply
    with pytest.raises(ReportError, match="workspace lookup: expected JSON"):
        make_client(capture_server).send({"inference_results": []})
    assert capture_server.posts == []
