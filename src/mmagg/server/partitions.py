"""PostgreSQL: `results`, `rollups` and `reports` partitioned by day, so that retention drops
whole days.

On PostgreSQL (schema step 7) `results` (`PARTITION BY RANGE (ts)`) and `rollups`
(`PARTITION BY RANGE (bucket)`) are declaratively partitioned tables, one partition per UTC
day, named `results_pYYYYMMDD` and `rollups_pYYYYMMDD` (docs/scale.md, "Partitions"); since
step 11 `reports` too (`PARTITION BY RANGE (ts)`, `reports_pYYYYMMDD`). SQLite keeps plain
tables; nothing here runs there.

- **Layout.** `results` holds five or more rows per report and most of the bytes; `rollups`
  holds a row per key, level and bucket, and its unique key already contains `bucket`. Every
  level divides a day and buckets are aligned, so a rollup row lies in its day's partition
  and ends by that day's end: a day that ends by the retention bound holds only rows that
  retention deletes. `reports` (step 11) loses its unique (workspace, Idempotency-Key)
  constraint, since a unique key on a partitioned table has to contain the partition key
  and a retried report is not always filed at the same `ts` (a naive or a future timestamp
  is filed at the receive time). The keys live in `report_keys` instead, partitioned by
  month of the first receipt (`report_keys_pYYYYMM`); ingest keeps a key exactly once by a
  transaction lock on the key and a lookup in those few partitions (`mmagg.server.db`,
  `IDEMPOTENCY_LOCK_CLASS`), and retention drops a month of keys once every report it can
  name is gone. `results` keeps no foreign key to
  `reports` on PostgreSQL (the writer inserts both in one transaction): every deleted report
  would otherwise cost a lookup in every partition.
- **Ahead of time and on demand.** `PartitionSet.prepare` creates the partitions of today and
  the next `AHEAD_DAYS` days (at start-up and hourly); `PartitionSet.ready` creates the day of
  a late report when it arrives. There is no DEFAULT partition: a missing partition is created
  before the insert, never lost. A partition is made as a plain table and then attached
  (`ATTACH PARTITION` locks the parent in SHARE UPDATE EXCLUSIVE mode, which neither ingest
  nor reads wait for); two processes creating the same day at once both succeed.
- **Retention.** `drop_before` detaches (`DETACH PARTITION … CONCURRENTLY`, no lock that
  blocks ingest) and drops every partition that ends by the bound; the day holding the bound
  is pruned row by row, as on SQLite.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger("mmagg.server")

#: One partition per UTC day. Retention is set in days, so a day is the finest cut it ever
#: needs, and the projected fleet (docs/scale.md) writes ~860 M results a day: months would
#: keep up to a month of it (terabytes) past the bound, hours would give the planner 24x
#: more partitions to consider for no finer retention.
PARTITION_SECONDS = 86_400

#: Partitions created ahead of time: today and this many days after it.
AHEAD_DAYS = 2

#: The partitioned tables and their partition keys (`reports` since schema step 11).
TABLES = {"results": "ts", "rollups": "bucket", "reports": "ts"}
_NAME_RE = re.compile(r"^(results|rollups|reports)_p(\d{8})$")
_BOUND_RE = re.compile(r"FROM \('?([-0-9.e+]+)'?\) TO \('?([-0-9.e+]+)'?\)")


#: PostgreSQL, schema step 11: the Idempotency-Keys, partitioned by month of `received_at`.
KEYS_TABLE = "report_keys"
_KEYS_NAME_RE = re.compile(r"^report_keys_p(\d{6})$")

#: A report may be filed up to this far after its receive time (`bounds.place` keeps an
#: aware timestamp up to 60 s ahead), so a month of keys goes only once the bound is past
#: its end by this much: every report it names is then pruned.
KEY_MONTH_MARGIN_SECONDS = 60.0


def month_of(ts: float) -> int:
    """The key partition (months since 1970-01 UTC) that holds time `ts`.

    Example:
        >>> month_of(0.0), month_of(31 * 86_400.0 - 0.5), month_of(31 * 86_400.0)
        (0, 0, 1)
    """
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return (moment.year - 1970) * 12 + moment.month - 1


def month_bounds(month: int) -> tuple[float, float]:
    """[start, end) of a month number, in seconds since the epoch.

    Example:
        >>> month_bounds(0)
        (0.0, 2678400.0)
    """
    year, index = divmod(month, 12)
    start = datetime(1970 + year, index + 1, 1, tzinfo=timezone.utc)
    year, index = divmod(month + 1, 12)
    end = datetime(1970 + year, index + 1, 1, tzinfo=timezone.utc)
    return start.timestamp(), end.timestamp()


def key_partition_name(month: int) -> str:
    """`report_keys_pYYYYMM` for a month number.

    Example:
        >>> key_partition_name(0), key_partition_name(12 * 56 + 10)
        ('report_keys_p197001', 'report_keys_p202611')
    """
    year, index = divmod(month, 12)
    return f"{KEYS_TABLE}_p{1970 + year:04d}{index + 1:02d}"


def day_of(ts: float) -> int:
    """The partition (days since 1970-01-01 UTC) that holds time `ts`.

    Example:
        >>> day_of(86_399.5), day_of(86_400.0)
        (0, 1)
    """
    return int(ts // PARTITION_SECONDS)


def partition_name(day: int, table: str = "results") -> str:
    """`results_pYYYYMMDD` (or `rollups_p…`, `reports_p…`) for a day number.

    Example:
        >>> partition_name(0), partition_name(1, "rollups")
        ('results_p19700101', 'rollups_p19700102')
    """
    moment = datetime.fromtimestamp(day * PARTITION_SECONDS, timezone.utc)
    return f"{table}_p{moment.strftime('%Y%m%d')}"


def _day_of_name(name: str) -> int | None:
    match = _NAME_RE.match(name)
    if match is None:
        return None
    moment = datetime.strptime(match.group(2), "%Y%m%d").replace(tzinfo=timezone.utc)
    return day_of(moment.timestamp())


def _relkind(conn: Connection, table: str) -> str | None:
    kind = conn.exec_driver_sql(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %(t)s AND n.nspname = current_schema()",
        {"t": table},
    ).scalar()
    return None if kind is None else str(kind)


def is_partitioned(conn: Connection, table: str = "results") -> bool:
    """Whether `table` is a partitioned table (always False on SQLite)."""
    if conn.dialect.name != "postgresql":
        return False
    return _relkind(conn, table) == "p"


def attached(conn: Connection, table: str = "results") -> dict[int, tuple[str, float, float, bool]]:
    """Day -> (name, lower bound, upper bound, detach pending) of every partition of `table`."""
    rows = conn.exec_driver_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %(t)s::regclass",
        {"t": table},
    ).all()
    found: dict[int, tuple[str, float, float, bool]] = {}
    for name, bound, pending in rows:
        match = _BOUND_RE.search(str(bound))
        if match is None:  # not a range partition of ours (e.g. a DEFAULT one): leave it
            continue
        low, high = float(match.group(1)), float(match.group(2))
        found[day_of(low)] = (str(name), low, high, bool(pending))
    return found


def partitioned_tables(conn: Connection) -> tuple[str, ...]:
    """The tables of `TABLES` that are partitioned in this database (none on SQLite; `reports`
    from schema step 11 on)."""
    return tuple(table for table in TABLES if is_partitioned(conn, table))


def create_partition(conn: Connection, day: int, tables: tuple[str, ...] | None = None) -> bool:
    """Create and attach the partitions of `day` (every partitioned table, or `tables`) in
    `conn`'s transaction, unless they exist. Returns True if any was created here.

    Each is made as a plain table and then attached, which locks the parent in SHARE UPDATE
    EXCLUSIVE mode only (`CREATE TABLE … PARTITION OF` would take ACCESS EXCLUSIVE, queueing
    every insert behind the longest running read).
    """
    created = False
    low, high = day * PARTITION_SECONDS, (day + 1) * PARTITION_SECONDS
    for table in partitioned_tables(conn) if tables is None else tables:
        if day in attached(conn, table):
            continue
        name = partition_name(day, table)
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} (LIKE {table})")
        conn.exec_driver_sql(
            f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})"
        )
        created = True
    return created


def attached_months(conn: Connection) -> dict[int, tuple[str, float, float, bool]]:
    """Month -> (name, lower bound, upper bound, detach pending) of every `report_keys`
    partition."""
    return {month_of(entry[1]): entry for entry in attached(conn, KEYS_TABLE).values()}


def create_key_partition(conn: Connection, month: int) -> bool:
    """Create and attach the `report_keys` partition of `month` unless it exists (as
    `create_partition` does for days); True if it was created here."""
    if month in attached_months(conn):
        return False
    name = key_partition_name(month)
    low, high = month_bounds(month)
    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} (LIKE {KEYS_TABLE})")
    conn.exec_driver_sql(
        f"ALTER TABLE {KEYS_TABLE} ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})"
    )
    return True


def _known_days(conn: Connection, tables: tuple[str, ...]) -> set[int]:
    """Days that have a partition in every one of `tables`."""
    days: set[int] | None = None
    for table in tables:
        here = set(attached(conn, table))
        days = here if days is None else days & here
    return days or set()


class PartitionSet:
    """The days this process knows to have partitions, and the DDL that adds or drops them.

    Thread-safe. The set is a cache: a day another process dropped since is found again by
    the insert that fails (`missing_partition`), which then calls `forget` and retries.
    """

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._known: set[int] = set()
        self._lock = threading.Lock()
        with engine.connect() as conn:
            #: The partitioned tables (`reports` only once schema step 11 ran).
            self.tables = partitioned_tables(conn)
            self._known.update(_known_days(conn, self.tables))
            #: Whether the Idempotency-Keys are in `report_keys` (schema step 11).
            self.keys = is_partitioned(conn, KEYS_TABLE)
            self._known_months: set[int] = set(attached_months(conn)) if self.keys else set()

    def ready(self, ts: float) -> None:
        """Make sure the partitions holding `ts` exist (one set lookup when they are known)."""
        day = day_of(ts)
        if day not in self._known:
            self.ensure(day)

    def ready_keys(self, received_at: float) -> None:
        """Make sure the `report_keys` partition holding `received_at` exists."""
        month = month_of(received_at)
        if month not in self._known_months:
            self.ensure_month(month)

    def forget(self, ts: float) -> None:
        """Drop the cached knowledge of the day holding `ts` (it went missing), and of every
        month of keys (checked again on the next insert)."""
        self._known.discard(day_of(ts))
        self._known_months.clear()

    def ensure_month(self, month: int) -> None:
        """Create the `report_keys` partition of `month` if missing; safe against other
        processes doing the same at the same moment."""
        with self._lock:
            if month in self._known_months:
                return
            try:
                with self.engine.begin() as conn:
                    create_key_partition(conn, month)
            except sa.exc.DBAPIError:
                with self.engine.connect() as conn:  # made meanwhile by another process
                    if month not in attached_months(conn):
                        raise
            self._known_months.add(month)

    def ensure(self, day: int) -> None:
        """Create the partitions of `day` if missing; safe against other processes doing the
        same at the same moment."""
        with self._lock:
            if day in self._known:
                return
            try:
                with self.engine.begin() as conn:
                    created = create_partition(conn, day, self.tables)
            except sa.exc.DBAPIError:
                # Another process created them between our check and our DDL (duplicate
                # table name, or "already a partition"): fine if they are there now.
                with self.engine.connect() as conn:
                    if day not in _known_days(conn, self.tables):
                        raise
                created = False
            if created:
                logger.info("mmagg: created the partitions of %s", partition_name(day)[-8:])
            self._known.add(day)

    def prepare(self, now: float | None = None) -> None:
        """Create the partitions of today and the next `AHEAD_DAYS` days (start-up, hourly)."""
        moment = self.clock() if now is None else now
        today = day_of(moment)
        for day in range(today, today + AHEAD_DAYS + 1):
            self.ensure(day)
        if self.keys:  # this month's keys and, from its last days on, the next month's
            for month in {month_of(moment), month_of(moment + AHEAD_DAYS * PARTITION_SECONDS)}:
                self.ensure_month(month)

    def drop_before(
        self, before: float, rollups_before: float | None = None
    ) -> tuple[list[str], int]:
        """Detach and drop every partition whose days all lie before `before` (for `rollups`,
        before `rollups_before` when given: rollups kept longer than raw rows); their names,
        and how many `reports` rows went with them (counted between the detach and the drop,
        when nothing writes to the table any more: a prune says how many reports it removed).

        Each partition goes in its own statements, outside any transaction
        (`DETACH … CONCURRENTLY` cannot run in one). A partition a crashed run left
        detach-pending is finished (`FINALIZE`); a table a crashed run left detached but not
        dropped is dropped.
        """
        dropped: list[str] = []
        reports_dropped = 0
        with self.engine.connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in self.tables:
                bound = before if table != "rollups" or rollups_before is None else rollups_before
                for day, (name, _low, high, pending) in sorted(attached(auto, table).items()):
                    if high > bound:
                        continue
                    self._known.discard(day)
                    try:
                        mode = "FINALIZE" if pending else "CONCURRENTLY"
                        auto.exec_driver_sql(f"ALTER TABLE {table} DETACH PARTITION {name} {mode}")
                    except sa.exc.DBAPIError as error:
                        # Another process's prune got there first: its DROP finishes the job.
                        logger.warning("mmagg: could not detach %s: %s", name, type(error).__name__)
                        continue
                    reports_dropped += _drop(auto, name)
                    dropped.append(name)
            if self.keys:
                for month, (name, _low, high, pending) in sorted(attached_months(auto).items()):
                    if high + KEY_MONTH_MARGIN_SECONDS > before:
                        continue
                    self._known_months.discard(month)
                    try:
                        mode = "FINALIZE" if pending else "CONCURRENTLY"
                        auto.exec_driver_sql(
                            f"ALTER TABLE {KEYS_TABLE} DETACH PARTITION {name} {mode}"
                        )
                    except sa.exc.DBAPIError as error:
                        logger.warning("mmagg: could not detach %s: %s", name, type(error).__name__)
                        continue
                    _drop(auto, name)
                    dropped.append(name)
            for name in _detached_leftovers(auto):
                end = _end_of_name(name)
                bound = before
                if name.startswith("rollups_p") and rollups_before is not None:
                    bound = rollups_before
                if end is not None and end <= bound:
                    reports_dropped += _drop(auto, name)
                    dropped.append(name)
        return dropped, reports_dropped


def _drop(conn: Connection, name: str) -> int:
    """Drop detached partition `name`; the rows it held if it was a day of `reports` (0 if
    another process's prune dropped it first)."""
    rows = 0
    if name.startswith("reports_p"):
        try:
            rows = int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM {name}").scalar_one())
        except sa.exc.ProgrammingError:  # dropped meanwhile by another prune
            return 0
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    return rows


def _end_of_name(name: str) -> float | None:
    """When the rows a partition named `name` may hold all lie before (a day's end; a key
    month's end plus `KEY_MONTH_MARGIN_SECONDS`); None for another name."""
    day = _day_of_name(name)
    if day is not None:
        return float((day + 1) * PARTITION_SECONDS)
    match = _KEYS_NAME_RE.match(name)
    if match is None:
        return None
    year, month = int(match.group(1)[:4]), int(match.group(1)[4:])
    return month_bounds((year - 1970) * 12 + month - 1)[1] + KEY_MONTH_MARGIN_SECONDS


def _detached_leftovers(conn: Connection) -> list[str]:
    """Tables named like a partition that are no partition (a prune stopped between its
    DETACH and its DROP)."""
    rows = conn.exec_driver_sql(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition "
        "AND (c.relname LIKE 'results\\_p%%' OR c.relname LIKE 'rollups\\_p%%' "
        "OR c.relname LIKE 'reports\\_p%%' OR c.relname LIKE 'report\\_keys\\_p%%')"
    ).scalars()
    return [str(name) for name in rows if _end_of_name(str(name)) is not None]


def missing_partition(error: BaseException) -> bool:
    """Whether a failed insert may have failed for want of a partition.

    PostgreSQL reports "no partition of relation … found for row" as SQLSTATE 23514
    (check_violation); the tables written at ingest have no CHECK constraint, so that code is
    this (the message itself is translated with `lc_messages`). The caller retries once.
    """
    original = getattr(error, "orig", error)
    return getattr(original, "sqlstate", None) == "23514"


def convert(conn: Connection, now: float | None = None) -> list[str]:
    """Schema step 7 on PostgreSQL: partition `results` and `rollups`, keeping their rows.

    Returns the tables converted: none on SQLite or when they are already partitioned.
    """
    from mmagg.server.tables import results, rollups

    if conn.dialect.name != "postgresql":
        return []
    done = []
    for table in (results, rollups):
        if _convert_table(conn, table, TABLES[table.name], now):
            done.append(table.name)
    _widen_report_ids(conn)
    return done


def convert_reports(conn: Connection, now: float | None = None) -> bool:
    """Schema step 11 on PostgreSQL: partition `reports` by day on `ts`, keeping its rows.

    The unique (workspace, Idempotency-Key) constraint goes; the keys move to `report_keys`
    (by month of `received_at`, one row per keyed report), where ingest keeps each key once
    by a transaction lock on the key and a lookup (`mmagg.server.db`). Does
    nothing on SQLite, when `reports` is partitioned already, or when `results` is not (a
    plain `results` still holds its foreign key to `reports.id`, which a partitioned
    `reports` could not serve: its unique key is (`id`, `ts`)). Returns whether it converted.
    """
    from mmagg.server.tables import reports

    if conn.dialect.name != "postgresql" or not is_partitioned(conn, "results"):
        return False
    _widen_report_ids(conn)
    if _relkind(conn, KEYS_TABLE) is None:
        _create_keys_table(conn, now)
    return _convert_table(conn, reports, TABLES["reports"], now)


def _create_keys_table(conn: Connection, now: float | None) -> None:
    """`report_keys`, partitioned by month of `received_at`, filled with the key of every
    keyed report (a month for each month holding one, plus this month and the next)."""
    from mmagg.server.tables import report_keys

    columns = ", ".join(
        f"{column.name} {column.type.compile(dialect=conn.dialect)} NOT NULL"
        for column in report_keys.columns
    )
    conn.exec_driver_sql(f"CREATE TABLE {KEYS_TABLE} ({columns}) PARTITION BY RANGE (received_at)")
    moment = time.time() if now is None else now
    months = {month_of(moment), month_of(moment + AHEAD_DAYS * PARTITION_SECONDS)}
    for day in conn.exec_driver_sql(
        "SELECT DISTINCT floor(received_at / 86400)::bigint FROM reports "
        "WHERE idempotency_key IS NOT NULL"
    ).scalars():
        months.add(month_of(int(day) * 86_400.0))
    for month in sorted(months):
        low, high = month_bounds(month)
        conn.exec_driver_sql(
            f"CREATE TABLE {key_partition_name(month)} PARTITION OF {KEYS_TABLE} "
            f"FOR VALUES FROM ({low}) TO ({high})"
        )
    conn.exec_driver_sql(
        f"INSERT INTO {KEYS_TABLE} (workspace_id, idempotency_key, received_at, report_id, "
        "result_count) SELECT workspace_id, idempotency_key, received_at, id, result_count "
        "FROM reports WHERE idempotency_key IS NOT NULL"
    )
    conn.exec_driver_sql(
        f"CREATE INDEX ix_{KEYS_TABLE}_key ON {KEYS_TABLE} (workspace_id, idempotency_key)"
    )


def _widen_report_ids(conn: Connection) -> None:
    """`reports.id` as a bigint: a 32-bit id runs out after ~12 days at 2,000 reports/s,
    whatever the retention (docs/scale.md). Rewrites `reports` once; idempotent."""
    kind = conn.exec_driver_sql(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = 'reports' AND column_name = 'id'"
    ).scalar()
    if kind is None or kind == "bigint":
        return
    conn.exec_driver_sql("ALTER TABLE reports ALTER COLUMN id TYPE bigint")
    sequence = conn.exec_driver_sql("SELECT pg_get_serial_sequence('reports', 'id')").scalar()
    if sequence is not None:
        conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} AS bigint")


