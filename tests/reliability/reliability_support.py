"""Helpers of the reliability suite: a restartable capture server, a transport that
records what the client saw, frame generators, thread probes."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def _load_shared_conftest() -> Any:
    # The shared tests/conftest.py is not importable by a unique name; load it by path.
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_mmagg_shared_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_shared = _load_shared_conftest()
CaptureServer = _shared.CaptureServer
Reply = _shared.Reply
FakeClock = _shared.FakeClock

SECRET_KEY = "mmk_SECRET_CANARY_7f3a9c1e5b2d4086"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortCaptureServer(CaptureServer):
    """A :class:`CaptureServer` on a chosen port that listens only once started, so that a
    client pointed at it first meets "connection refused"."""

    def __init__(self, port: int, workspace: str = "test-ws") -> None:
        super().__init__(workspace)
        self._handler = self.httpd.RequestHandlerClass
        self.httpd.server_close()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.started = False

    def start(self) -> PortCaptureServer:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="capture-server", daemon=True
        )
        self._thread.start()
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            super().stop()
        self._release.set()


@dataclass
class Exchange:
    """One request as the client saw it: its outcome and when."""

    method: str
    path: str
    idempotency_key: str | None
    body: bytes
    started: float
    status: int | None = None
    error: str | None = None
    response: bytes = b""

    @property
    def ok(self) -> bool:
        """A 2xx answer, and for the workspace lookup one that names a workspace."""
        if self.status is None or not 200 <= self.status < 300:
            return False
        if self.method == "GET":
            try:
                return isinstance(json.loads(self.response).get("workspace"), str)
            except (ValueError, AttributeError):
                return False
        return True


@dataclass
class RecordingTransport(httpx.BaseTransport):
    """Wraps a real transport and records every request and its outcome, client-side."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        exchange = Exchange(
            request.method,
            request.url.path,
            request.headers.get("idempotency-key"),
            request.read(),
            time.monotonic(),
        )
        with self.lock:
            self.exchanges.append(exchange)
        try:
            response = self.inner.handle_request(request)
            exchange.response = response.read()
        except Exception as error:
            exchange.error = type(error).__name__
            raise
        exchange.status = response.status_code
        return response

    def close(self) -> None:
        self.inner.close()

    def snapshot(self) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges)


def detections_frame(rng: np.random.Generator, n: int, classes: list[str]) -> Any:
    """An ``sv.Detections`` of ``n`` boxes over ``classes``, as a detector returns it."""
    import supervision as sv

    xy = rng.uniform(0, 600, size=(n, 2))
    ids = rng.integers(0, len(classes), size=n)
    return sv.Detections(
        xyxy=np.hstack([xy, xy + 20]).astype(np.float32),
        confidence=rng.uniform(0.05, 1.0, size=n).astype(np.float32),
        class_id=ids,
        data={
            "class_name": np.array(classes, dtype=object)[ids],
            "inference_id": np.full(n, "inf-1", dtype=object),
            "prediction_type": np.full(n, "object-detection", dtype=object),
        },
    )


def own_threads() -> list[threading.Thread]:
    """Live threads, minus the loopback servers' own request handlers."""
    return [
        t
        for t in threading.enumerate()
        if "process_request_thread" not in t.name
        and not t.name.startswith("capture-server")
        and not t.name.startswith("uvicorn")
    ]


def stream(
    agg: Any,
    frames: list[Any],
    seconds: float,
    on_frame: Callable[[int], None] | None = None,
    fps: int = 30,
) -> list[tuple[int, int]]:
    """Push frames at ``fps`` for ``seconds`` like a camera loop; per ``collect`` the wall
    and the thread-CPU durations (ns)."""
    durations = []
    start = time.perf_counter()
    for i in range(int(seconds * fps)):
        frame = frames[i % len(frames)]
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        result = agg.collect(frame)
        durations.append((time.perf_counter_ns() - t0, time.thread_time_ns() - c0))
        assert result["error_status"] is False, result
        if on_frame is not None:
            on_frame(i)
        # The next frame is due at start + (i + 1) / fps.
        pause = start + (i + 1) / fps - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    return durations


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class ServedApp:
    """An ASGI app served by uvicorn in a daemon thread on a free loopback port."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_app(app: Any, *, log_level: str = "warning", access_log: bool = False) -> ServedApp:
    """Serve ``app`` with uvicorn and wait until it listens."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=log_level, access_log=access_log, lifespan="on", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-reliability", daemon=True
    )
    thread.start()
    if not wait_until(lambda: server.started or not thread.is_alive(), 10):
        raise RuntimeError("uvicorn did not start")
    return ServedApp(server, thread, f"http://127.0.0.1:{port}")


def add_known_key(db: Any, workspace: str, key: str) -> None:
    """Register ``key`` (a recognisable canary) for ``workspace``, as ``keys create`` would."""
    import sqlalchemy as sa

    from mmagg.server.db import KEY_DISPLAY_CHARS, api_keys, hash_secret

    workspace_id = db.ensure_workspace(workspace)
    with db.write() as conn:
        conn.execute(
            sa.insert(api_keys).values(
                workspace_id=workspace_id,
                key_hash=hash_secret(key),
                prefix=key[:KEY_DISPLAY_CHARS],
                created_at=time.time(),
                scopes="admin,ingest,read",
            )
        )


def dump_sqlite(path: str) -> str:
    """Every row of every table of a SQLite file, as text."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lines = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                lines.append(f"{table}: {row!r}")
        return "\n".join(lines)
    finally:
        conn.close()


@dataclass
class ServeProcess:
    """``mmagg serve`` running as a subprocess; its output goes to ``log_path``."""

    proc: Any
    url: str
    log_path: Path

    def stop(self) -> str:
        """Stop the server; its whole output."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.log_path.read_text(errors="replace")


def start_mmagg_serve(database_url: str, log_path: Path, *extra: str) -> ServeProcess:
    """Start ``mmagg serve`` on a free port and wait for ``/healthz``."""
    import os
    import subprocess

    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mmagg.cli import main; main()",
            "serve",
            "--port",
            str(port),
            "--database-url",
            database_url,
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mmagg serve exited: {log_path.read_text()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(healthy, 30, interval=0.1):
        proc.kill()
        raise RuntimeError(f"mmagg serve did not start: {log_path.read_text()}")
    return ServeProcess(proc, url, log_path)
