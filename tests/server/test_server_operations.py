"""Operations under hostile clients (issue 12, classes 4 and 6), over real HTTP: oversized bodies,
/metrics route labels, key redaction in the access log, forwarded addresses, failed key
checks on every keyed route, slow headers, and a large report that must not hold the loop.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from server_payloads import report, result
from server_support import RunningBackend, free_socket, start_server
from typer.testing import CliRunner

from mmagg.cli import app as cli_app
from mmagg.server import Database, create_app
from mmagg.server.runner import BackgroundServer

LIMIT = 1 << 20


def _chunks(total: int, piece: bytes = b" " * 65536) -> Iterator[bytes]:
    yield b'{"api_key": "'
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)
    yield b'"}'


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/dashboard/api/login"),
        ("POST", "/{workspace}/inference-stats"),
        ("GET", "/{workspace}/api/models"),
        ("POST", "/dashboard/api/logout"),
    ],
)
@pytest.mark.parametrize("chunked", [True, False])
def test_every_oversized_body_gets_413(
    backend: RunningBackend, client: httpx.Client, method: str, path: str, chunked: bool
) -> None:
    workspace, key = backend.new_workspace()
    url = path.format(workspace=workspace)
    content: Any = _chunks(LIMIT + 1) if chunked else b"{" + b" " * LIMIT + b"}"
    answer = client.request(
        method,
        url,
        params={"api_key": key},
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 413, answer.text
    assert str(LIMIT) in answer.json()["detail"]
    assert backend.db.count_reports(workspace) == 0


def _metric_routes(text: str) -> set[tuple[str, str]]:
    found = set()
    for line in text.splitlines():
        if line.startswith("mmagg_request_duration_seconds_count{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            found.add((labels["method"], labels["route"]))
    return found


def test_metrics_label_each_request_with_its_full_route_template(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    auth = {"api_key": key}
    assert client.post(f"/{workspace}/inference-stats", params=auth, json=report([])).is_success
    client.get(f"/{workspace}/api/models", params=auth)
    client.get(f"/{workspace}/api/samples", params=auth)
    client.get(f"/{workspace}/inference-stats", params=auth)
    client.get("/dashboard/api/models")
    client.get(f"/{workspace}/no-such/route-{workspace}")
    routes = _metric_routes(client.get("/metrics").text)
    assert {
        ("POST", "/{workspace}/inference-stats"),
        ("GET", "/{workspace}/inference-stats"),
        ("GET", "/{workspace}/api/models"),
        ("GET", "/{workspace}/api/samples"),
        ("GET", "/dashboard/api/models"),
        ("GET", "unmatched"),
    } <= routes
    assert not any(workspace in route for _, route in routes), "label cardinality leak"
    assert ("GET", "/models") not in routes


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_access_log_redacts_the_key_however_its_parameter_is_spelt(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'log.db'}")
    key = db.create_key("acme", {"ingest", "read"})
    bare = key.removeprefix("mmk_")
    app = create_app(db=db)
    sock = free_socket()
    config = uvicorn.Config(app, access_log=True, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    capture = _Capture()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(capture)
    old_level = access.level
    access.setLevel(logging.INFO)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        queries = [
            f"api_key={key}",
            f"api%5Fkey={key}",
            f"api%5fkey={key}",
            f"API_KEY={key}",
            f"Api_Key={key}",
            f"%61pi_key={key}",
            f"api%255Fkey={key}",
            f"x=1&api_key={key}&y=2",
            f"token=abc&api_key={bare}",  # without its prefix
            f"other={key}",
        ]
        with httpx.Client(base_url=base) as http:
            for query in queries:
                http.get(f"/acme/api/models?{query}")
                http.get(f"/?{query}")
        deadline = time.monotonic() + 5
        while len(capture.lines) < 2 * len(queries) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.should_exit = True
        thread.join(10)
        access.removeHandler(capture)
        access.setLevel(old_level)
        db.close()
    assert len(capture.lines) == 2 * len(queries), capture.lines
    leaked = [line for line in capture.lines if bare in line]
    assert not leaked, leaked
    assert sum("=***" in line for line in capture.lines) >= 2 * (len(queries) - 1), capture.lines


def _login(http: httpx.Client, key: str, **headers: str) -> int:
    return http.post("/dashboard/api/login", json={"api_key": key}, headers=headers).status_code


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Database, str]]:
    db = Database(f"sqlite:///{tmp_path / 'limit.db'}")
    try:
        yield db, db.create_key("acme", {"ingest", "read"})
    finally:
        db.close()


def test_forged_forwarded_for_does_not_escape_the_limit(limited: tuple[Database, str]) -> None:
    """uvicorn's defaults believe X-Forwarded-For from 127.0.0.1; the app does not."""
    db, key = limited
    running = start_server(create_app(db=db, login_failures_per_minute=3))
    try:
        with httpx.Client(base_url=running.base_url) as http:
            statuses = [
                _login(http, "mmk_wrong", **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(6)
            ]
            assert statuses == [401, 401, 401, 429, 429, 429]
            # The limit on forged addresses is not anybody else's: a client without the
            # header still logs in.
            assert _login(http, key) == 200
    finally:
        running.stop()


def test_trusted_proxy_forwards_the_client_address_and_only_its_own(
    limited: tuple[Database, str],
) -> None:
    db, key = limited
    app = create_app(db=db, login_failures_per_minute=2, trusted_proxies="127.0.0.1/32")
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
        first = {"X-Forwarded-For": "198.51.100.1"}
        assert [_login(http, "mmk_wrong", **first) for _ in range(3)] == [401, 401, 429]
        # Another client behind the same proxy is not locked out...
        assert _login(http, key, **{"X-Forwarded-For": "198.51.100.2"}) == 200
        # ...and the first cannot get out by putting a made-up address in front: the proxy
        # appends the real one, which is the one counted.
        assert _login(http, "mmk_wrong", **{"X-Forwarded-For": "10.1.1.1, 198.51.100.1"}) == 429


def test_trusted_proxies_option_is_checked() -> None:
    outcome = CliRunner().invoke(cli_app, ["serve", "--trusted-proxies", "10.0.0.1,not-an-ip"])
    assert outcome.exit_code == 2
    assert "not-an-ip" in outcome.output


@pytest.mark.parametrize("route", ["read", "ingest", "bearer-read", "roboflow-read"])
def test_failed_key_checks_on_every_keyed_route_count_against_the_limit(
    limited: tuple[Database, str], route: str
) -> None:
    db, key = limited
    running = start_server(create_app(db=db, login_failures_per_minute=3))
    try:
        with httpx.Client(base_url=running.base_url) as http:

            def attempt(guess: str) -> int:
                if route == "read":
                    return http.get("/acme/api/models", params={"api_key": guess}).status_code
                if route == "bearer-read":
                    headers = {"Authorization": f"Bearer {guess}"}
                    return http.get("/acme/api/samples", headers=headers).status_code
                if route == "roboflow-read":
                    return http.get("/acme/inference-stats", params={"api_key": guess}).status_code
                body = report([result("car", 0.5)])
                answer = http.post("/acme/inference-stats", params={"api_key": guess}, json=body)
                return answer.status_code

            assert [attempt(f"mmk_guess{i}") for i in range(3)] == [401, 401, 401]
            assert attempt(key) == 429, "the right key is refused too once the bucket is empty"
            assert _login(http, key) == 429
    finally:
        running.stop()


def _mmagg_serve(url: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-c", "from mmagg.cli import main; main()", "serve"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--database-url", url, "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    pytest.fail("mmagg serve did not start")


def _closed_by_server(sock: socket.socket, trickle: bytes | None, wait: float) -> bool:
    """Whether the server closes `sock` within `wait` s while we trickle `trickle`."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if trickle is not None:
                sock.sendall(trickle)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


@pytest.mark.parametrize("trickle", [None, b"X-Slow: 1\r\n"], ids=["silent", "trickling"])
def test_slow_headers_are_cut_off(tmp_path: Path, trickle: bytes | None) -> None:
    process, port = _mmagg_serve(f"sqlite:///{tmp_path / 'slow.db'}", "--header-timeout", "1")
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        try:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert _closed_by_server(slow, trickle, wait=8.0)
        finally:
            slow.close()
        # A kept-alive connection that starts a second request and stalls is cut too...
        kept = socket.create_connection(("127.0.0.1", port))
        try:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            kept.settimeout(5)
            assert b"200 OK" in kept.recv(4096)
            kept.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert _closed_by_server(kept, trickle, wait=8.0)
        finally:
            kept.close()
        # ...while a prompt client is served.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _raw_request(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_large_report_does_not_hold_other_requests(backend: RunningBackend) -> None:
    """A /healthz sent while a 10,000-result report is being stored is answered first.

    On the event loop (before issue 12) the health check waited for the whole report.
    Ordering, not timing: the report takes hundreds of milliseconds, the check a few.
    """
    workspace, key = backend.new_workspace()
    items = [
        {"class_name": f"c{i % 100}", "confidence": (i % 997) / 997, "model_id": f"m/{i % 7}"}
        for i in range(10_000)
    ]
    body = json.dumps(
        {"timestamp": datetime.now(timezone.utc).isoformat(), "inference_results": items}
    ).encode()
    assert len(body) < LIMIT
    port = int(backend.base_url.rsplit(":", 1)[1])
    order: list[str] = []
    post = _raw_request(
        port,
        f"POST /{workspace}/inference-stats HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    try:
        time.sleep(0.05)  # the body is in; the server is validating and storing it
        probe = _raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:

            def wait(name: str, sock: socket.socket) -> None:
                answer = _read_answer(sock)
                assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
                order.append(name)

            threads = [
                threading.Thread(target=wait, args=("ingest", post)),
                threading.Thread(target=wait, args=("healthz", probe)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            probe.close()
    finally:
        post.close()
    assert order == ["healthz", "ingest"]
    deadline = time.monotonic() + 10
    while backend.db.count_reports(workspace) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.db.count_reports(workspace) == 1
