"""Failed key checks are rate limited per client address, over real HTTP (SQLite backend)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result
from server_support import ServerThread, start_server

from mmagg.server import Database, create_app
from mmagg.server.ratelimit import DatabaseFailureLimiter
from mmagg.server.tables import failure_buckets

FAILURES = 3  # per minute: one token every 20 s


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, str]]:
    """A fresh backend (fresh limiter) allowing FAILURES failed attempts a minute, and a key."""
    db = Database(f"sqlite:///{tmp_path / 'limit.db'}")
    key = db.create_key("acme", {"ingest", "read"})  # logs in and looks up
    running = start_server(create_app(db=db, login_failures_per_minute=FAILURES))
    try:
        yield running, key
    finally:
        running.stop()
        db.close()


def _login(http: httpx.Client, key: str) -> httpx.Response:
    return http.post("/dashboard/api/login", json={"api_key": key})


def _rejections(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('mmagg_rejections_total{reason="rate_limited"}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_failed_logins_past_the_limit_get_429_with_retry_after(
    served: tuple[ServerThread, str],
) -> None:
    running, key = served
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        statuses = [_login(http, f"mmk_wrong{i}").status_code for i in range(FAILURES)]
        assert statuses == [401] * FAILURES
        limited = _login(http, "mmk_wrong-again")
        assert limited.status_code == 429
        wait = int(limited.headers["retry-after"])
        assert 1 <= wait <= 60 // FAILURES
        assert "retry in" in limited.json()["detail"]
        # Refused before the key is checked: the right key gets no different answer.
        right = _login(http, key)
        assert right.status_code == 429 and "set-cookie" not in right.headers
        # One bucket per client for both ways of trying a key.
        lookup = http.get("/", params={"api_key": key})
        assert lookup.status_code == 429 and "retry-after" in lookup.headers
        assert _rejections(http) == 3
        # Other routes are not limited.
        assert http.get("/healthz").status_code == 200


def test_requests_without_a_key_take_no_tokens(served: tuple[ServerThread, str]) -> None:
    running, key = served
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        # A load balancer probing `GET /` must not lock out the logins behind its address.
        for _ in range(4 * FAILURES):
            assert http.get("/").status_code == 401
        assert _login(http, key).status_code == 200


def test_successful_logins_take_no_tokens(served: tuple[ServerThread, str]) -> None:
    running, key = served
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        for _ in range(4 * FAILURES):
            assert _login(http, key).status_code == 200
            assert http.get("/", params={"api_key": key}).json() == {"workspace": "acme"}
        # Still the full allowance of failures, and successes in between do not refill it.
        assert [_login(http, "mmk_wrong").status_code for _ in range(FAILURES - 1)] == [401] * (
            FAILURES - 1
        )
        assert _login(http, key).status_code == 200
        assert http.get("/", params={"api_key": "mmk_wrong"}).status_code == 401
        assert _login(http, key).status_code == 429


def test_the_limit_is_per_client_address(served: tuple[ServerThread, str]) -> None:
    running, key = served
    # Linux routes all of 127.0.0.0/8 to loopback: a second client address on the same host.
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with (
        httpx.Client(base_url=running.base_url, timeout=10) as first,
        httpx.Client(base_url=running.base_url, timeout=10, transport=other) as second,
    ):
        for _ in range(FAILURES):
            assert first.get("/", params={"api_key": "mmk_wrong"}).status_code == 401
        assert first.get("/", params={"api_key": key}).status_code == 429
        assert _login(second, key).status_code == 200
        assert second.get("/", params={"api_key": "mmk_wrong"}).status_code == 401


def test_tokens_come_back_with_time(served: tuple[ServerThread, str]) -> None:
    running, key = served
    # A token every 0.5 s, so that the test need not wait 20 s.
    state = running.server.config.app.state
    state.login_limiter = DatabaseFailureLimiter(state.db, failures=2, period=1.0, namespace="fast")
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        assert [_login(http, "mmk_wrong").status_code for _ in range(2)] == [401, 401]
        limited = _login(http, key)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        time.sleep(0.6)
        assert _login(http, key).status_code == 200


def test_refilled_buckets_are_swept(tmp_path: Path) -> None:
    now = [1000.0]
    db = Database(f"sqlite:///{tmp_path / 'sweep.db'}")
    try:
        limiter = DatabaseFailureLimiter(db, failures=2, period=60.0, clock=lambda: now[0])
        other = DatabaseFailureLimiter(db, failures=2, period=1.0, namespace="other")
        other.failed("10.0.0.9")  # another namespace's bucket: not this limiter's to sweep
        for i in range(100):
            limiter.failed(f"10.0.0.{i}")
            now[0] += 0.1
        now[0] += 60.0  # every bucket refilled; the next failure sweeps them
        limiter.failed("10.0.1.1")
        with db.read() as conn:
            left = sorted(conn.execute(sa.select(failure_buckets.c.client)).scalars())
        assert left == ["login:10.0.1.1", "other:10.0.0.9"]
        assert limiter.retry_after("10.0.1.1") == 0
        limiter.failed("10.0.1.1")
        assert limiter.retry_after("10.0.1.1") == 30  # at one token left: now empty
        with pytest.raises(ValueError, match="failures"):
            DatabaseFailureLimiter(db, failures=0)
    finally:
        db.close()


def test_ingest_with_a_key_checked_lately_is_still_limited(
    served: tuple[ServerThread, str],
) -> None:
    """Ingest with a key checked lately reads no bucket before storing: the storing
    transaction does. Failures recorded by another process (its own limiter on the same
    database) still refuse the next report with 429 and store nothing."""
    running, key = served
    db: Database = running.server.config.app.state.db
    body = report([result("car", 0.5)])
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        first = http.post("/acme/inference-stats", json=body, params={"api_key": key})
        assert first.status_code == 200, first.text  # the key is now checked lately
        assert db.cached_principal(key) is not None
        other_process = Database(db.url)
        try:
            limiter = DatabaseFailureLimiter(other_process, failures=FAILURES, period=60.0)
            for _ in range(FAILURES):
                limiter.failed("127.0.0.1")
        finally:
            other_process.close()
        limited = http.post("/acme/inference-stats", json=body, params={"api_key": key})
        assert limited.status_code == 429, limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= 20
        assert "retry in" in limited.json()["detail"]
        # A body that does not validate is limited too, before its 422.
        broken = http.post("/acme/inference-stats", json={"x": 1}, params={"api_key": key})
        assert broken.status_code == 429
    assert db.count_reports("acme") == 1
