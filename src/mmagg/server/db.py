"""The backend's storage operations: workspaces, API keys, dashboard sessions, reports.

Tables, migrations and engine set-up live in `mmagg.server.tables`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server import medians, partitions
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
    report_keys,
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
# Keys whose principal ingest keeps in memory, and for how long (`cached_principal`).
PRINCIPAL_CACHE_SIZE = 10_000
PRINCIPAL_CACHE_SECONDS = 60.0

# The rollup job (`Database.fold_rollups`, run by `mmagg serve`): how often it runs, how far
# behind the clock it stays (a report in flight for that long is still not late), and the
# most seconds of results one fold transaction takes.
FOLD_INTERVAL_SECONDS = 5.0
FOLD_GRACE_SECONDS = 5.0
FOLD_CHUNK_SECONDS = 600.0

# Reports per prune transaction: SQLite's one write lock is shared with ingest, so short;
# PostgreSQL only locks the old rows themselves, and each commit costs a WAL flush.
PRUNE_BATCH = 1_000
PRUNE_BATCH_PG = 20_000

# PostgreSQL with `reports` partitioned (schema step 11), where no unique constraint can span
# the days: ingest takes a transaction lock per (workspace, Idempotency-Key), in the
# two-integer form of `pg_advisory_xact_lock` (a space apart from the one-bigint locks of
# migrations, the watermark and the digests), this class and a 32-bit hash of the key, and
# then looks the keys up in `report_keys` (a partition per month, so a few partitions:
# probing every day of `reports` cost 1.2 ms a batch at 12 days and 49 ms at 400,
# docs/scale.md). A hash collision only makes two keys wait for each other.
IDEMPOTENCY_LOCK_CLASS = 0x6D6D6B  # "mmk"
_LOCK_KEYS_SQL = (
    "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int[]) WITH ORDINALITY AS t(k, n) "
    "ORDER BY n"
)
# Both columns by `= ANY`, each partition's index probed once per key: a generic plan of a
# join with `unnest` of the pairs scanned the partitions instead (5.5 ms against 0.3 ms at
# 12 partitions). The pairs it returns are matched in Python.
_FIND_KEYS_SQL = (
    "SELECT workspace_id, idempotency_key FROM report_keys "
    "WHERE workspace_id = ANY(%s::int[]) AND idempotency_key = ANY(%s::text[])"
)


def idempotency_lock_id(workspace_id: int, key: str) -> int:
    """The signed 32-bit lock id of an Idempotency-Key in a workspace (see
    `IDEMPOTENCY_LOCK_CLASS`); the same in every process.

    Example:
        >>> same = idempotency_lock_id(1, "k") == idempotency_lock_id(1, "k")
        >>> same, idempotency_lock_id(1, "k") == idempotency_lock_id(2, "k")
        (True, False)
    """
    digest = hashlib.blake2b(f"{workspace_id}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


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


def _pg_json_insert(table: sa.Table, columns: tuple[str, ...]) -> str:
    """A multi-row INSERT taking every row in one JSON parameter (PostgreSQL).

    The text is short and the same whatever the row count, so the driver parses it once and
    the server plans it once; the rows travel as one `json.dumps` string (C code on our side)
    instead of hundreds of parameters the driver would adapt one by one in Python.
    """
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"SELECT {json_row_columns(table, columns)} FROM json_array_elements(%s::json) AS e"
    )


def json_row_columns(table: sa.Table, columns: tuple[str, ...]) -> str:
    """`(e->>0)::type, (e->>1)::type, ...`: the columns of JSON array `e`, as `table` types.

    Strings are cast to `text`, not to the column's `varchar(n)` (an explicit cast would
    cut a long value short; the insert's own assignment checks the length instead).
    Numbers go through their text form, which reads back the same double exactly.
    """
    casts = []
    for i, name in enumerate(columns):
        kind = table.c[name].type
        if isinstance(kind, sa.Float):
            sql_type = "double precision"
        elif isinstance(kind, sa.BigInteger):
            sql_type = "bigint"
        elif isinstance(kind, sa.Integer):
            sql_type = "integer"
        else:
            sql_type = "text"
        casts.append(f"(e->>{i})::{sql_type}")
    return ", ".join(casts)


# PostgreSQL's fixed type OIDs (pg_type) of the columns ingest copies.
_PG_OIDS = {"int4": 23, "int8": 20, "float8": 701, "text": 25}


def copy_types(table: sa.Table, columns: tuple[str, ...]) -> list[int]:
    """The PostgreSQL type OIDs of `columns` for a binary COPY (`Copy.set_types`).

    Binary COPY sends numbers as their 4 or 8 bytes: no float is formatted as text, which
    is most of what a JSON or text parameter costs for rows of doubles. OIDs, not names:
    psycopg would look each name up again on every COPY.
    """
    kinds = []
    for name in columns:
        kind = table.c[name].type
        if isinstance(kind, sa.Float):
            kinds.append(_PG_OIDS["float8"])
        elif isinstance(kind, sa.BigInteger):
            kinds.append(_PG_OIDS["int8"])
        elif isinstance(kind, sa.Integer):
            kinds.append(_PG_OIDS["int4"])
        else:
            kinds.append(_PG_OIDS["text"])
    return kinds


def copy_rows(cursor: Any, sql: str, kinds: list[int], rows: Iterable[Sequence[Any]]) -> None:
    """COPY `rows` in binary on a psycopg cursor (`sql`: `COPY ... FROM STDIN (FORMAT BINARY)`)."""
    with cursor.copy(sql) as copy:
        copy.set_types(kinds)
        for row in rows:
            copy.write_row(row)


def json_rows(rows: Iterable[Sequence[Any]]) -> str:
    """`rows` as the JSON parameter of `_pg_json_insert` (floats keep every bit)."""
    return json.dumps(rows if isinstance(rows, list) else list(rows), ensure_ascii=False)


_RESULT_COPY_TYPES = copy_types(results, _RESULT_COLUMNS)
_INSERT_KEYS_SQL = _pg_json_insert(report_keys, tuple(c.name for c in report_keys.columns))


# The key columns a batch re-checks at commit (`Database.store_reports`).
_KEY_CHECK_SQL = (
    "SELECT key_hash, expires_at FROM api_keys WHERE revoked_at IS NULL AND key_hash IN ({})"
)
_BUCKETS_SQL = "SELECT client, tokens, updated FROM failure_buckets WHERE client IN ({})"
_WATERMARK_SQL = "SELECT complete_before FROM rollup_watermark WHERE id = 1"
_TOUCH_SQL = (
    "UPDATE api_keys SET last_used_at = {p} WHERE id = {p} "
    "AND (last_used_at IS NULL OR last_used_at <= {p})"
)


@dataclass(frozen=True)
class _WriteSql:
    """The ingest statements in the driver's own paramstyle.

    Ingest runs them on the DBAPI cursor directly: SQLAlchemy's per-execution bookkeeping
    costs more than SQLite's insert itself, and this is the one path hit hundreds of
    times a second. On PostgreSQL a batch of reports takes a few statements whatever its
    size: report ids from the sequence, one INSERT of JSON rows for the reports, a binary
    COPY of the results.
    """

    placeholder: str
    insert_report: str
    insert_results: str
    returning: bool
    report_ids: str | None
    insert_reports_many: str | None
    insert_results_many: str | None
    touch: str
    watermark: str

    @classmethod
    def for_dialect(cls, dialect: str) -> _WriteSql:
        placeholder = "?" if dialect == "sqlite" else "%s"
        postgres = dialect == "postgresql"
        returning = dialect != "sqlite"
        report_sql = _insert_sql(reports, _REPORT_COLUMNS, placeholder)
        return cls(
            placeholder=placeholder,
            insert_report=report_sql + (" RETURNING id" if returning else ""),
            insert_results=_insert_sql(results, _RESULT_COLUMNS, placeholder),
            returning=returning,
            report_ids=(
                "SELECT nextval(pg_get_serial_sequence('reports', 'id')) "
                "FROM generate_series(1, %s)"
                if postgres
                else None
            ),
            insert_reports_many=(
                _pg_json_insert(reports, ("id", *_REPORT_COLUMNS)) if postgres else None
            ),
            insert_results_many=(
                f"COPY results ({', '.join(_RESULT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
                if postgres
                else None
            ),
            touch=_TOUCH_SQL.format(p=placeholder),
            watermark=(
                f"SELECT pg_advisory_xact_lock_shared({rollup_rows.WATERMARK_LOCK}); "
                + _WATERMARK_SQL
                if postgres
                else _WATERMARK_SQL
            ),
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


@dataclass(frozen=True)
class LimitCheck:
    """A failed-key-check bucket for the transaction storing a report to check
    (`mmagg.server.ratelimit.DatabaseFailureLimiter.deferred`).

    `bucket` is the row of `failure_buckets`; `wait` turns its stored (tokens, updated), or
    None when there is no row, into the seconds the client must wait (0: go ahead).
    """

    bucket: str
    wait: Callable[[tuple[float, float] | None], int]


class RateLimitedError(Exception):
    """The client's failed-key-check bucket was empty when its report was to be stored;
    nothing was stored. `retry_after`: whole seconds until it may try again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class PendingReport:
    """A validated report waiting to be stored (`Database.store_reports`).

    With `key_digest` (the hash of the API key it came with), the key is checked again in
    the transaction that stores it: a key revoked or expired since the request was let in
    stores nothing (`KeyRevokedError`). With `limit`, the client's failed-key-check bucket
    is read in that transaction too, and an empty one stores nothing (`RateLimitedError`).
    """

    principal: Principal
    report: Report
    idempotency_key: str | None
    placement: Placement
    key_digest: str | None = None
    limit: LimitCheck | None = None


