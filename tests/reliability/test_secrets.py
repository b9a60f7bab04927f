"""Secrets scan: the API key appears in no log record (DEBUG, every logger), no exception
text or chained exception, no returned message, no HTTP response body and no database
column, whatever happens."""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_support import (
    SECRET_KEY,
    FakeClock,
    Reply,
    ServeProcess,
    add_known_key,
    dump_sqlite,
    free_port,
    start_mmagg_serve,
)

import mmagg
from mmagg import MemoryCache, MemoryStore, RetryPolicy
from mmagg._secrets import register_secret
from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

UNKNOWN_KEY = "mmk_SECRET_CANARY_unknown_0000000000"
FAST = RetryPolicy(deadline=1.0, base_delay=0.01, max_delay=0.05, max_attempts=2)
LOGGERS = ("", "mmagg", "httpx", "httpcore", "uvicorn", "uvicorn.access", "uvicorn.error")


def _forms(secret: str) -> list[str]:
    from urllib.parse import quote, quote_plus

    return sorted({secret, quote(secret, safe=""), quote_plus(secret), secret[4:]})


def assert_clean(*texts: object) -> None:
    for text in texts:
        for form in _forms(SECRET_KEY) + _forms(UNKNOWN_KEY):
            assert form not in str(text), f"secret found in: {str(text)[:300]}"


