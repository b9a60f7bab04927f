"""The backend's storage operations: workspaces, API keys, dashboard sessions, reports.

Tables, migrations and engine set-up live in `mmagg.server.tables`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server import partitions
from mmagg.server import rollups as rollup_rows
from mmagg.server.auth import (
    DEFAULT_SCOPES,
    LAST_USED_RESOLUTION_SECONDS,
    format_scopes,
    parse_scopes,
    stored_scopes,
)
from mmagg.server.bounds import Placement, place
from mmagg.server.schemas import Report
from mmagg.server.tables import (
    api_keys,
    create_db_engine,
    dashboard_sessions,
    migrate,
    reports,
    results,
    rollups,
    workspaces,
)
from mmagg.wire import HISTOGRAM_BUCKETS

logger = logging.getLogger("mmagg.server")

KEY_PREFIX = "mmk_"
KEY_DISPLAY_CHARS = 8
SESSION_TTL_SECONDS = 12 * 3600
# Result rows per executemany call (store_report).
INSERT_SLICE = 500
# Reports per prune transaction: SQLite's one write lock is shared with ingest, so short;
# PostgreSQL only locks the old rows themselves, and each commit costs a WAL flush.
PRUNE_BATCH = 1_000
PRUNE_BATCH_PG = 20_000

# Names the backend routes under; a workspace called like this would be unreachable.
RESERVED_WORKSPACES = frozenset({"dashboard", "metrics", "healthz", "api", "static", "docs"})
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Built once: constructing a statement per request costs more than executing it.
_AUTH_QUERY = (
    sa.select(
        api_keys.c.key_hash,
        workspaces.c.id,
        workspaces.c.name,
        api_keys.c.id,
        api_keys.c.scopes,
        api_keys.c.expires_at,
    )
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
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None
    last_used_at: float | None = None

    def status(self, now: float) -> str:
        """`active`, `revoked` or `expired` at time `now`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class AmbiguousKeyError(LookupError):
    """A key prefix that matches more than one active key; nothing was revoked."""

    def __init__(self, prefix: str, matches: list[KeyInfo]) -> None:
        ids = ", ".join(str(info.id) for info in matches)
        super().__init__(
            f"key prefix {prefix!r} matches {len(matches)} active keys (ids {ids}); "
            "nothing was revoked: revoke by id"
        )
        self.prefix = prefix
        self.matches = matches