class KeyRevokedError(Exception):
    """The API key of a report was revoked or expired before the report could be stored."""


class DuplicateKeyError(Exception):
    """A report's Idempotency-Key is stored already (or twice in one batch): PostgreSQL with
    `reports` partitioned, where no unique constraint says so (`Database._claim_keys`)."""


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
        # key hash -> (principal, expires_at, when checked): ingest's key check without a
        # query (`cached_principal`); every report is checked again as it is stored.
        self._principals: dict[str, tuple[Principal, float | None, float]] = {}
        #: Results this process folded into the rollups (`fold_rollups`), for the metrics.
        self.folded = 0
        self.engine = create_db_engine(database_url)
        self.dialect = self.engine.dialect.name
        # SQLite allows one writer; serialising in-process writers here avoids SQLITE_BUSY
        # back-off sleeps, which would dominate the ingest tail latency.
        self._write_lock: threading.Lock | None = (
            threading.Lock() if self.dialect == "sqlite" else None
        )
        self._sql = _WriteSql.for_dialect(self.dialect)
        self._snapshot_reads = self.dialect == "sqlite" and not _in_memory(self.engine)
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
        # Schema step 11: `reports` partitioned, Idempotency-Keys in `report_keys`, kept once
        # by a lock.
        self._keys_by_lock = self.partitions is not None and self.partitions.keys

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, serialised in-process on SQLite.

        On SQLite it starts with `BEGIN IMMEDIATE`: a transaction that reads before it
        writes would otherwise fail at once with "database is locked" when another process
        (`serve --workers`, `mmagg keys`) committed in between, instead of waiting its turn.
        """
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads, every statement of it seeing one snapshot.

        A read served from rollups reads the watermark, then rollup rows below it and raw
        rows above it (`mmagg.server.rollups`); a fold committing in between would count
        its results twice (or not at all) if each statement saw the database anew. So
        PostgreSQL reads in a REPEATABLE READ transaction, and SQLite (a file) in a
        transaction begun before the first statement (WAL readers see the database as of
        their first read until they end). An in-memory SQLite database has one connection
        shared by every user: there a read gets it as it is.
        """
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            elif self._snapshot_reads:
                dbapi = conn.connection.dbapi_connection
                if dbapi is not None and not dbapi.in_transaction:  # type: ignore[attr-defined]
                    dbapi.execute("BEGIN")  # type: ignore[attr-defined]
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
            self._forget_principal(matches[0].id)
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
        principal = Principal(
            workspace_id=int(row[1]),
            workspace=str(row[2]),
            key_id=key_id,
            scopes=stored_scopes(row[4]),
        )
        if len(self._principals) >= PRINCIPAL_CACHE_SIZE:
            self._principals.clear()
        self._principals[digest] = (principal, row[5], now)
        return principal

    def cached_principal(self, api_key: str) -> Principal | None:
        """The principal `authenticate` found for `api_key` lately, without a query; None if
        there is none (then call `authenticate`).

        Only for a report about to be stored with `PendingReport.key_digest` set: the
        transaction storing it checks the key again, so a key revoked since (by any
        process) still stores nothing. An expired key is never answered from here.
        """
        entry = self._principals.get(hash_secret(api_key))
        if entry is None:
            return None
        principal, expires_at, checked = entry
        now = self.clock()
        if now - checked > PRINCIPAL_CACHE_SECONDS:
            return None
        if expires_at is not None and expires_at <= now:
            return None
        return principal

    def _forget_principal(self, key_id: int) -> None:
        for digest, entry in list(self._principals.items()):
            if entry[0].key_id == key_id:
                self._principals.pop(digest, None)

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
    ) -> StoredReport:
        """Store a report and its results in one transaction, at most once per key.

        `placement` says where the report is filed on the time axis (`bounds.place`); by
        default it is placed now, without a retention bound.
        """
        if placement is None:
            placement = place(report.timestamp, time.time())
        return self._store_alone(PendingReport(principal, report, idempotency_key, placement))

    def store_reports(self, items: Sequence[PendingReport]) -> list[StoredReport | Exception]:
        """Store several reports in one transaction (group commit); one outcome each.

        Each outcome is the `StoredReport` or the exception storing that report raised
        (`KeyRevokedError` for a key revoked since its request was let in). When the shared
        transaction fails (an Idempotency-Key stored before or twice in the batch, or any
        database error), it is rolled back and every report is stored in a transaction of
        its own: one bad report fails only itself, and none is stored twice.
        """
        if len(items) > 1:
            try:
                return list(self._write_batch(items))
            except Exception as error:  # each report on its own, below
                logger.debug("mmagg: batch of %d reports failed (%s)", len(items), error)
        outcomes: list[StoredReport | Exception] = []
        for item in items:
            try:
                outcomes.append(self._store_alone(item))
            except Exception as error:  # handed to the request that sent it
                outcomes.append(error)
        return outcomes

    def _store_alone(self, item: PendingReport, *, retried: bool = False) -> StoredReport:
        """One report in its own transaction; a replayed Idempotency-Key answers the first."""
        try:
            outcome = self._write_batch([item])[0]
        except (self._integrity_error, DuplicateKeyError) as error:
            if self.partitions is not None and partitions.missing_partition(error) and not retried:
                # Another process's prune dropped the day this process still knew: make it
                # again and store the report (whose transaction rolled back) once more.
                self.partitions.forget(item.placement.ts)
                return self._store_alone(item, retried=True)
            if item.idempotency_key is None:
                raise
            existing = self._find_idempotent(item.principal.workspace_id, item.idempotency_key)
            if existing is None:
                raise
            return existing
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _write_batch(self, items: Sequence[PendingReport]) -> list[StoredReport | Exception]:
        """Write `items` in one transaction; raises (rolled back) if any insert fails."""
        outcomes: list[StoredReport | Exception] = []
        touched: dict[int, float] = {}
        now = self.clock()
        if self.partitions is not None:
            for ts in {item.placement.ts for item in items}:
                self.partitions.ready(ts)
            if self._keys_by_lock:
                for received in {i.placement.received_at for i in items if i.idempotency_key}:
                    self.partitions.ready_keys(received)
        with self.write() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                watermark = self._watermark(cursor)
                live = self._live_keys(cursor, items)
                waits = self._limit_waits(cursor, items)
                refused: list[Exception | None] = [
                    KeyRevokedError()
                    if item.key_digest is not None and item.key_digest not in live
                    else RateLimitedError(waits[n])
                    if waits.get(n)
                    else None
                    for n, item in enumerate(items)
                ]
                kept = [item for item, no in zip(items, refused, strict=True) if no is None]
                if self._keys_by_lock:
                    self._claim_keys(cursor, kept)
                ids = self._insert_reports(cursor, kept)
                if self._keys_by_lock:
                    self._insert_keys(cursor, kept, ids)
                rows: list[tuple[Any, ...]] = []
                pending: dict[tuple[Any, ...], list[Any]] = {}
                found = iter(ids)
                for item, no in zip(items, refused, strict=True):
                    if no is not None:
                        outcomes.append(no)
                        continue
                    report_id = next(found)
                    report, ts = item.report, item.placement.ts
                    workspace_id = item.principal.workspace_id
                    rows.extend(_result_rows(report, report_id, workspace_id, ts))
                    if ts < watermark:
                        # A late report: its range is folded already (mmagg.server.rollups).
                        rollup_rows.contributions_into(
                            pending, workspace_id, ts, _result_facts(report)
                        )
                    outcomes.append(StoredReport(report_id, len(report.inference_results), False))
                    if item.key_digest is not None:
                        touched.setdefault(item.principal.key_id, now)
                self._insert_results(cursor, rows)
                if pending:
                    rollup_rows.write(cursor, self.dialect, pending)
                self._touch_keys(cursor, touched)
            finally:
                cursor.close()
        return outcomes

    def _watermark(self, cursor: Any) -> float:
        """The rollup watermark, read first thing in an ingest transaction.

        On PostgreSQL the shared watermark lock comes first (its own statement, so that the
        read after it sees a fold that committed while we waited), and is held to the
        commit: the fold, which takes it exclusively, waits for this report.
        """
        cursor.execute(self._sql.watermark)
        if self.dialect == "postgresql":
            cursor.nextset()
        row = cursor.fetchone()
        return math.inf if row is None else float(row[0])

    def fold_rollups(
        self,
        now: float | None = None,
        *,
        grace: float = FOLD_GRACE_SECONDS,
        chunk: float = FOLD_CHUNK_SECONDS,
        until: float | None = None,
    ) -> int:
        """Fold the results below the last whole minute before `now - grace` into the rollups
        and move the watermark there; return how many results were folded.

        Runs in transactions of at most `chunk` seconds of results each (a long outage of
        the job is caught up piece by piece, holding the write lock briefly each time).
        `until` (a time) folds up to there instead, for tests. The rollup job of `mmagg
        serve` calls this every `FOLD_INTERVAL_SECONDS` in one process at a time.
        """
        if until is None:
            moment = (self.clock() if now is None else now) - grace
            until = math.floor(moment / 60) * 60.0
        folded = 0
        while True:
            with self.write() as conn:
                if self.dialect == "postgresql":
                    conn.exec_driver_sql(
                        f"SELECT pg_advisory_xact_lock({rollup_rows.WATERMARK_LOCK})"
                    )
                start = rollup_rows.complete_before(conn)
                if not start < until:
                    break
                # A whole minute at most `chunk` ahead (at least the next one: the first
                # fold after an upgrade starts off the minute), never past `until`.
                end = math.floor((start + chunk) / 60) * 60.0
                if end <= start:
                    end = (math.floor(start / 60) + 1) * 60.0
                end = min(end, until)
                count = rollup_rows.fold_range(conn, start, end)
                rollup_rows.set_watermark(conn, end)
            folded += count
            self.folded += count
        return folded

    def rollup_lag(self, now: float | None = None) -> float:
        """Seconds between `now` and the rollup watermark (0 when it is ahead)."""
        with self.read() as conn:
            watermark = rollup_rows.complete_before(conn)
        return max(0.0, (self.clock() if now is None else now) - watermark)

    def _live_keys(self, cursor: Any, items: Sequence[PendingReport]) -> frozenset[str]:
        """The key hashes of `items` still active now (neither revoked nor expired)."""
        digests = sorted({item.key_digest for item in items if item.key_digest is not None})
        if not digests:
            return frozenset()
        marks = ", ".join([self._sql.placeholder] * len(digests))
        cursor.execute(_KEY_CHECK_SQL.format(marks), digests)
        now = self.clock()
        live = frozenset(str(row[0]) for row in cursor.fetchall() if row[1] is None or row[1] > now)
        for digest in digests:
            if digest not in live:
                self._principals.pop(digest, None)
        return live

    def _limit_waits(self, cursor: Any, items: Sequence[PendingReport]) -> dict[int, int]:
        """Seconds to wait, by position in `items`, of the reports whose client's bucket is
        empty (`PendingReport.limit`); one query for the batch, none without limits."""
        buckets = sorted({item.limit.bucket for item in items if item.limit is not None})
        if not buckets:
            return {}
        marks = ", ".join([self._sql.placeholder] * len(buckets))
        cursor.execute(_BUCKETS_SQL.format(marks), buckets)
        stored = {str(row[0]): (float(row[1]), float(row[2])) for row in cursor.fetchall()}
        waits = {}
        for n, item in enumerate(items):
            if item.limit is not None:
                wait = item.limit.wait(stored.get(item.limit.bucket))
                if wait:
                    waits[n] = wait
        return waits

    def _claim_keys(self, cursor: Any, items: Sequence[PendingReport]) -> None:
        """PostgreSQL, `reports` partitioned: make the Idempotency-Keys of `items` this
        transaction's, or raise `DuplicateKeyError` (rolling the batch back) if one is
        stored already or comes twice.

        The key locks are taken in one order (sorted), so two batches never wait for each
        other in a cycle, and held to the commit; the lookup is its own statement after them,
        so under READ COMMITTED it sees a report with the key that committed while we waited.
        Two processes storing one key therefore store it once, whichever day each files it on.
        """
        pairs = [
            (item.principal.workspace_id, item.idempotency_key)
            for item in items
            if item.idempotency_key is not None
        ]
        if not pairs:
            return
        if len(set(pairs)) < len(pairs):
            raise DuplicateKeyError()
        locks = sorted({idempotency_lock_id(workspace, key) for workspace, key in pairs})
        cursor.execute(_LOCK_KEYS_SQL, (IDEMPOTENCY_LOCK_CLASS, locks))
        cursor.fetchall()
        cursor.execute(_FIND_KEYS_SQL, (sorted({w for w, _ in pairs}), [k for _, k in pairs]))
        wanted = set(pairs)
        if any((int(row[0]), str(row[1])) in wanted for row in cursor.fetchall()):
            raise DuplicateKeyError()

    @staticmethod
    def _insert_keys(cursor: Any, items: Sequence[PendingReport], ids: Sequence[int]) -> None:
        """PostgreSQL, schema step 11: the `report_keys` rows of the keyed `items`."""
        rows = [
            (
                item.principal.workspace_id,
                item.idempotency_key,
                item.placement.received_at,
                report_id,
                len(item.report.inference_results),
            )
            for item, report_id in zip(items, ids, strict=True)
            if item.idempotency_key is not None
        ]
        if rows:
            cursor.execute(_INSERT_KEYS_SQL, (json_rows(rows),))

    def _insert_reports(self, cursor: Any, items: Sequence[PendingReport]) -> list[int]:
        """Insert the report rows of `items`; their ids, in order."""
        sql = self._sql
        rows = [_report_row(item) for item in items]
        if not rows:
            return []
        if sql.insert_reports_many is not None and sql.report_ids is not None:
            cursor.execute(sql.report_ids, (len(rows),))
            ids = [int(row[0]) for row in cursor.fetchall()]
            cursor.execute(
                sql.insert_reports_many,
                (json_rows([(i, *row) for i, row in zip(ids, rows, strict=True)]),),
            )
            return ids
        ids = []
        for row in rows:
            cursor.execute(sql.insert_report, row)
            fetched = cursor.fetchone() if sql.returning else (cursor.lastrowid,)
            if fetched is None or fetched[0] is None:
                raise RuntimeError("the database returned no id for the report")
            ids.append(int(fetched[0]))
        return ids

    def _insert_results(self, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        # In slices: a driver's executemany of 10,000 rows can hold the GIL (and so every
        # other request) for its whole run.
        many = self._sql.insert_results_many
        for start in range(0, len(rows), INSERT_SLICE):
            if start:
                time.sleep(0)  # hand the GIL over between slices
            chunk = rows[start : start + INSERT_SLICE]
            if many is not None:
                copy_rows(cursor, many, _RESULT_COPY_TYPES, chunk)
            else:
                cursor.executemany(self._sql.insert_results, chunk)

    def _touch_keys(self, cursor: Any, used: dict[int, float]) -> None:
        """`touch_key` for the keys of a batch, inside its transaction."""
        for key_id, now in used.items():
            last = self._last_used_written.get(key_id)
            if last is not None and now - last < LAST_USED_RESOLUTION_SECONDS:
                continue
            cursor.execute(self._sql.touch, (now, key_id, now - LAST_USED_RESOLUTION_SECONDS))
            self._last_used_written[key_id] = now

    def _find_idempotent(self, workspace_id: int, key: str) -> StoredReport | None:
        query = (
            sa.select(report_keys.c.report_id, report_keys.c.result_count).where(
                report_keys.c.workspace_id == workspace_id,
                report_keys.c.idempotency_key == key,
            )
            if self._keys_by_lock
            else sa.select(reports.c.id, reports.c.result_count).where(
                reports.c.workspace_id == workspace_id, reports.c.idempotency_key == key
            )
        )
        with self.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else StoredReport(int(row[0]), int(row[1]), duplicate=True)

    def prune(
        self,
        before: float,
        batch: int | None = None,
        *,
        rollups_before: Mapping[int, float] | None = None,
    ) -> int:
        """Delete reports (and their results) timestamped before `before`; return how many.

        Rollup buckets go once they end by `before`, or by `rollups_before[level]` for a
        level given there (`mmagg.server.retention`: kept longer than the raw rows, never
        shorter, a coarser level never shorter than a finer one: ValueError otherwise); the
        median digests of 3600 and 86400 s go with the bound of their level.

        On PostgreSQL (schema steps 7 and 11) the days of `results`, `rollups` and `reports`
        that end by the bound are dropped as whole partitions first, and the months of
        `report_keys` whose reports are all gone (`mmagg.server.partitions`); the rest (the
        day holding the bound) goes row by row, in batches of `batch` reports (`PRUNE_BATCH`,
        `PRUNE_BATCH_PG`), each its own short transaction, so that ingest (which shares the
        SQLite write lock) waits for one batch at most. Expired dashboard sessions go too.

        Example:
            >>> Database("sqlite://").prune(before=0.0)
            0
        """
        if batch is None:
            batch = PRUNE_BATCH_PG if self.dialect == "postgresql" else PRUNE_BATCH
        levels = _level_bounds(before, rollups_before)
        digests = {level: levels[level] for level in medians.LEVELS}
        removed = 0
        # Median digests go first and again in every batch, in the batch's transaction (and
        # under the digest job's lock on PostgreSQL), so that no digest of a bucket that
        # starts before the bound outlives a row it describes (mmagg.server.medians).
        with self.write() as conn:
            medians.lock(conn)
            medians.delete_before(conn, before, digests)
        if self.partitions is not None:
            # Whole days before the bound go as partitions (`reports` too since step 11);
            # the day holding the bound goes row by row below.
            removed += self.partitions.drop_before(before, min(levels.values()))[1]
        while True:
            with self.write() as conn:
                medians.lock(conn)
                medians.delete_before(conn, before, digests)
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
                if levels[level] == -math.inf:
                    continue
                conn.execute(
                    sa.delete(rollups).where(
                        rollups.c.level == level,
                        rollups.c.bucket + level <= levels[level],
                        # Implied by the line above; lets PostgreSQL skip the later days.
                        rollups.c.bucket < levels[level],
                    )
                )
        with self.write() as conn:
            conn.execute(
                sa.delete(dashboard_sessions).where(dashboard_sessions.c.expires_at < time.time())
            )
        return removed

    def build_median_digests(
        self,
        now: float | None = None,
        keep_after: float | None = None,
        pass_results: int = medians.PASS_RESULTS,
    ) -> medians.BuildResult:
        """One pass of the median digest job (`mmagg.server.medians.build`): the hour and day
        digests that are missing or stale for hours that ended before `now` (less a grace
        period), none for buckets starting before `keep_after` (the retention bound). Reads
        about `pass_results` results at most; the result says what was built and whether
        work is left. `mmagg serve` runs it every minute; tests and benchmarks call it."""
        return medians.build(self, self.clock() if now is None else now, keep_after, pass_results)

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


def _level_bounds(before: float, given: Mapping[int, float] | None) -> dict[int, float]:
    """Each rollup level's retention bound: `given`, else `before`; checked to be no later
    than `before` nor than the bound of a finer level."""
    bounds: dict[int, float] = {}
    finer, finer_name = before, "the raw bound"
    for level in sorted(rollup_rows.LEVELS):
        bound = before if given is None else given.get(level, finer)
        if not bound <= finer:
            raise ValueError(
                f"rollups_before[{level}]: expected at most {finer_name} ({finer}), got {bound}"
            )
        bounds[level] = bound
        finer, finer_name = bound, f"the bound of level {level}"
    return bounds


def _in_memory(engine: sa.Engine) -> bool:
    """An in-memory SQLite database (one connection shared by every user)."""
    return engine.url.database in (None, "", ":memory:")


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


def _report_row(item: PendingReport) -> tuple[Any, ...]:
    """The `reports` row of `item`, in `_REPORT_COLUMNS` order."""
    report, placement = item.report, item.placement
    ext = report.mmagg
    return (
        item.principal.workspace_id,
        placement.received_at,
        placement.ts,
        report.device_id,
        report.source,
        report.source_info,
        report.inference_server_version,
        json.dumps(report.system_info()),
        item.idempotency_key,
        ext.frequency if ext is not None else None,
        ext.model_dump_json() if ext is not None else None,
        len(report.inference_results),
        placement.client_timestamp,
        placement.rule,
    )
