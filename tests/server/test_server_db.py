"""Storage details that HTTP tests do not reach: URLs, sessions, workspace names."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from mmagg.server import tables
from mmagg.server.db import KEY_DISPLAY_CHARS, Database, WorkspaceNameError, hash_secret
from mmagg.server.tables import normalize_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_postgres_urls_use_psycopg3(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_sqlite_file_is_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        db.close()


def test_sessions_expire_and_store_only_a_hash(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 's.db'}")
    try:
        key = db.create_key("acme")
        principal = db.authenticate(key)
        assert principal is not None
        live = db.create_session(principal)
        dead = db.create_session(principal, ttl=-1)
        assert db.session_principal(live) == principal
        assert db.session_principal(dead) is None
        with db.read() as conn:
            stored = conn.execute(sa.select(tables.dashboard_sessions)).all()
        assert all(live not in repr(tuple(row)) for row in stored)
        assert hash_secret(live) in {row.token_hash for row in stored}
        db.delete_session(live)
        assert db.session_principal(live) is None
        again = db.create_session(principal)
        assert db.revoke_key(principal.key_id)
        assert db.session_principal(again) is None, "revoking the key ends its sessions"
    finally:
        db.close()


@pytest.mark.parametrize("name", ["", "dashboard", "Metrics", "a b", "x" * 65, "-lead", "a/b"])
def test_workspace_names_that_cannot_be_url_segments_are_refused(name: str) -> None:
    db = Database("sqlite://")
    try:
        with pytest.raises(WorkspaceNameError, match="workspace: expected"):
            db.create_key(name)
    finally:
        db.close()


def test_revoke_by_prefix_and_unknown_id(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        key = db.create_key("acme")
        assert not db.revoke_key(999)
        assert db.revoke_key(key[:KEY_DISPLAY_CHARS])
        assert db.authenticate(key) is None
        assert not db.revoke_key(key[:KEY_DISPLAY_CHARS])
    finally:
        db.close()


def _old_and_new_reports(db: Database) -> tuple[int, int]:
    from datetime import datetime, timedelta, timezone

    from mmagg.server.schemas import REPORT_ADAPTER

    key = db.create_key("acme")
    principal = db.authenticate(key)
    assert principal is not None
    now = datetime.now(timezone.utc)
    for age_days in (40, 35, 1, 0):
        body = {
            "timestamp": (now - timedelta(days=age_days)).isoformat(),
            "inference_results": [
                {"class_name": "car", "confidence": 0.5, "model_id": "m/1"},
                {"class_name": "dog", "confidence": 0.4, "model_id": "m/1"},
            ],
        }
        db.store_report(principal, REPORT_ADAPTER.validate_python(body), None)
    return 2, 2


def _counts(db: Database) -> tuple[int, int]:
    with db.read() as conn:
        reports = conn.execute(sa.select(sa.func.count()).select_from(tables.reports)).scalar()
        results = conn.execute(sa.select(sa.func.count()).select_from(tables.results)).scalar()
    return int(reports or 0), int(results or 0)


def test_prune_deletes_old_reports_with_their_results_in_batches(tmp_path: Path) -> None:
    import time

    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        old, new = _old_and_new_reports(db)
        assert db.prune(before=time.time() - 30 * 86400, batch=1) == old
        assert _counts(db) == (new, 2 * new)
        assert db.prune(before=time.time() - 30 * 86400) == 0
    finally:
        db.close()


def test_prune_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmagg.cli import app

    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = Database(url)
    _old_and_new_reports(db)
    db.close()
    result = CliRunner().invoke(app, ["prune", "--older-than", "30", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "Deleted 2 reports" in result.output
    db = Database(url)
    try:
        assert _counts(db) == (2, 4)
    finally:
        db.close()


def test_served_app_with_retention_prunes_at_start(tmp_path: Path) -> None:
    import time

    from server_support import start_server

    from mmagg.server import create_app

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    _old_and_new_reports(db)
    running = start_server(create_app(db=db, retention_days=30))
    try:
        deadline = time.monotonic() + 10
        while _counts(db) != (2, 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _counts(db) == (2, 4)
    finally:
        running.stop()
