"""The backend's storage operations: workspaces, API keys, dashboard sessions, reports.

Tables, migrations and engine set-up live in `mmagg.server.tables`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server.schemas import Report
from mmagg.server.tables import (
    api_keys,
    create_db_engine,
    dashboard_sessions,
    migrate,
    reports,
    results,
    workspaces,
)
from mmagg.wire import HISTOGRAM_BUCKETS

KEY_PREFIX = "mmk_"
KEY_DISPLAY_CHARS = 8
SESSION_TTL_SECONDS = 12 * 3600

# Names the backend routes under; a workspace called like this would be unreachable.
RESERVED_WORKSPACES = frozenset({"dashboard", "metrics", "healthz", "api", "static", "docs"})
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Built once: constructing a statement per request costs more than executing it.
_AUTH_QUERY = (
    sa.select(api_keys.c.key_hash, workspaces.c.id, workspaces.c.name, api_keys.c.id)
    .join(workspaces, workspaces.c.id == api_keys.c.workspace_id)
    .where(api_keys.c.key_hash == sa.bindparam("digest"), api_keys.c.revoked_at.is_(None))
)

_REPORT_COLUMNS = tuple(c.name for c in reports.columns if c.name != "id")
_RESULT_COLUMNS = tuple(c.name for c in results.columns if c.name != "id")


def _insert_sql(table: sa.Table, columns: tuple[str, ...], placeholder: str) -> str:
    values = ", ".join([placeholder] * len(columns))
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({values})"


@dataclass(frozen=True)
class _WriteSql:
    """The ingest INSERTs in the driver's own paramstyle.

    Ingest runs them on the DBAPI cursor directly: SQLAlchemy's per-execution bookkeeping
    costs more than SQLite's insert itself, and this is the one path hit hundreds of
    times a second.
    """

    insert_report: str
    insert_results: str
    returning: bool

    @classmethod
    def for_dialect(cls, dialect: str) -> _WriteSql:
        placeholder = "?" if dialect == "sqlite" else "%s"
        returning = dialect != "sqlite"
        report_sql = _insert_sql(reports, _REPORT_COLUMNS, placeholder)
        return cls(
            insert_report=report_sql + (" RETURNING id" if returning else ""),
            insert_results=_insert_sql(results, _RESULT_COLUMNS, placeholder),
            returning=returning,
        )


class WorkspaceNameError(ValueError):
    """A workspace name that cannot be used in a URL path."""


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a key or session token; the only form the database ever holds."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A fresh key: `mmk_` followed by 32 URL-safe characters (192 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def validate_workspace_name(name: str) -> str:
    """Return `name` if it can be a workspace; raise `WorkspaceNameError` otherwise."""
    if not _WORKSPACE_RE.match(name) or name.lower() in RESERVED_WORKSPACES:
        raise WorkspaceNameError(
            f"workspace: expected 1-64 characters of letters, digits, '_', '-', '.' starting "
            f"with a letter or digit and not one of {sorted(RESERVED_WORKSPACES)}, got {name!r}"
        )
    return name


@dataclass(frozen=True)
class KeyInfo:
    """A row of `mmagg keys list`: never the key, only its public prefix."""

    id: int
    prefix: str
    workspace: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Principal:
    """Who a key or session belongs to, and through which key."""

    workspace_id: int
    workspace: str
    key_id: int


@dataclass(frozen=True)
class StoredReport:
    """Outcome of storing one report."""

    report_id: int
    result_count: int
    duplicate: bool


class Database:
    """The backend's storage: one engine, the writes, keys and sessions.

    Example:
        >>> db = Database("sqlite://")
        >>> key = db.create_key("acme")
        >>> db.authenticate(key).workspace
        'acme'
    """

    def __init__(self, database_url: str, *, migrate_schema: bool = True) -> None:
        self.url = database_url
        self.engine = create_db_engine(database_url)
        self.dialect = self.engine.dialect.name
        # SQLite allows one writer; serialising in-process writers here avoids SQLITE_BUSY
        # back-off sleeps, which would dominate the ingest tail latency.
        self._write_lock: threading.Lock | None = (
            threading.Lock() if self.dialect == "sqlite" else None
        )
        self._sql = _WriteSql.for_dialect(self.dialect)
        self._integrity_error: type[Exception] = self.engine.dialect.loaded_dbapi.IntegrityError
        if migrate_schema:
            migrate(self.engine)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, serialised in-process on SQLite."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads."""
        with self.engine.connect() as conn:
            yield conn

    # workspaces and keys

    def ensure_workspace(self, name: str) -> int:
        """The id of workspace `name`, created if missing."""
        validate_workspace_name(name)
        find = sa.select(workspaces.c.id).where(workspaces.c.name == name)
        try:
            with self.write() as conn:
                found = conn.execute(find).scalar()
                if found is not None:
                    return int(found)
                return _inserted_id(
                    conn.execute(sa.insert(workspaces).values(name=name, created_at=time.time()))
                )
        except sa.exc.IntegrityError:
            # Another process created it between our select and insert.
            with self.read() as conn:
                return int(conn.execute(find).scalar_one())

    def create_key(self, workspace: str) -> str:
        """Create a key for `workspace` (created if missing) and return it; shown only once."""
        workspace_id = self.ensure_workspace(workspace)
        key = new_api_key()
        with self.write() as conn:
            conn.execute(
                sa.insert(api_keys).values(
                    workspace_id=workspace_id,
                    key_hash=hash_secret(key),
                    prefix=key[:KEY_DISPLAY_CHARS],
                    created_at=time.time(),
                )
            )
        return key

    def list_keys(self) -> list[KeyInfo]:
        """Every key, oldest first, without any secret."""
        query = (
            sa.select(
                api_keys.c.id,
                api_keys.c.prefix,
                workspaces.c.name,
                api_keys.c.created_at,
                api_keys.c.revoked_at,
            )
            .join(workspaces, workspaces.c.id == api_keys.c.workspace_id)
            .order_by(api_keys.c.id)
        )
        with self.read() as conn:
            return [KeyInfo(*row) for row in conn.execute(query)]

    def revoke_key(self, key_id: int | str) -> bool:
        """Revoke a key by numeric id or prefix; False if no active key matched."""
        if isinstance(key_id, int) or str(key_id).isdigit():
            where = api_keys.c.id == int(key_id)
        else:
            where = api_keys.c.prefix == str(key_id)
        with self.write() as conn:
            updated = conn.execute(
                sa.update(api_keys)
                .where(where, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            return updated.rowcount > 0

    def authenticate(self, api_key: str, conn: Connection | None = None) -> Principal | None:
        """The workspace of an active key, or None for an unknown or revoked key."""
        digest = hash_secret(api_key)
        params = {"digest": digest}
        if conn is None:
            with self.read() as own:
                row = own.execute(_AUTH_QUERY, params).first()
        else:
            row = conn.execute(_AUTH_QUERY, params).first()
        # The index lookup already matched; comparing again in constant time keeps the
        # check independent of how the database compares strings.
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return Principal(workspace_id=int(row[1]), workspace=str(row[2]), key_id=int(row[3]))

    # sessions

    def create_session(self, principal: Principal, ttl: float = SESSION_TTL_SECONDS) -> str:
        """A new opaque session token for `principal`; only its hash is stored."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.write() as conn:
            conn.execute(sa.delete(dashboard_sessions).where(dashboard_sessions.c.expires_at < now))
            conn.execute(
                sa.insert(dashboard_sessions).values(
                    token_hash=hash_secret(token),
                    workspace_id=principal.workspace_id,
                    api_key_id=principal.key_id,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
        return token

    def session_principal(self, token: str) -> Principal | None:
        """The principal of a live session token: not expired, its key not revoked."""
        query = (
            sa.select(workspaces.c.id, workspaces.c.name, api_keys.c.id)
            .join(dashboard_sessions, dashboard_sessions.c.workspace_id == workspaces.c.id)
            .join(api_keys, api_keys.c.id == dashboard_sessions.c.api_key_id)
            .where(
                dashboard_sessions.c.token_hash == hash_secret(token),
                dashboard_sessions.c.expires_at > time.time(),
                api_keys.c.revoked_at.is_(None),
            )
        )
        with self.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else Principal(int(row[0]), str(row[1]), int(row[2]))

    def delete_session(self, token: str) -> None:
        """End a session (logout)."""
        with self.write() as conn:
            conn.execute(
                sa.delete(dashboard_sessions).where(
                    dashboard_sessions.c.token_hash == hash_secret(token)
                )
            )

    # reports

    def store_report(
        self, principal: Principal, report: Report, idempotency_key: str | None
    ) -> StoredReport:
        """Store a report and its results in one transaction, at most once per key."""
        now = time.time()
        ts = report.timestamp.timestamp()
        ext = report.mmagg
        row = (
            principal.workspace_id,
            now,
            ts,
            report.device_id,
            report.source,
            report.source_info,
            report.inference_server_version,
            json.dumps(report.system_info()),
            idempotency_key,
            ext.frequency if ext is not None else None,
            ext.model_dump_json() if ext is not None else None,
            len(report.inference_results),
        )
        sql = self._sql
        try:
            with self.write() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(sql.insert_report, row)
                    fetched = cursor.fetchone() if sql.returning else (cursor.lastrowid,)
                    if fetched is None or fetched[0] is None:
                        raise RuntimeError("the database returned no id for the report")
                    report_id = int(fetched[0])
                    if report.inference_results:
                        cursor.executemany(
                            sql.insert_results,
                            _result_rows(report, report_id, principal.workspace_id, ts),
                        )
                finally:
                    cursor.close()
        except self._integrity_error:
            if idempotency_key is None:
                raise
            existing = self._find_idempotent(principal.workspace_id, idempotency_key)
            if existing is None:
                raise
            return existing
        return StoredReport(report_id, len(report.inference_results), duplicate=False)

    def _find_idempotent(self, workspace_id: int, key: str) -> StoredReport | None:
        query = sa.select(reports.c.id, reports.c.result_count).where(
            reports.c.workspace_id == workspace_id, reports.c.idempotency_key == key
        )
        with self.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else StoredReport(int(row[0]), int(row[1]), duplicate=True)

    def prune(self, before: float, batch: int = 1_000) -> int:
        """Delete reports (and their results) timestamped before `before`; return how many.

        Works in batches of `batch` reports, each its own short transaction, so that ingest
        (which shares the SQLite write lock) waits for one batch at most. Expired dashboard
        sessions go too.

        Example:
            >>> Database("sqlite://").prune(before=0.0)
            0
        """
        removed = 0
        while True:
            with self.write() as conn:
                ids = (
                    conn.execute(
                        sa.select(reports.c.id)
                        .where(reports.c.ts < before)
                        .order_by(reports.c.id)
                        .limit(batch)
                    )
                    .scalars()
                    .all()
                )
                if ids:
                    conn.execute(sa.delete(results).where(results.c.report_id.in_(ids)))
                    conn.execute(sa.delete(reports).where(reports.c.id.in_(ids)))
            removed += len(ids)
            if len(ids) < batch:
                break
        with self.write() as conn:
            conn.execute(
                sa.delete(dashboard_sessions).where(dashboard_sessions.c.expires_at < time.time())
            )
        return removed

    def count_reports(self, workspace: str | None = None) -> int:
        """Number of stored reports, in one workspace or overall."""
        query = sa.select(sa.func.count()).select_from(reports)
        if workspace is not None:
            query = query.join(workspaces, workspaces.c.id == reports.c.workspace_id).where(
                workspaces.c.name == workspace
            )
        with self.read() as conn:
            return int(conn.execute(query).scalar() or 0)


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise RuntimeError("the database returned no id for an inserted row")
    return int(key[0])


_NO_HISTOGRAM = (None,) * HISTOGRAM_BUCKETS


def _result_rows(
    report: Report, report_id: int, workspace_id: int, ts: float
) -> list[tuple[Any, ...]]:
    """Rows for `results`, in `_RESULT_COLUMNS` order."""
    rows = []
    for item in report.inference_results:
        stats = item.stats
        rows.append(
            (
                report_id,
                workspace_id,
                ts,
                report.device_id,
                item.model_id,
                item.class_name,
                item.confidence,
                item.inference_id,
                item.model_type,
                item.source_id,
                stats.count if stats else None,
                stats.sum if stats else None,
                stats.min if stats else None,
                stats.max if stats else None,
                *(stats.histogram if stats else _NO_HISTOGRAM),
            )
        )
    return rows
