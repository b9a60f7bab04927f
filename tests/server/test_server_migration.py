"""Upgrading a v0.1 database (schema version 1) to key scopes (schema step 2), on SQLite and
PostgreSQL.

The v0.1 database is built from the DDL below, frozen as v0.1 shipped it (not from the
current metadata, which would already hold the new columns), with a workspace, a key and a
dashboard session written the way v0.1 wrote them. After the upgrade the old key must still
do everything it could: look up, ingest, read, open the dashboard, and (as every scope is
granted to old keys) manage keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result
from server_support import start_server
from typer.testing import CliRunner

from mmagg.cli import app as cli_app
from mmagg.server import Database, create_app, tables

# Schema version 1, as v0.1 created it; `{id}` and `{float}` differ per database.
V01_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE workspaces (
    id {id} NOT NULL, name VARCHAR(64) NOT NULL, created_at {float} NOT NULL,
    PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE api_keys (
    id {id} NOT NULL, workspace_id INTEGER NOT NULL, key_hash VARCHAR(64) NOT NULL,
    prefix VARCHAR(16) NOT NULL, created_at {float} NOT NULL, revoked_at {float},
    PRIMARY KEY (id), FOREIGN KEY(workspace_id) REFERENCES workspaces (id), UNIQUE (key_hash));
CREATE TABLE reports (
    id {id} NOT NULL, workspace_id INTEGER NOT NULL, received_at {float} NOT NULL,
    ts {float} NOT NULL, device_id VARCHAR(1024), source VARCHAR(1024),
    source_info VARCHAR(1024), inference_server_version VARCHAR(1024), system_info TEXT NOT NULL,
    idempotency_key VARCHAR(255), frequency {float}, extension TEXT,
    result_count INTEGER NOT NULL, PRIMARY KEY (id),
    CONSTRAINT uq_reports_idempotency UNIQUE (workspace_id, idempotency_key),
    FOREIGN KEY(workspace_id) REFERENCES workspaces (id));
CREATE INDEX ix_reports_workspace_ts ON reports (workspace_id, ts);
CREATE TABLE dashboard_sessions (
    token_hash VARCHAR(64) NOT NULL, workspace_id INTEGER NOT NULL, api_key_id INTEGER NOT NULL,
    created_at {float} NOT NULL, expires_at {float} NOT NULL, PRIMARY KEY (token_hash),
    FOREIGN KEY(workspace_id) REFERENCES workspaces (id),
    FOREIGN KEY(api_key_id) REFERENCES api_keys (id));
CREATE TABLE results (
    id {id} NOT NULL, report_id INTEGER NOT NULL, workspace_id INTEGER NOT NULL,
    ts {float} NOT NULL, device_id VARCHAR(1024), model_id VARCHAR(1024) NOT NULL,
    class_name VARCHAR(1024) NOT NULL, confidence {float} NOT NULL, inference_id VARCHAR(1024),
    model_type VARCHAR(1024), source_id VARCHAR(1024), stats_count INTEGER, stats_sum {float},
    stats_min {float}, stats_max {float}, hist_0 INTEGER, hist_1 INTEGER, hist_2 INTEGER,
    hist_3 INTEGER, hist_4 INTEGER, hist_5 INTEGER, hist_6 INTEGER, hist_7 INTEGER,
    hist_8 INTEGER, hist_9 INTEGER, PRIMARY KEY (id),
    FOREIGN KEY(report_id) REFERENCES reports (id) ON DELETE CASCADE);
CREATE INDEX ix_results_report_id ON results (report_id);
CREATE INDEX ix_results_ws_model_ts ON results (workspace_id, model_id, ts);
CREATE INDEX ix_results_ws_ts ON results (workspace_id, ts);
"""
DIALECT_TYPES = {
    "sqlite": {"id": "INTEGER", "float": "FLOAT"},
    "postgresql": {"id": "SERIAL", "float": "FLOAT(53)"},
}
WORKSPACE = "legacy"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_v01_database(url: str, kind: str, key: str, session_token: str) -> None:
    """A schema-version-1 database holding one workspace, its key and a live session."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            for statement in V01_DDL.format(**DIALECT_TYPES[kind]).split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)
            now = time.time()
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (1)"))
            conn.execute(
                sa.text("INSERT INTO workspaces (name, created_at) VALUES (:name, :now)"),
                {"name": WORKSPACE, "now": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (workspace_id, key_hash, prefix, created_at) "
                    "SELECT id, :hash, :prefix, :now FROM workspaces WHERE name = :name"
                ),
                {"hash": _sha256(key), "prefix": key[:8], "now": now - 86400, "name": WORKSPACE},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO dashboard_sessions "
                    "(token_hash, workspace_id, api_key_id, created_at, expires_at) "
                    "SELECT :token, workspace_id, id, :now, :until FROM api_keys"
                ),
                {"token": _sha256(session_token), "now": now, "until": now + 3600},
            )
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def v01_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An empty database of its own (the v0.1 DDL needs a clean slate): (url, kind)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'v01.db'}", "sqlite"
        return
    request.getfixturevalue("pg_database_url")  # skips when PostgreSQL is not reachable
    import psycopg

    name = f"mmagg_v01_{uuid.uuid4().hex[:12]}"
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}", "postgresql"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_v01_key_keeps_every_power_after_the_upgrade(v01_url: tuple[str, str]) -> None:
    url, kind = v01_url
    key = "mmk_" + secrets.token_urlsafe(24)
    session_token = secrets.token_urlsafe(32)
    build_v01_database(url, kind, key, session_token)

    db = Database(url)  # migrates
    running = start_server(create_app(db=db))
    try:
        with db.engine.connect() as conn:
            assert tables.current_version(conn) == tables.SCHEMA_VERSION
            columns = {c["name"] for c in sa.inspect(conn).get_columns("api_keys")}
        assert {"scopes", "expires_at", "last_used_at"} <= columns
        (old,) = db.list_keys()
        assert old.scopes == {"ingest", "read", "admin"}
        assert old.expires_at is None and old.revoked_at is None

        bearer = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=running.base_url, timeout=10) as http:
            assert http.get("/", params={"api_key": key}).json() == {"workspace": WORKSPACE}
            stored = http.post(
                f"/{WORKSPACE}/inference-stats",
                params={"api_key": key},
                json=report([result("legacy-class", 0.75)]),
            )
            assert stored.status_code == 200, stored.text
            stats = http.get(f"/{WORKSPACE}/inference-stats", headers=bearer)
            assert stats.status_code == 200
            assert [i["predicted_class"] for i in stats.json()["inference_stats"]] == [
                "legacy-class"
            ]
            listed = http.get(f"/{WORKSPACE}/api/keys", headers=bearer)
            assert listed.status_code == 200
            assert listed.json()["keys"][0]["scopes"] == ["admin", "ingest", "read"]
            # The v0.1 session still works, and the key still opens new ones.
            http.cookies.set("mmagg_session", session_token)
            assert http.get("/dashboard/api/me").json() == {"workspace": WORKSPACE}
            http.cookies.clear()
            assert http.post("/dashboard/api/login", json={"api_key": key}).status_code == 200

        # A key made after the upgrade gets the safe default, ingest only.
        new_key = db.create_key(WORKSPACE)
        principal = db.authenticate(new_key)
        assert principal is not None and principal.scopes == {"ingest"}
    finally:
        running.stop()
        db.close()

    shown = CliRunner().invoke(cli_app, ["keys", "list", "--database-url", url])
    assert shown.exit_code == 0, shown.output
    assert "admin,ingest,read" in shown.stdout


def test_step_2_is_idempotent_on_an_upgraded_or_new_database(v01_url: tuple[str, str]) -> None:
    url, kind = v01_url
    build_v01_database(url, kind, "mmk_" + secrets.token_urlsafe(24), secrets.token_urlsafe(32))
    for _ in range(2):  # the upgraded database, then the same again (already at version 2)
        db = Database(url)
        try:
            with db.engine.begin() as conn:
                tables.MIGRATIONS[2](conn)  # a second run adds nothing and changes nothing
            assert [sorted(k.scopes) for k in db.list_keys()] == [["admin", "ingest", "read"]]
        finally:
            db.close()
