"""The `mmagg` command: keys round trip, schema versioning, serve and demo as subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from server_support import free_socket
from typer.testing import CliRunner

from mmagg.cli import app
from mmagg.server import Database, SchemaTooNewError, migrate, tables

KEY_RE = re.compile(r"^mmk_[A-Za-z0-9_-]{32}$")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    url: str = request.getfixturevalue("pg_database_url")
    return url


def test_keys_create_list_revoke_round_trip(database_url: str) -> None:
    runner = CliRunner()
    workspace = f"cli-{os.urandom(4).hex()}"
    created = runner.invoke(
        app, ["keys", "create", "--workspace", workspace, "--database-url", database_url]
    )
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert KEY_RE.match(key), created.stdout

    db = Database(database_url)
    try:
        principal = db.authenticate(key)
        assert principal is not None and principal.workspace == workspace
        listed = runner.invoke(app, ["keys", "list", "--database-url", database_url])
        assert listed.exit_code == 0
        assert workspace in listed.stdout
        assert key not in listed.stdout and key[8:] not in listed.stdout
        assert key[:8] in listed.stdout
        (info,) = [k for k in db.list_keys() if k.workspace == workspace]
        assert info.revoked_at is None

        revoked = runner.invoke(
            app, ["keys", "revoke", str(info.id), "--database-url", database_url]
        )
        assert revoked.exit_code == 0, revoked.output
        assert db.authenticate(key) is None
        (info,) = [k for k in db.list_keys() if k.workspace == workspace]
        assert info.revoked_at is not None
        again = runner.invoke(app, ["keys", "revoke", str(info.id), "--database-url", database_url])
        assert again.exit_code == 1
        assert "no active key" in again.output
    finally:
        db.close()


def test_keys_create_rejects_a_reserved_or_malformed_workspace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    for name in ("dashboard", "has space", "a/b"):
        result = CliRunner().invoke(
            app, ["keys", "create", "--workspace", name, "--database-url", url]
        )
        assert result.exit_code == 2, (name, result.output)
        assert "workspace" in result.output


def test_database_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MMAGG_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["keys", "create", "--workspace", "envws"])
    assert result.exit_code == 0, result.output
    db = Database(url)
    try:
        assert [k.workspace for k in db.list_keys()] == ["envws"]
    finally:
        db.close()


def test_schema_version_is_recorded_and_a_newer_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    db = Database(url)
    assert migrate(db.engine) == tables.SCHEMA_VERSION  # idempotent
    with db.engine.begin() as conn:
        assert tables.current_version(conn) == tables.SCHEMA_VERSION
        conn.execute(sa.update(tables.schema_version).values(version=tables.SCHEMA_VERSION + 1))
    db.close()
    with pytest.raises(SchemaTooNewError, match="upgrade mmagg"):
        Database(url)
    result = CliRunner().invoke(app, ["keys", "list", "--database-url", url])
    assert result.exit_code == 2
    assert "schema version" in result.output


def _run_mmagg(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mmagg.cli import main; main()", *args]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    db = Database(url)
    key = db.create_key("served")  # ingest only, the default: enough for the lookup
    db.close()
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        _run_mmagg("serve", "--port", str(port), "--database-url", url, "--log-level", "warning"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"mmagg serve did not come up: {output}")
            time.sleep(0.1)
        yield base, key
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def test_serve_runs_the_backend(served: tuple[str, str]) -> None:
    base, key = served
    assert httpx.get(f"{base}/", params={"api_key": key}).json() == {"workspace": "served"}


def test_demo_reports_every_simulated_source(tmp_path: Path) -> None:
    from mmagg.server.demo import SOURCES

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    completed = subprocess.run(
        _run_mmagg("demo", "--seconds", "12", "--frequency", "1", "--database-url", url),
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SIMULATED" in completed.stdout
    # Without --serve the backend is gone when the command returns: no dead URL, the way on.
    assert not re.search(r"http://127\.0\.0\.1:\d+/dashboard", completed.stdout)
    assert "add --serve to keep the dashboard open" in completed.stdout
    assert "helmet" in completed.stdout
    # The shipped rules catch the drift half-way while the stream runs (docs/alerts.md).
    assert "ALERT FIRING: helmet-confidence-low" in completed.stdout
    db = Database(url)
    try:
        with db.read() as conn:
            sources = set(conn.execute(sa.select(tables.results.c.source_id).distinct()).scalars())
        assert sources == {s.source_id for s in SOURCES}
        assert db.count_reports("demo") >= 3
    finally:
        db.close()


def test_access_log_lines_never_carry_the_key() -> None:
    import logging

    from mmagg.server.app import RedactApiKeys, install_log_redaction

    install_log_redaction()
    assert any(isinstance(f, RedactApiKeys) for f in logging.getLogger("uvicorn.access").filters)
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/?api_key=mmk_secret123&nocache=true", "1.1", 200),
        None,
    )
    RedactApiKeys().filter(record)
    line = record.getMessage()
    assert "mmk_secret123" not in line
    assert "api_key=***&nocache=true" in line


def test_missing_optional_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without_supervision(name: str, *args: object) -> object:
        return None if name == "supervision" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_supervision)
    result = CliRunner().invoke(app, ["demo", "--seconds", "1"])
    assert result.exit_code == 2
    assert "pip install 'mmagg[supervision]'" in result.output
