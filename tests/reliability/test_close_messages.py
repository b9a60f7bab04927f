"""Issue 13 item 3: with the backend down, what a person reads is true and useful.

The log names the cause ("connection refused at host:port"), never "cancelled at shutdown";
the counters read right after ``close`` include what ``close`` dropped and print as plain
dicts; counts use the singular for one.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import pytest
from tests.conftest import CaptureServer, Reply

import mmagg
from mmagg import RetryPolicy

KEY = "close_messages_SECRET_5"
# Patient retries: the report is still retrying when close's flush deadline passes.
PATIENT = RetryPolicy(deadline=60.0, base_delay=0.05, max_delay=0.2, max_attempts=1000)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def frame(*names: str) -> dict[str, Any]:
    return {"predictions": [{"class": name, "confidence": 0.5} for name in names]}


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mmagg"))


def test_backend_down_says_connection_refused_and_counts_what_close_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = closed_port()
    caplog.set_level(logging.WARNING)
    with mmagg.Aggregator(
        "m/1",
        frequency=3600,
        api_key=KEY,
        api_base_url=f"http://127.0.0.1:{port}",
        flush_timeout=0.5,
        retry=PATIENT,
    ) as agg:
        for _ in range(3):
            agg.collect(frame("car", "person", "bus"))
    counters = agg.counters  # read right after close
    assert counters.collected == 9
    assert dict(counters.dropped) == {"shutdown": 9}
    assert counters.sent == 0
    text = repr(counters)
    assert "dropped={'shutdown': 9}" in text and "mappingproxy" not in text
    logged = messages(caplog)
    assert f"connection refused at 127.0.0.1:{port}" in logged
    assert "cancelled at shutdown" not in logged
    assert "9 predictions dropped" in logged
    assert KEY not in logged and KEY not in text


def test_one_prediction_is_singular(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    agg = mmagg.Aggregator(
        "m/1",
        api_key=KEY,
        api_base_url=f"http://127.0.0.1:{closed_port()}",
        retry=RetryPolicy(deadline=0.5, base_delay=0.05, max_attempts=2),
    )
    agg.collect(frame("car"))
    assert agg.close(timeout=5) is False
    assert dict(agg.counters.dropped) == {"shutdown": 1}
    logged = messages(caplog)
    assert "1 prediction dropped" in logged
    assert "1 predictions" not in logged
    assert "connection refused at 127.0.0.1:" in logged


def test_counters_after_close_include_a_report_still_hanging(
    capture_server: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend accepts the connection and never answers: close gives up on the send
    in flight and counts it at once (not when the request finally ends)."""
    capture_server.on_post = lambda request: Reply(action="hang")
    caplog.set_level(logging.WARNING)
    agg = mmagg.Aggregator(
        "m/1",
        frequency=3600,
        api_key=KEY,
        api_base_url=capture_server.url,
        request_timeout=30,
    )
    agg.collect(frame("car", "bus"))
    started = time.monotonic()
    assert agg.close(timeout=0.5) is False
    assert time.monotonic() - started < 5
    assert dict(agg.counters.dropped) == {"shutdown": 2}
    logged = messages(caplog)
    assert "2 predictions dropped (2 in a report still in flight)" in logged
    capture_server.stop()  # the hung request ends now; nothing is counted twice
    deadline = time.monotonic() + 5
    while agg.counters.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dict(agg.counters.dropped) == {"shutdown": 2}


def test_client_error_after_shutdown_names_the_last_failure() -> None:
    port = closed_port()
    client = mmagg.ModelMonitoringClient(
        KEY, api_base_url=f"http://127.0.0.1:{port}", retry=PATIENT
    )
    try:
        import threading

        threading.Timer(0.3, client.cancel).start()
        with pytest.raises(mmagg.ReportError) as raised:
            client.send({"inference_results": []})
    finally:
        client.close()
    text = str(raised.value)
    assert text.startswith(f"GET http://127.0.0.1:{port}/: connection refused at 127.0.0.1:{port}")
    assert "(gave up at shutdown after " in text and " attempts)" in text
    assert raised.value.kind == "connection" and raised.value.retryable
    assert KEY not in text
