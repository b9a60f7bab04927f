"""Real backends for the server tests: uvicorn on a free loopback port, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_support import PG_ADMIN_DSN, RunningBackend, scratch_pg_database, start_server

from mmagg.server import Database, create_app


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=2):
            return None
    except Exception as error:  # any failure means: no usable server here
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(error).__name__}: {error})"


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A freshly created PostgreSQL database, dropped after the session."""
    reason = _pg_available()
    if reason is not None:
        pytest.skip(reason)
    with scratch_pg_database("mmagg_test_") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningBackend]:
    """The backend on SQLite (a file) and on PostgreSQL, served for real over HTTP."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("db") / "mmagg.db"
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_database_url")
    db = Database(url)
    # Many tests here send wrong keys on purpose; the limit on failed key checks has tests of
    # its own (test_server_ratelimit.py), so it stays out of their way.
    running = start_server(create_app(db=db, login_failures_per_minute=100_000))
    try:
        yield RunningBackend(running.base_url, db, request.param)
    finally:
        running.stop()
        db.close()


@pytest.fixture
def client(backend: RunningBackend) -> Iterator[httpx.Client]:
    """An HTTP client pointed at the backend."""
    with httpx.Client(base_url=backend.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def fresh_pg_url(pg_database_url: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own, created empty and dropped after it."""
    with scratch_pg_database("mmagg_t_") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def v01_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An empty database of its own (the v0.1 DDL needs a clean slate): (url, kind)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'v01.db'}", "sqlite"
        return
    yield request.getfixturevalue("fresh_pg_url"), "postgresql"
