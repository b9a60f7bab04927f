"""The backend's tables, its schema version and migrations, and engine creation.

SQLite (a file, WAL) is the default; `postgresql://` URLs use the psycopg 3 driver. Every
timestamp is stored as float seconds since the epoch (UTC) so that time bucketing is plain
arithmetic on both engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from mmagg.wire import HISTOGRAM_BUCKETS

SCHEMA_VERSION = 11

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float(53), nullable=False),
)

# Schema step 2 (key scopes): comma-separated scopes ("ingest,read"; NULL grants nothing), an
# optional expiry, and when the key was last used (written at most once a minute per key).
API_KEY_COLUMNS_V2 = (
    sa.Column("scopes", sa.String(64), nullable=True),
    sa.Column("expires_at", sa.Float(53), nullable=True),
    sa.Column("last_used_at", sa.Float(53), nullable=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("workspace_id", sa.ForeignKey("workspaces.id"), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float(53), nullable=False),
    sa.Column("revoked_at", sa.Float(53), nullable=True),
    *API_KEY_COLUMNS_V2,
)

# Ids are 64-bit on PostgreSQL (a 32-bit id runs out after ~12 days at 2,000 reports/s; step 7
# widens older databases) and SQLite's INTEGER PRIMARY KEY there, which is 64-bit already.
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

reports = sa.Table(
    "reports",
    metadata,
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("workspace_id", sa.ForeignKey("workspaces.id"), nullable=False),
    sa.Column("received_at", sa.Float(53), nullable=False),
    sa.Column("ts", sa.Float(53), nullable=False),
    sa.Column("device_id", sa.String(1024), nullable=True),
    sa.Column("source", sa.String(1024), nullable=True),
    sa.Column("source_info", sa.String(1024), nullable=True),
    sa.Column("inference_server_version", sa.String(1024), nullable=True),
    sa.Column("system_info", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("frequency", sa.Float(53), nullable=True),
    sa.Column("extension", sa.Text, nullable=True),
    sa.Column("result_count", sa.Integer, nullable=False),
    # Step 3 (issue 12): the client's timestamp as sent (ts is where the report was filed,
    # docs/reliability.md "Client clocks") and the rule that placed it.
    sa.Column("client_timestamp", sa.String(64), nullable=True),
    sa.Column("time_rule", sa.String(16), nullable=True),
    sa.UniqueConstraint("workspace_id", "idempotency_key", name="uq_reports_idempotency"),
    sa.Index("ix_reports_workspace_ts", "workspace_id", "ts"),
)

# workspace_id, ts and device_id are copied from the report so that every read query is a
# single-table range scan on (workspace_id, model_id, ts).
results = sa.Table(
    "results",
    metadata,
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
    sa.Column(
        "report_id",
        ROW_ID,
        sa.ForeignKey("reports.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("ts", sa.Float(53), nullable=False),
    sa.Column("device_id", sa.String(1024), nullable=True),
    sa.Column("model_id", sa.String(1024), nullable=False),
    sa.Column("class_name", sa.String(1024), nullable=False),
    sa.Column("confidence", sa.Float(53), nullable=False),
    sa.Column("inference_id", sa.String(1024), nullable=True),
    sa.Column("model_type", sa.String(1024), nullable=True),
    sa.Column("source_id", sa.String(1024), nullable=True),
    sa.Column("stats_count", sa.Integer, nullable=True),
    sa.Column("stats_sum", sa.Float(53), nullable=True),
    sa.Column("stats_min", sa.Float(53), nullable=True),
    sa.Column("stats_max", sa.Float(53), nullable=True),
    # stats.histogram as ten columns, so that reads sum them in SQL.
    *(sa.Column(f"hist_{i}", sa.Integer, nullable=True) for i in range(HISTOGRAM_BUCKETS)),
    sa.Index("ix_results_ws_model_ts", "workspace_id", "model_id", "ts"),
    sa.Index("ix_results_ws_ts", "workspace_id", "ts"),
)

# Step 11, PostgreSQL only (so in a MetaData of its own: step 1 never creates it): the
# Idempotency-Key of every keyed report, partitioned by month of `received_at` (when the
# report was first received: always about now). `reports` is partitioned by day of `ts`
# there, and no unique constraint can span its days; ingest keeps each key once with a
# transaction lock on the key and a lookup here (`mmagg.server.db`). Retention drops a month
# of keys once every report it can name is gone (`mmagg.server.partitions`), never a row.
postgres_metadata = sa.MetaData()
report_keys = sa.Table(
    "report_keys",
    postgres_metadata,
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=False),
    sa.Column("received_at", sa.Float(53), nullable=False),
    sa.Column("report_id", sa.BigInteger, nullable=False),
    sa.Column("result_count", sa.Integer, nullable=False),
)

# Step 8: the report-wide counters the `devices` read sums (mmagg.server.rollups).
ROLLUP_COLUMNS_V8 = (
    sa.Column("device_reports", sa.BigInteger, nullable=False),
    sa.Column("device_source_reports", sa.BigInteger, nullable=False),
)

# What identifies a rollup row: its unique key, the conflict target of every upsert.
ROLLUP_KEY_COLUMNS = (
    "workspace_id",
    "level",
    "bucket",
    "model_id",
    "class_name",
    "device_key",
    "source_key",
)

# Step 5 (issue 15, docs/scale.md): per-minute (level 60) and per-hour (level 3600) aggregates
# of `results`, written in the ingest transaction (mmagg.server.rollups). A missing device or
# source is the key "" and a present one is "=" + the id, so that the key never holds NULL and
# one unique constraint serves the upsert on both engines.
rollups = sa.Table(
    "rollups",
    metadata,
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("level", sa.Integer, nullable=False),
    sa.Column("bucket", sa.Float(53), nullable=False),
    sa.Column("model_id", sa.String(1024), nullable=False),
    sa.Column("class_name", sa.String(1024), nullable=False),
    sa.Column("device_key", sa.String(1025), nullable=False),
    sa.Column("source_key", sa.String(1025), nullable=False),
    sa.Column("results", sa.BigInteger, nullable=False),
    sa.Column("conf_sum", sa.Float(53), nullable=False),
    sa.Column("conf_min", sa.Float(53), nullable=False),
    sa.Column("conf_max", sa.Float(53), nullable=False),
    sa.Column("best_ts", sa.Float(53), nullable=False),
    sa.Column("last_ts", sa.Float(53), nullable=False),
    sa.Column("with_stats", sa.BigInteger, nullable=False),
    sa.Column("predictions", sa.BigInteger, nullable=False),
    sa.Column("prediction_sum", sa.Float(53), nullable=False),
    *(sa.Column(f"hist_{i}", sa.BigInteger, nullable=False) for i in range(HISTOGRAM_BUCKETS)),
    # Each report counts once per model (model_reports) and once per model and source
    # (source_reports), on the row of its first class, so that sums count distinct reports.
    sa.Column("model_reports", sa.BigInteger, nullable=False),
    sa.Column("source_reports", sa.BigInteger, nullable=False),
    # Step 8: once per report (device_reports) and once per report and source across models
    # (device_source_reports), on the report's smallest key, for the `devices` read.
    *ROLLUP_COLUMNS_V8,
    sa.UniqueConstraint(*ROLLUP_KEY_COLUMNS, name="uq_rollups_key"),
    sa.Index("ix_rollups_ws_model_level_bucket", "workspace_id", "model_id", "level", "bucket"),
)

# Step 9 (issue 15, docs/scale.md "The exact median"): median digests, built off the ingest
# path by a background job (mmagg.server.medians). One row per (workspace, model, class,
# level, bucket) with the number of results it describes and their count in each of the
# 1,000 confidence bands; the sorted values themselves, a chunk of consecutive bands per row,
# in `median_values`, keyed by the digest's id (no strings repeated per chunk).
median_digests = sa.Table(
    "median_digests",
    metadata,
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("level", sa.Integer, nullable=False),
    sa.Column("bucket", sa.Float(53), nullable=False),
    sa.Column("model_id", sa.String(1024), nullable=False),
    sa.Column("class_name", sa.String(1024), nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
    # zlib of 1,000 little-endian uint32 band counts (mmagg.server.medians.encode_counts).
    sa.Column("counts", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint(
        "workspace_id", "level", "bucket", "model_id", "class_name", name="uq_median_digests_key"
    ),
    # Retention deletes by bucket across workspaces.
    sa.Index("ix_median_digests_bucket", "bucket"),
)

median_values = sa.Table(
    "median_values",
    metadata,
    sa.Column("digest_id", ROW_ID, primary_key=True, autoincrement=False),
    sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
    # The chunk's values as sorted little-endian float64.
    sa.Column("vals", sa.LargeBinary, nullable=False),
)

# Step 10 (issue 15): the rollup watermark, one row. Every result with `ts < complete_before`
# is in the rollups at every level, and no result at or after it is (mmagg.server.rollups):
# ingest writes the rollups of late results only, a job folds the rest (`fold_rollups`).
rollup_watermark = sa.Table(
    "rollup_watermark",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("complete_before", sa.Float(53), nullable=False),
)

dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("workspace_id", sa.ForeignKey("workspaces.id"), nullable=False),
    # The key the session was opened with: revoking it ends the session too.
    sa.Column("api_key_id", sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("created_at", sa.Float(53), nullable=False),
    sa.Column("expires_at", sa.Float(53), nullable=False),
)


# Alerting (docs/alerts.md): one row per alert instance (rule + label set), the transitions
# it went through, and the lease that makes one replica the evaluator.
alert_state = sa.Table(
    "alert_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule_name", sa.String(255), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("value", sa.Float(53), nullable=True),
    sa.Column("threshold", sa.Float(53), nullable=True),
    sa.Column("active_since", sa.Float(53), nullable=True),
    sa.Column("fired_at", sa.Float(53), nullable=True),
    sa.Column("resolved_at", sa.Float(53), nullable=True),
    sa.Column("updated_at", sa.Float(53), nullable=False),
    sa.Column("notified_status", sa.String(16), nullable=True),
    sa.Column("notified_at", sa.Float(53), nullable=True),
    sa.UniqueConstraint("rule_name", "fingerprint", name="uq_alert_state_rule_fp"),
    sa.Index("ix_alert_state_ws", "workspace_id"),
)

alert_events = sa.Table(
    "alert_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("workspace_id", sa.Integer, nullable=False),
    sa.Column("rule_name", sa.String(255), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("value", sa.Float(53), nullable=True),
    sa.Column("threshold", sa.Float(53), nullable=True),
    sa.Column("at", sa.Float(53), nullable=False),
    sa.Index("ix_alert_events_ws_at", "workspace_id", "at"),
)

# Named leases (`mmagg.server.lease`): the alert evaluator's, and since schema 6 the
# retention job's. The table kept the name it got with the first lease.
alert_lease = sa.Table(
    "alert_lease",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float(53), nullable=False),
)

# The token buckets of failed key checks (`mmagg.server.ratelimit`), shared by every backend
# process on the database. A row whose bucket has refilled means the same as no row.
failure_buckets = sa.Table(
    "failure_buckets",
    metadata,
    sa.Column("client", sa.String(160), primary_key=True),
    sa.Column("tokens", sa.Float(53), nullable=False),
    sa.Column("updated", sa.Float(53), nullable=False),
    sa.Index("ix_failure_buckets_updated", "updated"),
)


MEDIAN_FUNCTION = "mmagg_median"


class _Median:
    """SQLite aggregate `mmagg_median(x)`: the exact median of the non-null values.

    SQLite has no median (PostgreSQL's `percentile_cont(0.5)` serves there). Collecting the
    group's values and sorting them once costs about a third of ranking every row with
    window functions inside SQLite, and keeps the median in the same `GROUP BY` pass as the
    other aggregates.
    """

    def __init__(self) -> None:
        self.values: list[float] = []

    def step(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    def finalize(self) -> float | None:
        values = self.values
        if not values:
            return None
        values.sort()
        middle = len(values) // 2
        if len(values) % 2:
            return values[middle]
        return (values[middle - 1] + values[middle]) / 2


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer mmagg than this one."""


def normalize_url(database_url: str) -> str:
    """Map plain `postgresql://` / `postgres://` URLs to the psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if database_url.startswith(scheme):
            return "postgresql+psycopg://" + database_url[len(scheme) :]
    return database_url


def create_db_engine(database_url: str) -> Engine:
    """An engine for `database_url`, with SQLite tuned for one writer and many readers.

    Example:
        >>> engine = create_db_engine("sqlite://")
        >>> engine.dialect.name
        'sqlite'
    """
    url = sa.make_url(normalize_url(database_url))
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    in_memory = url.database in (None, "", ":memory:")
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if in_memory else None,
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_aggregate(MEDIAN_FUNCTION, 1, _Median)
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only an OS crash can
        # lose the last commits, which the client's retry + idempotency key then covers.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def _step_1(conn: Connection) -> None:
    metadata.create_all(conn)


def _step_2(conn: Connection) -> None:
    """Key scopes: add the api_keys columns; keys made before scopes keep every scope."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("api_keys")}
    preparer = conn.dialect.identifier_preparer
    for column in API_KEY_COLUMNS_V2:
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(api_keys.name)} "
                f"ADD COLUMN {preparer.quote(column.name)} {kind}"
            )
    conn.execute(
        sa.update(api_keys).where(api_keys.c.scopes.is_(None)).values(scopes=LEGACY_KEY_SCOPES)
    )


