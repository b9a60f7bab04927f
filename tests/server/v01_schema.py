"""A schema-version-1 database exactly as v0.1 created it, for the upgrade tests.

The DDL is frozen here (not derived from the current metadata, which already holds every later
column and table), so an upgrade test starts from what a v0.1 user has on disk.
"""

from __future__ import annotations

import hashlib
import time

import sqlalchemy as sa

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
