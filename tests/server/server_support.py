"""Helpers shared by the server tests: a uvicorn thread and the running-backend handle."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from mmagg.server import Database
from mmagg.server.auth import ALL_SCOPES

try:
    from mmagg.server.protocols import guarded_protocol
except ImportError:  # an older tree (to show that a new test fails on the old code)
    guarded_protocol = None  # type: ignore[assignment]


#: The PostgreSQL database the tests connect to for creating and dropping their own.
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def create_pg_database(name: str, template: str | None = None) -> str:
    """Create PostgreSQL database `name` (a copy of `template` if given); its URL."""
    import psycopg

    suffix = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    """Drop PostgreSQL database `name` if it exists, whoever is still connected."""
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database named `prefix` + a random suffix, dropped
    on exit."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    url = create_pg_database(name)
    try:
        yield url
    finally:
        drop_pg_database(name)


@dataclass
class RunningBackend:
    """A backend serving on `base_url`, with direct access to its database."""

    base_url: str
    db: Database
    kind: str

    def new_workspace(self, scopes: frozenset[str] = ALL_SCOPES) -> tuple[str, str]:
        """A fresh workspace and a key for it, so tests sharing the server stay independent.

        The key has every scope unless `scopes` says otherwise: these tests read back what
        they wrote (a real deployment gives devices ingest-only keys).
        """
        workspace = f"ws-{uuid.uuid4().hex[:12]}"
        return workspace, self.db.create_key(workspace, scopes)


class ManualClock:
    """A clock for `Database(clock=...)`: real time (or `frozen`) plus an offset tests move.

    Example:
        >>> clock = ManualClock(frozen=1000.0)
        >>> clock.advance(61)
        >>> clock()
        1061.0
    """

    def __init__(self, frozen: float | None = None) -> None:
        self.frozen = frozen
        self.offset = 0.0

    def __call__(self) -> float:
        base = time.time() if self.frozen is None else self.frozen
        return base + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def free_socket() -> socket.socket:
    """A listening-ready loopback socket on a port the OS picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class ServerThread:
    """uvicorn running an app in a daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    base_url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(app: object) -> ServerThread:
    """Serve `app` with uvicorn on a free port and wait until it answers."""
    sock = free_socket()
    port = sock.getsockname()[1]
    # The slow-client guard of `mmagg serve`; uvicorn's own proxy-header defaults stay (the
    # app must hold against them: tests/server/test_server_operations.py).
    http = guarded_protocol() if guarded_protocol is not None else "auto"
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return ServerThread(server, thread, f"http://127.0.0.1:{port}")
