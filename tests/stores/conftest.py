"""A real redis-server for the store tests: our own on a free port, killable and restartable.

Falls back to the server on localhost:6379 with a database of its own (flushed around
each test) when ``redis-server`` cannot be started; the outage tests then skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

redis = pytest.importorskip("redis")

FALLBACK_URL = "redis://127.0.0.1:6379/13"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process we own (``own``) or the machine's, by URL."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.own = port is not None
        self.url = f"redis://127.0.0.1:{port}/0" if port is not None else FALLBACK_URL
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.port is not None
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 5 s")

    def kill(self) -> None:
        """Kill -9: no shutdown, no save; the data is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1)

    def flush(self) -> None:
        with self.client() as client:
            client.flushdb()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_free_port())
    try:
        server.start()
    except (OSError, RuntimeError):
        server.kill()
        server = RedisServer(None)
        try:
            server.client().ping()
        except redis.RedisError:
            pytest.skip("no redis-server could be started and none runs on 6379")
    try:
        yield server
    finally:
        if server.own:
            server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    if redis_server.own and (
        redis_server.process is None or redis_server.process.poll() is not None
    ):
        redis_server.start()  # an outage test left it down
    redis_server.flush()
    yield redis_server.url
    if redis_server.process is not None or not redis_server.own:
        redis_server.flush()


@pytest.fixture
def own_redis(redis_server: RedisServer, redis_url: str) -> RedisServer:
    """The server, for tests that kill and restart it."""
    if not redis_server.own:
        pytest.skip("needs a redis-server of our own to kill and restart")
    return redis_server
