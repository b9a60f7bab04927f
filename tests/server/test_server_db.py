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