# What a key created before scopes existed may do: everything it could do before.
LEGACY_KEY_SCOPES = "admin,ingest,read"


def _step_3(conn: Connection) -> None:
    """Issue 12: `reports.client_timestamp` and `reports.time_rule` (idempotent)."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("reports")}
    for column in (reports.c.client_timestamp, reports.c.time_rule):
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE reports ADD COLUMN {column.name} {kind}")


def _step_4(conn: Connection) -> None:
    """Alert state, alert history and the evaluator lease (issue 11); idempotent."""
    for table in (alert_state, alert_events, alert_lease):
        table.create(conn, checkfirst=True)


def _step_5(conn: Connection) -> None:
    """Rollups (issue 15): create the table if missing and build it from the stored results."""
    from mmagg.server.rollups import rebuild_rollups

    rollups.create(conn, checkfirst=True)
    rebuild_rollups(conn)


def _step_6(conn: Connection) -> None:
    """The shared failed-key-check buckets (issue 15, more than one process); idempotent."""
    failure_buckets.create(conn, checkfirst=True)


def _step_7(conn: Connection) -> None:
    """PostgreSQL: `results` and `rollups` partitioned by day, keeping their rows
    (docs/scale.md, "Partitions"); idempotent, nothing on SQLite."""
    from mmagg.server.partitions import convert

    convert(conn)


def _step_8(conn: Connection) -> None:
    """Rollups for the `devices` read and the 6-hour level (idempotent): add the report-wide
    counters `device_reports` / `device_source_reports`, and rebuild the rollups from the
    stored results when they lack the counters or the 21600 s level."""
    from mmagg.server.rollups import rebuild_rollups

    present = {column["name"] for column in sa.inspect(conn).get_columns("rollups")}
    added = False
    for column in ROLLUP_COLUMNS_V8:
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE rollups ADD COLUMN {column.name} {kind} NOT NULL DEFAULT 0"
            )
            added = True
    stale = conn.execute(
        sa.select(sa.literal(1)).where(
            sa.exists().where(results.c.id.is_not(None)),
            ~sa.exists().where(rollups.c.level == 21600),
        )
    ).first()
    if added or stale is not None:
        rebuild_rollups(conn)


def _step_9(conn: Connection) -> None:
    """Median digests (issue 15): create the two tables if missing; idempotent. They start
    empty: the background job (`Database.build_median_digests`) fills them, and reads use
    raw rows for whatever has no digest yet."""
    for table in (median_digests, median_values):
        table.create(conn, checkfirst=True)


def _step_10(conn: Connection) -> None:
    """The rollup watermark (issue 15): create its table and its one row, idempotent.

    Until now ingest wrote the rollups of every result, so every stored result is in them:
    the watermark starts past the newest stored result and no earlier than now (a result
    timestamped ahead of the clock is rolled up already and must not be folded twice).
    """
    from mmagg.server.rollups import initial_watermark

    rollup_watermark.create(conn, checkfirst=True)
    if conn.execute(sa.select(rollup_watermark.c.id)).first() is None:
        conn.execute(
            sa.insert(rollup_watermark).values(id=1, complete_before=initial_watermark(conn))
        )


def _step_11(conn: Connection) -> None:
    """PostgreSQL: `reports` partitioned by day on `ts`, keeping its rows, so that retention
    drops its days as whole partitions too (docs/scale.md, "Partitions"). Its unique
    (workspace, Idempotency-Key) constraint becomes a plain index in every partition; ingest
    keeps each key once by a lock on the key (`mmagg.server.db`). Idempotent, nothing on
    SQLite, and nothing while `results` is a plain table (its foreign key to `reports.id`)."""
    from mmagg.server.partitions import convert_reports

    convert_reports(conn)


# Step n upgrades a database at version n - 1 to version n; append, never edit.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _step_1,
    2: _step_2,
    3: _step_3,
    4: _step_4,
    5: _step_5,
    6: _step_6,
    7: _step_7,
    8: _step_8,
    9: _step_9,
    10: _step_10,
    11: _step_11,
}


def current_version(conn: Connection) -> int:
    """The schema version stored in the database, 0 for an empty database."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(version or 0)