def exception_texts(error: BaseException) -> list[str]:
    """Everything an exception can show: text, repr, args, the chain, the traceback."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), repr(current.args)]
        texts.append("".join(traceback.format_exception(current)))
        current = current.__cause__ or current.__context__
    return texts


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog
    records = caplog.get_records("call")
    assert records, "nothing was logged: the scan saw nothing"
    for record in records:
        formatted = logging.Formatter("%(message)s %(exc_text)s").format(record)
        assert_clean(record.getMessage(), formatted, repr(record.args), record.exc_text or "")


def echo(status: int) -> Any:
    """A backend that echoes the request line (key included) in its error body."""
    return lambda req: Reply(status, {"detail": f"bad request {req.path}?{req.query}"})


def test_client_errors_of_every_kind(capture_server: Any, debug_logs: Any) -> None:
    cases: list[tuple[str, Any]] = [
        ("http_401", lambda: setattr(capture_server, "on_post", echo(401))),
        ("http_403", lambda: setattr(capture_server, "on_post", echo(403))),
        ("http_413", lambda: setattr(capture_server, "on_post", echo(413))),
        ("http_422", lambda: setattr(capture_server, "on_post", echo(422))),
        ("http_500", lambda: setattr(capture_server, "on_post", echo(500))),
        ("http_503", lambda: setattr(capture_server, "on_post", echo(503))),
        ("http_429", lambda: setattr(capture_server, "on_post", echo(429))),
        ("reset", lambda: setattr(capture_server, "on_post", lambda r: Reply(action="reset"))),
        ("timeout", lambda: setattr(capture_server, "on_post", lambda r: Reply(delay=2.0))),
        ("lookup_echo", lambda: setattr(capture_server, "on_lookup", echo(200))),
        ("lookup_401", lambda: setattr(capture_server, "on_lookup", echo(401))),
    ]
    errors: list[BaseException] = []
    for name, arrange in cases:
        arrange()
        client = mmagg.ModelMonitoringClient(
            SECRET_KEY, api_base_url=capture_server.url, retry=FAST, request_timeout=0.3
        )
        try:
            client.send({"inference_results": []})
        except mmagg.ReportError as error:
            errors.append(error)
        else:
            pytest.fail(f"{name}: expected a ReportError")
        finally:
            client.close()
        capture_server.on_lookup = lambda r: Reply(body={"workspace": "test-ws"})
    refused = mmagg.ModelMonitoringClient(
        SECRET_KEY, api_base_url=f"http://127.0.0.1:{free_port()}", retry=FAST
    )
    with pytest.raises(mmagg.ReportError) as info:
        refused.send({"inference_results": []})
    errors.append(info.value)
    cancelled = mmagg.ModelMonitoringClient(SECRET_KEY, api_base_url=capture_server.url, retry=FAST)
    cancelled.cancel()
    with pytest.raises(mmagg.ReportError) as info:
        cancelled.send({"inference_results": []})
    errors.append(info.value)
    assert {e.kind for e in errors} >= {"http", "connection", "timeout", "bad_response"}  # type: ignore[attr-defined]
    for error in errors:
        assert_clean(*exception_texts(error))
    assert_clean(repr(refused), repr(cancelled))


@pytest.mark.parametrize("fire_and_forget", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("outcome", ["ok", "401", "500", "refused", "bad_lookup", "hang"])
def test_block_messages_and_logs(
    capture_server: Any,
    debug_logs: Any,
    fire_and_forget: bool,
    outcome: str,
) -> None:
    url = capture_server.url
    if outcome == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    elif outcome == "bad_lookup":
        capture_server.on_lookup = echo(200)
    elif outcome == "hang":
        capture_server.on_post = lambda r: Reply(action="hang")
    elif outcome != "ok":
        capture_server.on_post = echo(int(outcome))
    clock = FakeClock()
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=SECRET_KEY,
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=url,
        store=MemoryStore(),
        request_timeout=0.3,
        flush_timeout=0.5,
        clock=clock,
        retry=FAST,  # a synchronous run against a dead backend waits for the retry deadline
    )
    key = f"secrets-{outcome}-{fire_and_forget}"
    messages = []
    for _ in range(3):
        result = block.run(
            fire_and_forget=fire_and_forget,
            predictions={"predictions": [{"class": SECRET_KEY[:6], "confidence": 0.5}]},
            frequency=1,
            unique_aggregator_key=key,
            model_id="m/1",
        )
        messages.append(result["message"])
        clock.advance(1.5)
    reporter = block.reporter(key)
    reporter.close(timeout=0.5)
    if outcome == "ok":
        assert "Data sent successfully" in messages or fire_and_forget
    elif not fire_and_forget:
        assert any(m.startswith("Error while uploading inference data") for m in messages)
    assert_clean(*messages, repr(block), repr(reporter.counters()))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[ServeProcess, str]]:
    """``mmagg serve`` in its own process (its log filters are its own, not this test's),
    at DEBUG with the access log on, on a SQLite file holding the canary key."""
    from mmagg.server import Database

    path = tmp_path / "secrets.db"
    db = Database(f"sqlite:///{path}")
    add_known_key(db, "acme", SECRET_KEY)
    db.ensure_workspace("other")
    db.close()
    served = start_mmagg_serve(
        f"sqlite:///{path}", tmp_path / "serve.log", "--access-log", "--log-level", "debug"
    )
    try:
        yield served, str(path)
    finally:
        served.stop()


def _report(**overrides: Any) -> dict[str, Any]:
    result = {
        "class_name": "car",
        "confidence": 0.9,
        "inference_id": "i",
        "model_type": "object-detection",
        "model_id": "yard/3",
    }
    result.update(overrides)
    return {
        "timestamp": "2026-11-27T05:00:00+00:00",
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": "cam-1",
        "inference_server_version": "0.1.0",
        "inference_results": [result],
    }


def test_backend_ingest_dashboard_and_database(
    backend: tuple[ServeProcess, str], debug_logs: Any
) -> None:
    served, path = backend
    # This test's own httpx client logs its URLs (keys included) in this process: those are
    # the harness's lines, not the product's; the server's output is scanned below.
    register_secret(UNKNOWN_KEY)
    key = {"api_key": SECRET_KEY}
    bearer = {"Authorization": f"Bearer {SECRET_KEY}"}
    good, bad_value = _report(), _report(confidence=SECRET_KEY)
    cases: list[tuple[str, str, dict[str, str], Any, dict[str, str], int]] = [
        ("GET", "/", key, None, {}, 200),
        ("GET", "/", {"api_key": UNKNOWN_KEY}, None, {}, 401),
        ("POST", "/acme/inference-stats", key, good, {}, 200),
        ("POST", "/acme/inference-stats", {}, good, bearer, 200),
        ("POST", "/acme/inference-stats", {"api_key": UNKNOWN_KEY}, good, {}, 401),
        ("POST", "/other/inference-stats", key, good, {}, 403),
        ("POST", "/acme/inference-stats", key, bad_value, {}, 422),
        ("POST", "/acme/inference-stats", key, {"device_id": SECRET_KEY}, {}, 422),
        ("POST", "/acme/inference-stats", {}, _report(class_name=SECRET_KEY * 100), bearer, 422),
        ("GET", "/acme/inference-stats", key, None, {}, 200),
        ("GET", "/acme/inference-stats", {**key, "startTime": "not a time"}, None, {}, 422),
    ]
    bodies: list[str] = []
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for method, route, params, body, headers, status in cases:
            response = http.request(method, route, params=params, json=body, headers=headers)
            assert response.status_code == status, (route, response.text)
            bodies.append(response.text + repr(dict(response.headers)))
        login = http.post("/dashboard/api/login", json={"api_key": SECRET_KEY})
        assert login.status_code == 200
        bodies.append(login.text + repr(dict(login.headers)))
        bodies.append(http.get("/dashboard/api/me").text)
        bad_login = http.post("/dashboard/api/login", json={"api_key": UNKNOWN_KEY})
        assert bad_login.status_code == 401
        bodies.append(bad_login.text)
    # The unchanged client, end to end.
    agg = mmagg.Aggregator(
        "yard/3",
        frequency=60,
        api_key=SECRET_KEY,
        api_base_url=served.url,
        store=MemoryStore(),
        cache=MemoryCache(),
    )
    agg.collect({"predictions": [{"class": "car", "confidence": 0.5}]})
    assert agg.close(timeout=5) is True
    assert agg.counters.sent == 1
    assert_clean(*bodies)
    server_output = served.stop()
    assert "inference-stats" in server_output, "the access log was on: requests are logged"
    assert_clean(server_output)
    dump = dump_sqlite(path)
    assert "car" in dump
    assert_clean(dump)
    assert hashlib.sha256(SECRET_KEY.encode()).hexdigest() in dump, "the key's hash is stored"
