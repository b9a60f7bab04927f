"""Shared fixtures: a real, scriptable HTTP capture server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass
class Captured:
    """One request the capture server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What the server answers: status, JSON or raw body, headers, a delay, or a trick."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: "reset" closes the connection without an answer; "hang" never answers.
    action: str | None = None


Script = Callable[[Captured], Reply]


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (timeout, close at shutdown) is what many tests provoke: not
    worth a traceback on stderr, which would land outside any test's captured output."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class CaptureServer:
    """A threaded HTTP server whose answers each test scripts.

    By default it answers the workspace lookup ``GET /`` with ``{"workspace": workspace}``
    and every ``POST`` with 200. ``on_lookup`` / ``on_post`` replace those behaviours;
    ``replies`` queues one-shot answers for POSTs.
    """

    def __init__(self, workspace: str = "test-ws") -> None:
        self.workspace = workspace
        self.requests: list[Captured] = []
        self.replies: list[Reply] = []
        self.on_lookup: Script = lambda req: Reply(body={"workspace": self.workspace})
        self.on_post: Script = lambda req: Reply(body={"status": "ok"})
        self._lock = threading.Lock()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                captured = Captured(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.time(),
                )
                with server._lock:
                    server.requests.append(captured)
                    queued = (
                        server.replies.pop(0)
                        if (server.replies and self.command == "POST")
                        else None
                    )
                if queued is not None:
                    reply = queued
                elif self.command == "GET" and parts.path == "/":
                    reply = server.on_lookup(captured)
                else:
                    reply = server.on_post(captured)
                if reply.delay:
                    server._release.wait(reply.delay)
                if reply.action == "hang":
                    server._release.wait(3600)
                    return
                if reply.action == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                payload = (
                    reply.raw
                    if reply.raw is not None
                    else json.dumps(reply.body if reply.body is not None else {}).encode()
                )
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> CaptureServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def posts(self) -> list[Captured]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    @property
    def lookups(self) -> list[Captured]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == "/"]

    def wait_for_posts(self, n: int, timeout: float = 10.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            posts = self.posts
            if len(posts) >= n:
                return posts
            time.sleep(0.01)
        raise AssertionError(f"expected {n} POSTs within {timeout}s, got {len(self.posts)}")


@pytest.fixture
def capture_server() -> Iterator[CaptureServer]:
    server = CaptureServer().start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    """An injectable wall clock (seconds) that tests move by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _close_reporters_the_test_left_open() -> Iterator[None]:
    """Tests close what they open; this catches the ones that forgot, so nothing reports
    (or logs "report failed at shutdown") at interpreter exit, after pytest's summary.

    Only reporters created during the test are closed: a module fixture's stay open.
    """
    from mmagg.reporter import REPORTERS

    before = set(map(id, REPORTERS.live()))
    yield
    for left in REPORTERS.live():
        if id(left) not in before:
            try:
                left.close(0)
            except Exception:  # a test that broke its reporter on purpose
                pass


@contextmanager
def _holding_readme_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port 9090, the README's, held against the other tests that serve on it.

    Under pytest-xdist (scripts/test.sh) files run in parallel worker processes; the lock file
    sits in the run's shared temporary folder, so only one worker serves on 9090 at a time.
    """
    import fcntl

    lock_path = tmp_path_factory.getbasetemp().parent / "mmagg-readme-port-9090.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield 9090
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def readme_port_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The README's port, for a module-scoped fixture that serves on it."""
    with _holding_readme_port(tmp_path_factory) as port:
        yield port


@pytest.fixture
def readme_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The README's port, for one test that serves on it."""
    with _holding_readme_port(tmp_path_factory) as port:
        yield port