# Any constant: the key of the advisory lock that serialises migrations on PostgreSQL.
_MIGRATION_LOCK = 0x6D6D616767  # "mmagg"


def _one_migration_at_a_time(conn: Connection) -> None:
    """Hold the database's migration lock until `conn`'s transaction ends, so that several
    processes starting together on a new or older database migrate it once: the others wait,
    then find it at the current version."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    elif conn.dialect.name == "sqlite":
        conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]


def migrate(engine: Engine) -> int:
    """Upgrade the database step by step to `SCHEMA_VERSION` and return the version.

    Raises `SchemaTooNewError` for a database written by a newer release, so that an old
    binary never writes into a schema it does not know.

    Example:
        >>> migrate(create_db_engine("sqlite://")) == SCHEMA_VERSION
        True
    """
    # SQLite answers "database is locked" at once, without waiting out its busy timeout, in
    # a few cases (a connection switching the file to WAL while another migrates; a lock
    # upgrade it refuses to avoid a deadlock): several instances starting together on one
    # file then retry the whole upgrade, which is idempotent (each step runs under the lock).
    attempts = 6 if engine.dialect.name == "sqlite" else 1
    for attempt in range(attempts):
        try:
            return _migrate_once(engine)
        except sa.exc.OperationalError as error:
            if attempt == attempts - 1 or "database is locked" not in str(error.orig):
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _migrate_once(engine: Engine) -> int:
    with engine.connect() as conn:
        if current_version(conn) == SCHEMA_VERSION:
            return SCHEMA_VERSION  # the usual start: nothing to lock
    with engine.begin() as conn:
        _one_migration_at_a_time(conn)
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"database schema version is {version}, this mmagg supports up to "
                f"{SCHEMA_VERSION}; upgrade mmagg"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](conn)
            conn.execute(sa.delete(schema_version))
            conn.execute(sa.insert(schema_version).values(version=step))
    return SCHEMA_VERSION