@dataclass(frozen=True)
class Principal:
    """Who a key or session belongs to, through which key, and what it may do."""

    workspace_id: int
    workspace: str
    key_id: int
    scopes: frozenset[str] = frozenset()


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

    def __init__(
        self,
        database_url: str,
        *,
        migrate_schema: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = database_url
        # Key lifetimes, last-used times and sessions read this clock (tests inject one).
        self.clock = clock
        # key id -> when this process last wrote its last_used_at.
        self._last_used_written: dict[int, float] = {}
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
        # PostgreSQL, `results` and `rollups` partitioned by day (step 7): the days that exist.
        self.partitions: partitions.PartitionSet | None = None
        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                partitioned = partitions.is_partitioned(conn)
            if partitioned:
                self.partitions = partitions.PartitionSet(self.engine, clock)
                self.partitions.prepare()

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

    def create_key(
        self,
        workspace: str,
        scopes: str | Iterable[str] = DEFAULT_SCOPES,
        *,
        expires_in: float | None = None,
    ) -> str:
        """Create a key for `workspace` (created if missing) and return it; shown only once.

        The default scopes are `ingest` only: what a device needs, and nothing more. Pass
        `scopes={"read"}` (or `"read"`, `"ingest,read"`) for a person's dashboard key; an
        unknown scope raises `mmagg.server.auth.ScopeError`. With `expires_in` (seconds) the key
        dies on its own that long after creation.

        Example:
            >>> db = Database("sqlite://")
            >>> sorted(db.authenticate(db.create_key("acme")).scopes)
            ['ingest']
            >>> sorted(db.authenticate(db.create_key("acme", {"read", "admin"})).scopes)
            ['admin', 'read']
            >>> sorted(db.authenticate(db.create_key("acme", "ingest,read")).scopes)
            ['ingest', 'read']
        """
        return self.create_key_record(workspace, scopes, expires_in=expires_in)[0]

    def create_key_record(
        self,
        workspace: str,
        scopes: str | Iterable[str] = DEFAULT_SCOPES,
        *,
        expires_in: float | None = None,
    ) -> tuple[str, KeyInfo]:
        """`create_key`, also returning the new key's listing row (id, prefix, expiry)."""
        chosen = parse_scopes([scopes] if isinstance(scopes, str) else scopes)
        if expires_in is not None and not expires_in > 0:
            raise ValueError(f"expires_in: expected a positive number of seconds, got {expires_in}")
        workspace_id = self.ensure_workspace(workspace)
        key = new_api_key()
        now = self.clock()
        expires_at = None if expires_in is None else now + expires_in
        with self.write() as conn:
            key_id = _inserted_id(
                conn.execute(
                    sa.insert(api_keys).values(
                        workspace_id=workspace_id,
                        key_hash=hash_secret(key),
                        prefix=key[:KEY_DISPLAY_CHARS],
                        created_at=now,
                        scopes=format_scopes(chosen),
                        expires_at=expires_at,
                    )
                )
            )
        info = KeyInfo(
            id=key_id,
            prefix=key[:KEY_DISPLAY_CHARS],
            workspace=workspace,
            created_at=now,
            revoked_at=None,
            scopes=chosen,
            expires_at=expires_at,
        )
        return key, info

    def list_keys(self, workspace: str | None = None) -> list[KeyInfo]:
        """Every key (of `workspace`, if given), oldest first, without any secret."""
        query = _key_info_query()
        if workspace is not None:
            query = query.where(workspaces.c.name == workspace)
        with self.read() as conn:
            return [_key_info(row) for row in conn.execute(query)]

    def revoke_key(self, key_id: int | str, *, workspace: str | None = None) -> bool:
        """Revoke ONE key by numeric id or prefix; False if no active key matched.

        A prefix (what `mmagg keys list` shows, e.g. `mmk_AbCd`, or any start of it) that
        matches several active keys revokes nothing and raises `AmbiguousKeyError` listing
        them. With `workspace`, only that workspace's keys are candidates.

        Example:
            >>> db = Database("sqlite://")
            >>> key = db.create_key("acme")
            >>> db.revoke_key(key[:8]), db.revoke_key(key[:8])
            (True, False)
        """
        text = str(key_id).strip().rstrip("…")
        query = _key_info_query().where(api_keys.c.revoked_at.is_(None))
        if workspace is not None:
            query = query.where(workspaces.c.name == workspace)
        if isinstance(key_id, int) or text.isdigit():
            query = query.where(api_keys.c.id == int(text))
        elif len(text) > KEY_DISPLAY_CHARS:
            # Longer than any stored prefix: the whole key was given; match it exactly.
            query = query.where(api_keys.c.key_hash == hash_secret(text))
        elif text:
            query = query.where(api_keys.c.prefix.startswith(text, autoescape=True))
        else:
            return False
        with self.write() as conn:
            matches = [_key_info(row) for row in conn.execute(query)]
            if len(matches) > 1:
                raise AmbiguousKeyError(text, matches)
            if not matches:
                return False
            updated = conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == matches[0].id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            return updated.rowcount == 1

    def authenticate(self, api_key: str, conn: Connection | None = None) -> Principal | None:
        """The principal of an active key; None for an unknown, revoked or expired key."""
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
        now = self.clock()
        if row[5] is not None and row[5] <= now:
            return None
        key_id = int(row[3])
        self.touch_key(key_id, now)
        return Principal(
            workspace_id=int(row[1]),
            workspace=str(row[2]),
            key_id=key_id,
            scopes=stored_scopes(row[4]),
        )

    def touch_key(self, key_id: int, now: float | None = None) -> None:
        """Record that key `key_id` was used: at most one write per key and minute.

        The in-process memory skips the write entirely within the minute; the condition
        on the row keeps several backend processes from writing more often than that either.
        """
        now = self.clock() if now is None else now
        last = self._last_used_written.get(key_id)
        if last is not None and now - last < LAST_USED_RESOLUTION_SECONDS:
            return
        self._last_used_written[key_id] = now
        try:
            with self.write() as conn:
                conn.execute(
                    sa.update(api_keys)
                    .where(
                        api_keys.c.id == key_id,
                        sa.or_(
                            api_keys.c.last_used_at.is_(None),
                            api_keys.c.last_used_at <= now - LAST_USED_RESOLUTION_SECONDS,
                        ),
                    )
                    .values(last_used_at=now)
                )
        except sa.exc.SQLAlchemyError as error:
            # Bookkeeping must not fail the request it describes; the next use retries.
            self._last_used_written.pop(key_id, None)
            logger.warning(
                "mmagg: could not record the last use of key id %d: %s",
                key_id,
                type(error).__name__,
            )

    # sessions

    def create_session(self, principal: Principal, ttl: float = SESSION_TTL_SECONDS) -> str:
        """A new opaque session token for `principal`; only its hash is stored."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
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
        """The principal of a live session token: not expired, its key neither revoked nor
        expired."""
        now = self.clock()
        query = (
            sa.select(workspaces.c.id, workspaces.c.name, api_keys.c.id, api_keys.c.scopes)
            .join(dashboard_sessions, dashboard_sessions.c.workspace_id == workspaces.c.id)
            .join(api_keys, api_keys.c.id == dashboard_sessions.c.api_key_id)
            .where(
                dashboard_sessions.c.token_hash == hash_secret(token),
                dashboard_sessions.c.expires_at > now,
                api_keys.c.revoked_at.is_(None),
                sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > now),
            )
        )
        with self.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        self.touch_key(int(row[2]), now)
        return Principal(int(row[0]), str(row[1]), int(row[2]), stored_scopes(row[3]))

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
        self,
        principal: Principal,
        report: Report,
        idempotency_key: str | None,
        placement: Placement | None = None,
        *,
        _retried: bool = False,
    ) -> StoredReport:
        """Store a report and its results in one transaction, at most once per key.

        `placement` says where the report is filed on the time axis (`bounds.place`); by
        default it is placed now, without a retention bound.
        """
        if placement is None:
            placement = place(report.timestamp, time.time())
        ts = placement.ts
        ext = report.mmagg
        row = (
            principal.workspace_id,
            placement.received_at,
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
            placement.client_timestamp,
            placement.rule,
        )
        sql = self._sql
        if self.partitions is not None:
            self.partitions.ready(ts)
        try:
            with self.write() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(sql.insert_report, row)
                    fetched = cursor.fetchone() if sql.returning else (cursor.lastrowid,)
                    if fetched is None or fetched[0] is None:
                        raise RuntimeError("the database returned no id for the report")
                    report_id = int(fetched[0])
                    rows = _result_rows(report, report_id, principal.workspace_id, ts)
                    # In slices: a driver's executemany of 10,000 rows can hold the GIL (and
                    # so every other request) for its whole run.
                    for start in range(0, len(rows), INSERT_SLICE):
                        if start:
                            time.sleep(0)  # hand the GIL over between slices
                        cursor.executemany(sql.insert_results, rows[start : start + INSERT_SLICE])
                    rollup_rows.write(
                        cursor,
                        self.dialect,
                        rollup_rows.contributions(
                            principal.workspace_id, ts, _result_facts(report)
                        ),
                    )
                finally:
                    cursor.close()
        except self._integrity_error as error:
            if self.partitions is not None and partitions.missing_partition(error) and not _retried:
                # Another process's prune dropped the day this process still knew: make it
                # again and store the report (whose transaction rolled back) once more.
                self.partitions.forget(ts)
                return self.store_report(
                    principal, report, idempotency_key, placement, _retried=True
                )
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

    def prune(self, before: float, batch: int | None = None) -> int:
        """Delete reports (and their results) timestamped before `before`; return how many.

        On PostgreSQL (schema step 7) the days of `results` and `rollups` that end by the
        bound are dropped as whole partitions first (`mmagg.server.partitions`); the rest
        goes row by row, in batches of `batch` reports (`PRUNE_BATCH`, `PRUNE_BATCH_PG`), each
        its own short transaction, so that ingest (which shares the SQLite write lock) waits
        for one batch at most. Expired dashboard sessions go too.

        Example:
            >>> Database("sqlite://").prune(before=0.0)
            0
        """
        if batch is None:
            batch = PRUNE_BATCH_PG if self.dialect == "postgresql" else PRUNE_BATCH
        removed = 0
        if self.partitions is not None:
            # Whole days before the bound go as partitions; their reports rows below.
            self.partitions.drop_before(before)
        while True:
            with self.write() as conn:
                if self.dialect == "postgresql":
                    # One statement per batch, the ids never leave the server: binding
                    # thousands of ids from Python cost 20x the deletes themselves.
                    count = int(
                        conn.execute(_PRUNE_BATCH_PG, {"b": before, "n": batch}).scalar_one()
                    )
                else:
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
                    count = len(ids)
                    if ids:
                        conn.execute(sa.delete(results).where(results.c.report_id.in_(ids)))
                        conn.execute(sa.delete(reports).where(reports.c.id.in_(ids)))
            removed += count
            if count < batch:
                break
        # Rollups go by whole buckets: a bucket is kept while any of it is younger than the
        # bound (docs/scale.md, "Retention").
        with self.write() as conn:
            for level in rollup_rows.LEVELS:
                conn.execute(
                    sa.delete(rollups).where(
                        rollups.c.level == level,
                        rollups.c.bucket + level <= before,
                        # Implied by the line above; lets PostgreSQL skip the later days.
                        rollups.c.bucket < before,
                    )
                )
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


# A batch of `Database.prune` on PostgreSQL. results.ts is its report's ts, so the bound on
# it lets PostgreSQL skip every partition of `results` but the one holding the bound.
_PRUNE_BATCH_PG = sa.text(
    "WITH doomed AS (DELETE FROM reports WHERE id IN "
    "(SELECT id FROM reports WHERE ts < :b ORDER BY id LIMIT :n) RETURNING id), "
    "gone AS (DELETE FROM results WHERE ts < :b AND report_id IN (SELECT id FROM doomed)) "
    "SELECT COUNT(*) FROM doomed"
)


def _key_info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=int(row[0]),
        prefix=str(row[1]),
        workspace=str(row[2]),
        created_at=float(row[3]),
        revoked_at=row[4],
        scopes=stored_scopes(row[5]),
        expires_at=row[6],
        last_used_at=row[7],
    )


def _key_info_query() -> sa.Select[Any]:
    """The columns `_key_info` reads, one row per key, oldest first (never a secret)."""
    return (
        sa.select(
            api_keys.c.id,
            api_keys.c.prefix,
            workspaces.c.name,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
            api_keys.c.scopes,
            api_keys.c.expires_at,
            api_keys.c.last_used_at,
        )
        .join(workspaces, workspaces.c.id == api_keys.c.workspace_id)
        .order_by(api_keys.c.id)
    )


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise RuntimeError("the database returned no id for an inserted row")
    return int(key[0])


_NO_HISTOGRAM = (None,) * HISTOGRAM_BUCKETS


def _result_facts(report: Report) -> list[rollup_rows.ResultFacts]:
    """What the rollups need of each result of `report`."""
    device = report.device_id
    return [
        (
            item.model_id,
            item.class_name,
            device,
            item.source_id,
            item.confidence,
            item.stats.count if item.stats else None,
            item.stats.sum if item.stats else None,
            item.stats.histogram if item.stats else None,
        )
        for item in report.inference_results
    ]


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