def _convert_table(conn: Connection, table: sa.Table, key: str, now: float | None) -> bool:
    """Make plain `table` partitioned by day on `key`, in `conn`'s transaction.

    A partitioned `<table>_partitioned` with the same columns (`id` and `report_id` become
    bigints), a partition for every day that holds rows plus today and the next `AHEAD_DAYS`,
    every row copied, the old table dropped, the new one renamed, then its keys and indexes
    built after the copy (a primary key `id` becomes (`id`, `key`): a unique key on a
    partitioned table must hold the partition key; a unique constraint without the key is
    left out: reports' Idempotency-Key, kept by `report_keys` instead), foreign keys to other
    tables added back, and an id sequence moved over and widened to bigint.
    """
    name = table.name
    if _relkind(conn, name) != "r":
        return False
    new = f"{name}_partitioned"
    sequence = None
    if "id" in table.c:
        sequence = conn.exec_driver_sql(f"SELECT pg_get_serial_sequence('{name}', 'id')").scalar()
        if sequence is None:
            sequence = f"{name}_id_seq"
            conn.exec_driver_sql(f"CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint")
            conn.exec_driver_sql(
                f"SELECT setval('{sequence}', COALESCE((SELECT MAX(id) FROM {name}), 0) + 1, false)"
            )
        conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
        conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} AS bigint")
    definitions = []
    for column in table.columns:
        if column.name == "id":
            definitions.append(f"id BIGINT NOT NULL DEFAULT nextval('{sequence}'::regclass)")
            continue
        if column.name == "report_id":  # reports.id is widened too (_widen_report_ids)
            definitions.append("report_id BIGINT NOT NULL")
            continue
        kind = column.type.compile(dialect=conn.dialect)
        definitions.append(f"{column.name} {kind}{'' if column.nullable else ' NOT NULL'}")
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {new}")
    conn.exec_driver_sql(
        f"CREATE TABLE {new} ({', '.join(definitions)}) PARTITION BY RANGE ({key})"
    )
    days = {
        int(day)
        for day in conn.exec_driver_sql(
            f"SELECT DISTINCT floor({key} / {PARTITION_SECONDS})::bigint FROM {name}"
        ).scalars()
    }
    today = day_of(time.time() if now is None else now)
    days.update(range(today, today + AHEAD_DAYS + 1))
    for day in sorted(days):
        low, high = day * PARTITION_SECONDS, (day + 1) * PARTITION_SECONDS
        conn.exec_driver_sql(
            f"CREATE TABLE {partition_name(day, name)} PARTITION OF {new} "
            f"FOR VALUES FROM ({low}) TO ({high})"
        )
    columns = ", ".join(column.name for column in table.columns)
    conn.exec_driver_sql(f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {name}")
    conn.exec_driver_sql(f"DROP TABLE {name}")
    conn.exec_driver_sql(f"ALTER TABLE {new} RENAME TO {name}")
    if sequence is not None:
        conn.exec_driver_sql(
            f"ALTER TABLE {name} ADD CONSTRAINT {name}_pkey PRIMARY KEY (id, {key})"
        )
        conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} OWNED BY {name}.id")
    for constraint in sorted(table.constraints, key=lambda c: str(c.name)):
        if isinstance(constraint, sa.UniqueConstraint) and constraint.name:
            names = [column.name for column in constraint.columns]
            columns = ", ".join(names)
            if key in names:  # (one without the key: reports' Idempotency-Key, whose
                # uniqueness `report_keys` keeps instead)
                conn.exec_driver_sql(
                    f"ALTER TABLE {name} ADD CONSTRAINT {constraint.name} UNIQUE ({columns})"
                )
    for foreign in sorted(table.foreign_keys, key=lambda f: f.target_fullname):
        target = foreign.column.table.name
        if target in TABLES:  # within the partitioned tables: none on PostgreSQL
            continue
        conn.exec_driver_sql(
            f"ALTER TABLE {name} ADD CONSTRAINT {name}_{foreign.parent.name}_fkey FOREIGN KEY "
            f"({foreign.parent.name}) REFERENCES {target} ({foreign.column.name})"
        )
    for index in sorted(table.indexes, key=lambda index: str(index.name)):
        conn.execute(sa.schema.CreateIndex(index))
    return True
