"""Per-minute to per-day aggregates of the stored results, and reads served from them.

Every stored result adds to one row per level (1 min, 5 min, 1 h, 6 h, 1 day) of the `rollups`
table, keyed by (workspace, level, bucket start, model, class, device, source), once it is
below the watermark W (`complete_before`, schema step 10): every result with `ts < W` is in
the rollups and none after it is. A late report (`ts < W`) has its rows written by the
transaction that stores it (`Database.store_reports`); newer results are folded by a job
(`Database.fold_rollups`, in `mmagg serve`) into one row per key and bucket, moving W in the
same transaction. Reads use rollups below W only and raw rows above it, in one snapshot, so
they are exact wherever W is. docs/scale.md explains the choice and the numbers.

A read over [start, end) is split into segments (`plan`; `segments` stops them at W): whole
days from the day rows, whole 6-hour blocks and hours around them, and so on down to
minutes; the sub-minute edges and everything from W on come from the raw results. The
partial aggregates of the segments are then merged (`Agg.merge`). Counts,
minimums, maximums and histograms are exact; sums of confidences are the same numbers added
in another order (equal to the raw sums up to float rounding, about 1e-15 relative).

Example:
    >>> [(s.start, s.end, s.level) for s in plan(30.0, 7530.0, None)][:3]
    [(30.0, 60.0, 0), (60.0, 300.0, 60), (300.0, 3600.0, 300)]
    >>> [(s.start, s.end, s.level) for s in plan(30.0, 7530.0, None)][3:]
    [(3600.0, 7200.0, 3600), (7200.0, 7500.0, 300), (7500.0, 7530.0, 0)]
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server.tables import (
    ROLLUP_KEY_COLUMNS,
    results,
    rollup_watermark,
    rollups,
    workspaces,
)
from mmagg.wire import HISTOGRAM_BUCKETS

# Coarse to fine; each level divides the next coarser one (days are UTC days). The 300 s
# level serves the dashboard's 5 to 30 minute buckets and trims a range's ragged edges; the
# 21600 s level serves its 6 and 12 hour buckets (a month's and two months' charts).
LEVELS = (86400, 21600, 3600, 300, 60)
# Reads go to raw rows when this is False (benchmarks/read.py --raw measures both ways).
ENABLED = True

_KEY_COLUMNS = ROLLUP_KEY_COLUMNS
_VALUE_COLUMNS = (
    "results",
    "conf_sum",
    "conf_min",
    "conf_max",
    "best_ts",
    "last_ts",
    "with_stats",
    "predictions",
    "prediction_sum",
    *(f"hist_{i}" for i in range(HISTOGRAM_BUCKETS)),
    "model_reports",
    "source_reports",
    "device_reports",
    "device_source_reports",
)
ROLLUP_COLUMNS = _KEY_COLUMNS + _VALUE_COLUMNS
_ADDED = (
    "results",
    "conf_sum",
    "with_stats",
    "predictions",
    "prediction_sum",
    *(f"hist_{i}" for i in range(HISTOGRAM_BUCKETS)),
    "model_reports",
    "source_reports",
    "device_reports",
    "device_source_reports",
)
# Positions of the distinct-report counters in a value list (`_VALUE_COLUMNS` order).
_MODEL_REPORTS = _VALUE_COLUMNS.index("model_reports")
_SOURCE_REPORTS = _VALUE_COLUMNS.index("source_reports")
_DEVICE_REPORTS = _VALUE_COLUMNS.index("device_reports")
_DEVICE_SOURCE_REPORTS = _VALUE_COLUMNS.index("device_source_reports")


def encode_key(value: str | None) -> str:
    """The rollup key of a device / source id: "" for none, "=" + the id otherwise.

    >>> encode_key(None), encode_key("cam-1")
    ('', '=cam-1')
    """
    return "" if value is None else "=" + value


def decode_key(key: str) -> str | None:
    """The inverse of `encode_key`."""
    return None if key == "" else key[1:]


def bucket_start(ts: float, level: int) -> float:
    """The start of the `level`-second bucket holding `ts`, computed exactly (no division).

    >>> bucket_start(1_700_000_059.999, 60), bucket_start(-1.5, 60)
    (1700000040.0, -60.0)
    """
    start = ts - math.fmod(ts, level)
    while start > ts:
        start -= level
    while start + level <= ts:
        start += level
    return start


def sample_bucket(confidence: float) -> int:
    """The histogram bucket a result without stats adds to (the read's SQL rule)."""
    if confidence < 0:
        return 0
    scaled = confidence * HISTOGRAM_BUCKETS
    if scaled >= HISTOGRAM_BUCKETS - 1:
        return HISTOGRAM_BUCKETS - 1
    return int(math.floor(scaled))


# One result as the rollups see it: (model, class, device, source, confidence, stats_count,
# stats_sum, histogram or None).
ResultFacts = tuple[
    str,
    str,
    "str | None",
    "str | None",
    float,
    "int | None",
    "float | None",
    "Sequence[int | None] | None",
]


def contributions(
    workspace_id: int, ts: float, facts: Iterable[ResultFacts]
) -> dict[tuple[Any, ...], list[Any]]:
    """The rollup rows one report adds: key tuple -> value list (`ROLLUP_COLUMNS` order).

    A report counts once per model (`model_reports`, on its smallest (class, source) key),
    once per model and source (`source_reports`, on its smallest class there), once in all
    (`device_reports`, on its smallest (model, class, source) key: a report has one device)
    and once per source across models (`device_source_reports`, on its smallest (model,
    class) with that source).
    """
    found: dict[tuple[Any, ...], list[Any]] = {}
    contributions_into(found, workspace_id, ts, facts)
    return found


def contributions_into(
    target: dict[tuple[Any, ...], list[Any]],
    workspace_id: int,
    ts: float,
    facts: Iterable[ResultFacts],
) -> None:
    """Add the rollup rows of one report (`contributions`) into `target`.

    The values of each result are computed once and then filed under every level: the
    levels differ only in the bucket of the key.
    """
    base = _report_base(ts, facts)
    for level in LEVELS:
        head = (workspace_id, level, bucket_start(ts, level))
        for tail, values in base.items():
            key = head + tail
            row = target.get(key)
            if row is None:
                target[key] = list(values)
            else:
                _add(row, values)


def _report_base(ts: float, facts: Iterable[ResultFacts]) -> dict[tuple[Any, ...], list[Any]]:
    """The rollup values of one report per (model, class, device key, source key), the same
    at every level, its distinct-report counters set (`contributions`)."""
    items = list(facts)
    base: dict[tuple[Any, ...], list[Any]] = {}
    if not items:
        return base
    first_of_model: dict[str, tuple[str, str]] = {}
    first_of_source: dict[tuple[str, str], str] = {}
    for model, class_name, device, source, confidence, count, total, histogram in items:
        source_key = "" if source is None else "=" + source
        _note_firsts(first_of_model, first_of_source, model, class_name, source_key)
        if histogram is None:
            hist = [0] * HISTOGRAM_BUCKETS
            if count is None:
                hist[sample_bucket(confidence)] = 1
        else:
            hist = [0 if value is None else int(value) for value in histogram]
            if count is None:
                sampled = sample_bucket(confidence)
                if histogram[sampled] is None:
                    hist[sampled] = 1
        values = [
            1,
            confidence,
            confidence,
            confidence,
            ts,
            ts,
            0 if count is None else 1,
            1 if count is None else count,
            confidence if total is None else total,
            *hist,
            0,
            0,
            0,
            0,
        ]
        tail = (model, class_name, "" if device is None else "=" + device, source_key)
        row = base.get(tail)
        if row is None:
            base[tail] = values
        else:
            _add(row, values)
    device_key = _device_of(items)
    for model, (class_name, source_key) in first_of_model.items():
        base[(model, class_name, device_key, source_key)][_MODEL_REPORTS] = 1
    for (model, source_key), class_name in first_of_source.items():
        base[(model, class_name, device_key, source_key)][_SOURCE_REPORTS] = 1
    for index, (model, class_name, source_key) in _device_marks(items):
        base[(model, class_name, device_key, source_key)][index] = 1
    return base


def _note_firsts(
    first_of_model: dict[str, tuple[str, str]],
    first_of_source: dict[tuple[str, str], str],
    model: str,
    class_name: str,
    source_key: str,
) -> None:
    """Keep, per model, its least (class, source key) and, per (model, source key), its least
    class in a report: the one key row of each that counts the report as distinct."""
    mark = (class_name, source_key)
    known_mark = first_of_model.get(model)
    if known_mark is None or mark < known_mark:
        first_of_model[model] = mark
    known = first_of_source.get((model, source_key))
    if known is None or class_name < known:
        first_of_source[(model, source_key)] = class_name


def _device_marks(items: Sequence[ResultFacts]) -> list[tuple[int, tuple[str, str, str]]]:
    """The report-wide counters of one report, as (value index, (model, class, source key)):
    `device_reports` on its smallest (model, class, source) key, `device_source_reports` on
    its smallest (model, class) key of each source (what the `devices` read sums)."""
    first: tuple[str, str, str] | None = None
    first_of_source: dict[str, tuple[str, str]] = {}
    for model, class_name, _device, source, *_rest in items:
        source_key = encode_key(source)
        mark = (model, class_name, source_key)
        if first is None or mark < first:
            first = mark
        known = first_of_source.get(source_key)
        if known is None or (model, class_name) < known:
            first_of_source[source_key] = (model, class_name)
    marks = [] if first is None else [(_DEVICE_REPORTS, first)]
    marks += [
        (_DEVICE_SOURCE_REPORTS, (model, class_name, source_key))
        for source_key, (model, class_name) in first_of_source.items()
    ]
    return marks


def _device_of(items: Sequence[ResultFacts]) -> str:
    """The device key of a report's results (one device per report)."""
    return encode_key(items[0][2])


def _add(row: list[Any], other: Sequence[Any]) -> None:
    """Merge value list `other` into `row` (same layout as `_VALUE_COLUMNS`)."""
    row[0] += other[0]
    row[1] += other[1]
    if other[2] < row[2]:
        row[2] = other[2]
    if other[3] > row[3] or (other[3] == row[3] and other[4] > row[4]):
        row[4] = other[4]
    if other[3] > row[3]:
        row[3] = other[3]
    if other[5] > row[5]:
        row[5] = other[5]
    for i in range(6, len(row)):
        row[i] += other[i]


def merge_into(
    target: dict[tuple[Any, ...], list[Any]], more: dict[tuple[Any, ...], list[Any]]
) -> None:
    """Add the rows of `more` into `target` (in memory, before an upsert)."""
    for key, values in more.items():
        row = target.get(key)
        if row is None:
            target[key] = list(values)
        else:
            _add(row, values)


def _update_clause() -> str:
    """What an upsert does to a rollup row that exists: add, keep the min / max / best."""
    sets = [f"{name} = rollups.{name} + excluded.{name}" for name in _ADDED]
    sets += [
        "conf_min = CASE WHEN excluded.conf_min < rollups.conf_min THEN excluded.conf_min "
        "ELSE rollups.conf_min END",
        "conf_max = CASE WHEN excluded.conf_max > rollups.conf_max THEN excluded.conf_max "
        "ELSE rollups.conf_max END",
        "best_ts = CASE WHEN excluded.conf_max > rollups.conf_max OR (excluded.conf_max = "
        "rollups.conf_max AND excluded.best_ts > rollups.best_ts) THEN excluded.best_ts "
        "ELSE rollups.best_ts END",
        "last_ts = CASE WHEN excluded.last_ts > rollups.last_ts THEN excluded.last_ts "
        "ELSE rollups.last_ts END",
    ]
    return f" ON CONFLICT ({', '.join(_KEY_COLUMNS)}) DO UPDATE SET " + ", ".join(sets)


@functools.lru_cache(maxsize=256)
def upsert_sql(dialect: str, rows: int) -> str:
    """One INSERT ... ON CONFLICT DO UPDATE for `rows` rows, in the driver's paramstyle."""
    placeholder = "?" if dialect == "sqlite" else "%s"
    one = "(" + ", ".join([placeholder] * len(ROLLUP_COLUMNS)) + ")"
    return (
        f"INSERT INTO rollups ({', '.join(ROLLUP_COLUMNS)}) VALUES "
        + ", ".join([one] * rows)
        + _update_clause()
    )


# Rows to upsert are copied into this session-local table first (PostgreSQL).
_STAGING = "mmagg_rollups_in"


@functools.lru_cache(maxsize=1)
def _staging_sql() -> tuple[str, str, str]:
    """(create the staging table, COPY into it, upsert from it in key order)."""
    columns = ", ".join(ROLLUP_COLUMNS)
    return (
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE rollups) ON COMMIT DELETE ROWS",
        f"COPY {_STAGING} ({columns}) FROM STDIN (FORMAT BINARY)",
        # Emptied by the same statement: several chunks may go in one transaction.
        f"WITH moved AS (DELETE FROM {_STAGING} RETURNING {columns}) "
        f"INSERT INTO rollups ({columns}) SELECT {columns} FROM moved "
        f"ORDER BY {', '.join(_KEY_COLUMNS)}" + _update_clause(),
    )


@functools.lru_cache(maxsize=1)
def _copy_kinds() -> list[int]:
    from mmagg.server.db import copy_types

    return copy_types(rollups, ROLLUP_COLUMNS)


def _copy_upsert(cursor: Any, chunk: Sequence[tuple[tuple[Any, ...], list[Any]]]) -> None:
    """The PostgreSQL upsert: a binary COPY into a temporary table, then one upsert from it.

    A VALUES list of 32 rows has 928 parameters: psycopg parses such a long text again on
    every execution (its statement cache skips long texts) and adapts each parameter in
    Python, which cost more CPU than the rest of a report's ingest; JSON or text rows spend
    most of theirs formatting doubles. Binary COPY sends the doubles as 8 bytes each (C code
    in psycopg), and the upsert text is short and the same every time. The temporary table
    is the session's own; the upsert empties it.
    """
    from mmagg.server.db import copy_rows

    create, copy, upsert = _staging_sql()
    cursor.execute(create)
    copy_rows(cursor, copy, _copy_kinds(), ((*k, *v) for k, v in chunk))
    cursor.execute(upsert)


# Rows per upsert statement: SQLite allows 32,766 parameters, 31 columns each.
UPSERT_ROWS = 500


def write(cursor: Any, dialect: str, rows: dict[tuple[Any, ...], list[Any]]) -> None:
    """Upsert `rows` on a DBAPI cursor.

    On PostgreSQL in key order: concurrent writers then lock rows in the same order and
    cannot deadlock. SQLite has one writer at a time and takes them as they come.
    """
    ordered = sorted(rows.items()) if dialect != "sqlite" else list(rows.items())
    for start in range(0, len(ordered), UPSERT_ROWS):
        chunk = ordered[start : start + UPSERT_ROWS]
        if dialect == "postgresql":
            _copy_upsert(cursor, chunk)
            continue
        params = [value for key, values in chunk for value in (*key, *values)]
        cursor.execute(upsert_sql(dialect, len(chunk)), params)


def rebuild_rollups(conn: Connection, batch: int = 20_000) -> int:
    """Recompute every rollup row from the stored results; return the results read.

    Used by schema steps 5 and 8 (a database from before rollups or their counters) and by
    `mmagg` operators after restoring raw rows by hand. Only results before the watermark
    (`complete_before`) are rolled up, as the invariant says; the job folds the rest. Reads
    the results report by report, in batches.
    """
    watermark = _watermark_if_any(conn)
    conn.execute(sa.delete(rollups))
    query = sa.select(*_FOLD_COLUMNS).order_by(results.c.report_id)
    if watermark != math.inf:
        query = query.where(results.c.ts < watermark)
    pending: dict[tuple[Any, ...], list[Any]] = {}
    seen = 0
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        for report in _by_report(conn.execute(query)):
            workspace_id, ts = report[0][1], report[0][2]
            merge_into(pending, contributions(workspace_id, ts, _facts(report)))
            seen += len(report)
            if len(pending) >= batch:
                write(cursor, conn.dialect.name, pending)
                pending = {}
        if pending:
            write(cursor, conn.dialect.name, pending)
    finally:
        cursor.close()
    return seen


# What rebuilding and folding read of a result: report_id, workspace_id, ts, then the
# `ResultFacts` fields (histogram as ten columns).
_FOLD_COLUMNS = (
    results.c.report_id,
    results.c.workspace_id,
    results.c.ts,
    results.c.model_id,
    results.c.class_name,
    results.c.device_id,
    results.c.source_id,
    results.c.confidence,
    results.c.stats_count,
    results.c.stats_sum,
    *(results.c[f"hist_{i}"] for i in range(HISTOGRAM_BUCKETS)),
)
_NO_HISTOGRAM = (None,) * HISTOGRAM_BUCKETS


def _facts(report: Sequence[Sequence[Any]]) -> list[ResultFacts]:
    """The `ResultFacts` of the rows of one report (`_FOLD_COLUMNS` order)."""
    found: list[ResultFacts] = []
    for r in report:
        hist = tuple(r[10:])
        found.append(
            (r[3], r[4], r[5], r[6], r[7], r[8], r[9], None if hist == _NO_HISTOGRAM else hist)
        )
    return found


def _by_report(rows: Iterable[Any]) -> Iterator[list[Any]]:
    current: list[Any] = []
    for row in rows:
        if current and row[0] != current[0][0]:
            yield current
            current = []
        current.append(row)
    if current:
        yield current


# ----------------------------------------------------------------------------- watermark
#
# The invariant: every result with `ts < W` is in the rollups at every level and no result
# with `ts >= W` is, W being the one row of `rollup_watermark`. Ingest rolls up the results
# of a report older than W (a late report: clients replay their queue after an outage) and
# leaves the others to the job, which folds [W, W') from the raw rows, one aggregated row
# per key and bucket, and moves W to W' in the same transaction (`Database.fold_rollups`).
# A read takes its rollup segments below W only and the rest from raw rows, all in one
# snapshot, so it is exact wherever W is.

# PostgreSQL advisory lock key (any constant): ingest holds it shared from before it reads W
# until it commits; the fold holds it exclusively, so that it never folds a range while a
# report that found the range unfolded (and wrote no rollups) is still uncommitted.
WATERMARK_LOCK = 0x6D6D616777  # "mmagw"

_WATERMARK_SQL = "SELECT complete_before FROM rollup_watermark WHERE id = 1"


def complete_before(conn: Connection) -> float:
    """The watermark W: every result with `ts < W` is in the rollups, none after it is.

    `math.inf` when the row is missing (a database being migrated: every result is rolled
    up at ingest then).
    """
    value = conn.exec_driver_sql(_WATERMARK_SQL).scalar()
    return math.inf if value is None else float(value)


def _watermark_if_any(conn: Connection) -> float:
    """`complete_before`, or `math.inf` before schema step 10 made the table."""
    if not sa.inspect(conn).has_table(rollup_watermark.name):
        return math.inf
    return complete_before(conn)


def initial_watermark(conn: Connection, now: float | None = None) -> float:
    """Where the watermark starts (schema step 10): rollups written at ingest until then hold
    every stored result, so past the newest one and no earlier than now."""
    newest = conn.execute(sa.select(sa.func.max(results.c.ts))).scalar()
    start = time.time() if now is None else now
    if newest is not None:
        start = max(start, math.nextafter(float(newest), math.inf))
    return start


def set_watermark(conn: Connection, value: float) -> None:
    """Move the watermark to `value` (in the transaction that folded up to it)."""
    conn.execute(
        sa.update(rollup_watermark).where(rollup_watermark.c.id == 1).values(complete_before=value)
    )


def fold_range(conn: Connection, start: float, end: float) -> int:
    """Roll up the stored results with `start <= ts < end` into every level; the count.

    The caller holds the range (`Database.fold_rollups`): no result in it is rolled up yet
    and none can arrive unseen. The rows equal what ingest's `contributions` adds report by
    report (`rebuild_rollups`; the tests compare them row for row). On PostgreSQL the
    aggregation runs in the database (`_fold_in_sql`), on SQLite in Python
    (`_fold_in_python`): each is the cheaper on its engine (docs/scale.md, "Ingest cost").
    """
    if conn.dialect.name == "postgresql":
        return _fold_in_sql(conn, start, end)
    return _fold_in_python(conn, start, end)


def _fold_in_sql(conn: Connection, start: float, end: float) -> int:
    """`fold_range` on PostgreSQL: the results of the range are grouped into one row per
    key and minute in a temporary table (`_minute_sql`, every workspace through the
    (workspace_id, ts) index), and each level is one `INSERT ... SELECT ... GROUP BY ...
    ON CONFLICT DO UPDATE` over those minute rows (`_level_sql`). Nothing per result in
    Python.
    """
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(_STAGE_SQL)
        workspace_ids = conn.execute(sa.select(workspaces.c.id)).scalars().all()
        cursor.execute(_minute_sql(), (list(workspace_ids), start, end))
        cursor.execute(f"SELECT COALESCE(SUM(results), 0) FROM {_FOLD_STAGE}")
        row = cursor.fetchone()
        seen = int(row[0]) if row is not None else 0
        if seen:
            for level in LEVELS:
                cursor.execute(_level_sql(level))
        cursor.execute(f"DELETE FROM {_FOLD_STAGE}")
    finally:
        cursor.close()
    return seen


def _fold_in_python(conn: Connection, start: float, end: float) -> int:
    """`fold_range` on SQLite. A report's values are computed as ingest computes them
    (`_report_base`) and added into one row per key and minute; the coarser levels are
    sums of those minute rows. Read per workspace, through the (workspace_id, ts) index.

    On SQLite this costs less than `_fold_in_sql` (about 10 against 15 µs of CPU per
    result, docs/scale.md "Ingest cost": SQLite sorts the rows once per grouping).
    """
    workspace_ids = conn.execute(sa.select(workspaces.c.id)).scalars().all()
    minutes: dict[tuple[Any, ...], list[Any]] = {}
    seen = 0
    sql = _fold_sql(conn.dialect.name)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    for workspace_id in workspace_ids:
        # The DBAPI cursor and one fetch: SQLAlchemy's result fetched row by row here.
        cursor.execute(sql, (workspace_id, start, end))
        for report in _by_report(cursor.fetchall()):
            _fold_report(minutes, workspace_id, report)
            seen += len(report)
    if not minutes:
        cursor.close()
        return seen
    rows = dict(minutes) if 60 in LEVELS else {}
    for level in LEVELS:
        if level == 60:
            continue
        for key, values in minutes.items():
            coarse = (key[0], level, bucket_start(key[2], level), *key[3:])
            row = rows.get(coarse)
            if row is None:
                rows[coarse] = list(values)
            else:
                _add(row, values)
    try:
        write(cursor, conn.dialect.name, rows)
    finally:
        cursor.close()
    return seen


_HIST = 9  # the position of hist_0 in a value list (`_VALUE_COLUMNS`)


def _fold_report(
    minutes: dict[tuple[Any, ...], list[Any]], workspace_id: int, report: Sequence[Any]
) -> None:
    """Add one report's results (`_FOLD_COLUMNS` rows) into the minute rows `minutes`.

    What `_report_base` computes, added into the minute rows in place: no value list per
    result and no `_add` for a key the minute has already (the fold's cost is this loop).
    The distinct-report counters then go to the rows of the keys `_report_base` marks.
    """
    ts = report[0][2]
    head = (workspace_id, 60, bucket_start(ts, 60))
    first_of_model: dict[str, tuple[str, str]] = {}
    first_of_source: dict[tuple[str, str], str] = {}
    device = report[0][5]
    device_key = "" if device is None else "=" + device
    for r in report:
        model, class_name, source, confidence, count, total = r[3], r[4], r[6], r[7], r[8], r[9]
        source_key = "" if source is None else "=" + source
        _note_firsts(first_of_model, first_of_source, model, class_name, source_key)
        key = head + (model, class_name, device_key, source_key)
        row = minutes.get(key)
        if row is None:
            row = minutes[key] = [
                0,
                0.0,
                confidence,
                confidence,
                ts,
                ts,
                0,
                0,
                0.0,
                *([0] * HISTOGRAM_BUCKETS),
                0,
                0,
                0,
                0,
            ]
        else:
            if confidence < row[2]:
                row[2] = confidence
            if confidence > row[3] or (confidence == row[3] and ts > row[4]):
                row[4] = ts
            if confidence > row[3]:
                row[3] = confidence
            if ts > row[5]:
                row[5] = ts
        row[0] += 1
        row[1] += confidence
        if count is None:
            row[7] += 1
            row[8] += confidence if total is None else total
        else:
            row[6] += 1
            row[7] += count
            row[8] += confidence if total is None else total
        histogram = r[10:]
        if histogram == _NO_HISTOGRAM:
            if count is None:
                row[_HIST + sample_bucket(confidence)] += 1
        else:
            for i, value in enumerate(histogram):
                if value is not None:
                    row[_HIST + i] += value
            if count is None:
                sampled = sample_bucket(confidence)
                if histogram[sampled] is None:
                    row[_HIST + sampled] += 1
    for model, (class_name, source_key) in first_of_model.items():
        minutes[head + (model, class_name, device_key, source_key)][_MODEL_REPORTS] += 1
    for (model, source_key), class_name in first_of_source.items():
        minutes[head + (model, class_name, device_key, source_key)][_SOURCE_REPORTS] += 1
    items = [(r[3], r[4], r[5], r[6]) for r in report]
    for index, (model, class_name, source_key) in _device_marks(items):  # type: ignore[arg-type]
        minutes[head + (model, class_name, device_key, source_key)][index] += 1


@functools.lru_cache(maxsize=2)
def _fold_sql(dialect: str) -> str:
    """One workspace's results in [start, end), report by report (`_FOLD_COLUMNS`)."""
    p = "%s" if dialect == "postgresql" else "?"
    columns = ", ".join(column.name for column in _FOLD_COLUMNS)
    return (
        f"SELECT {columns} FROM results WHERE workspace_id = {p} AND ts >= {p} AND ts < {p} "
        "ORDER BY report_id"
    )


# The minute rows of the range being folded (`_fold_in_sql`): a temporary table of the
# session, emptied at the end of each fold.
_FOLD_STAGE = "mmagg_fold_minutes"
_STAGE_SQL = f"CREATE TEMP TABLE IF NOT EXISTS {_FOLD_STAGE} (LIKE rollups) ON COMMIT DELETE ROWS"
_KEY_TAIL = ("model_id", "class_name", "device_key", "source_key")
# Python orders strings by code point; so does PostgreSQL's "C" collation (UTF-8 bytes).
_C = ' COLLATE "C"'


def _bucket_sql(value: str, level: int) -> str:
    """SQL for `bucket_start(value, level)`: the largest multiple of `level` not above the
    value, exact (the division may round across a multiple: one step corrects it)."""
    guess = f"(FLOOR(({value}) / {level}.0) * {level}.0)"
    return (
        f"(CASE WHEN {guess} > ({value}) THEN {guess} - {level}.0 "
        f"WHEN {guess} + {level}.0 <= ({value}) THEN {guess} + {level}.0 ELSE {guess} END)"
    )


def _marks_sql() -> list[str]:
    """The distinct-report marks of the results in `raw`, as rows (workspace, bucket, model,
    class, device key, source key, which counter): one per report and model on its least
    (class, source key) (mark 1, `model_reports`), per report, model and source on its least
    class (2, `source_reports`), per report on its least (model, class, source key) (3,
    `device_reports`) and per report and source on its least (model, class) (4,
    `device_source_reports`): what `_report_base` marks. A tuple's least is the least
    array of its values in the "C" collation (arrays compare element by element)."""
    tail = ("workspace_id", "bucket", *_KEY_TAIL)
    found = [
        f"SELECT workspace_id, bucket, model_id, MIN(class_name{_C}) AS class_name, "
        "device_key, source_key, 2 AS mark FROM raw "
        "GROUP BY report_id, workspace_id, bucket, device_key, model_id, source_key"
    ]
    for mark, group, least in (
        (1, ", model_id", ("class_name", "source_key")),
        (3, "", ("model_id", "class_name", "source_key")),
        (4, ", source_key", ("model_id", "class_name")),
    ):
        by = f"report_id, workspace_id, bucket, device_key{group}"
        picked = {name: f"least[{n + 1}] AS {name}" for n, name in enumerate(least)}
        array = "ARRAY[" + ", ".join(name + _C for name in least) + "]"
        found.append(
            f"SELECT {', '.join(picked.get(name, name) for name in tail)}, {mark} AS mark "
            f"FROM (SELECT {by}, MIN({array}) AS least FROM raw GROUP BY {by}) AS firsts"
        )
    return found


@functools.lru_cache(maxsize=1)
def _minute_sql() -> str:
    """Aggregate every workspace's results in [start, end) into one row per key and minute,
    into the staging table; parameters: the workspace ids, start, end. An explicit list
    (not a subquery of `workspaces`): the planner then searches the (workspace_id, ts)
    index for each id; with a subquery it chose a scan of the day's whole partition.

    Per result, what `_report_base` computes: its histogram (the stored buckets, plus its
    sampled confidence's bucket where it has no stats and that bucket is not stored); the
    best time is the latest time of the key's highest confidence, the greatest (confidence,
    ts) array. The distinct-report counters are the marks of `_marks_sql` counted per key
    and joined to the key's row (a mark is always on a key that has results). The results
    are read once (`raw`: a CTE used several times is computed once).
    """
    scaled = f"confidence * {HISTOGRAM_BUCKETS}"
    sampled = (
        f"(CASE WHEN confidence < 0 THEN 0 WHEN {scaled} >= {HISTOGRAM_BUCKETS - 1} "
        f"THEN {HISTOGRAM_BUCKETS - 1} ELSE FLOOR({scaled}) END)"
    )
    hists = ", ".join(
        f"COALESCE(hist_{i}, CASE WHEN stats_count IS NULL AND {sampled} = {i} THEN 1 ELSE 0 END)"
        f" AS hist_{i}"
        for i in range(HISTOGRAM_BUCKETS)
    )
    raw = (
        f"SELECT workspace_id, report_id, ts, {_bucket_sql('ts', 60)} AS bucket, "
        "model_id, class_name, "
        "CASE WHEN device_id IS NULL THEN '' ELSE '=' || device_id END AS device_key, "
        "CASE WHEN source_id IS NULL THEN '' ELSE '=' || source_id END AS source_key, "
        f"confidence, stats_count, stats_sum, {hists} "
        "FROM results WHERE workspace_id = ANY(%s) AND ts >= %s AND ts < %s"
    )
    key = ("workspace_id", "bucket", *_KEY_TAIL)
    values = ", ".join(
        [
            "COUNT(*) AS results",
            "SUM(confidence) AS conf_sum",
            "MIN(confidence) AS conf_min",
            "MAX(confidence) AS conf_max",
            "(MAX(ARRAY[confidence, ts]))[2] AS best_ts",
            "MAX(ts) AS last_ts",
            "COUNT(stats_count) AS with_stats",
            "SUM(COALESCE(stats_count, 1)) AS predictions",
            "SUM(COALESCE(stats_sum, confidence)) AS prediction_sum",
            *(f"SUM(hist_{i}) AS hist_{i}" for i in range(HISTOGRAM_BUCKETS)),
        ]
    )
    counters = _VALUE_COLUMNS[_MODEL_REPORTS:]
    counted = ", ".join(
        f"SUM(CASE WHEN mark = {n} THEN 1 ELSE 0 END) AS {name}"
        for n, name in zip((1, 2, 3, 4), counters, strict=True)
    )
    grouped = ", ".join(key)
    return (
        f"WITH raw AS ({raw}), "
        f"main AS (SELECT {grouped}, {values} FROM raw GROUP BY {grouped}), "
        f"marks AS (SELECT {grouped}, {counted} "
        f"FROM ({' UNION ALL '.join(_marks_sql())}) AS marked GROUP BY {grouped}) "
        f"INSERT INTO {_FOLD_STAGE} ({', '.join(ROLLUP_COLUMNS)}) "
        f"SELECT main.workspace_id, 60, {', '.join('main.' + name for name in key[1:])}, "
        + ", ".join(f"main.{name}" for name in _VALUE_COLUMNS[:_MODEL_REPORTS])
        + ", "
        + ", ".join(f"COALESCE(marks.{name}, 0)" for name in counters)
        + " FROM main LEFT JOIN marks ON "
        + " AND ".join(f"marks.{name} = main.{name}" for name in key)
    )


@functools.lru_cache(maxsize=8)
def _level_sql(level: int) -> str:
    """Upsert the staged minute rows into `level`: one statement, the minute rows summed per
    key and `level` bucket (the best time: of the greatest (conf_max, best_ts)), in key
    order (concurrent writers lock rows in one order: Python's, as `write`)."""
    order = " ORDER BY workspace_id, level, bucket, " + ", ".join(name + _C for name in _KEY_TAIL)
    columns = ", ".join(ROLLUP_COLUMNS)
    if level == 60:
        return (
            f"INSERT INTO rollups ({columns}) SELECT {columns} FROM {_FOLD_STAGE}"
            + order
            + _update_clause()
        )
    tail = ", ".join(_KEY_TAIL)
    values = ", ".join(
        [
            "SUM(results)",
            "SUM(conf_sum)",
            "MIN(conf_min)",
            "MAX(conf_max)",
            "(MAX(ARRAY[conf_max, best_ts]))[2]",
            "MAX(last_ts)",
            *(f"SUM({name})" for name in _ADDED[2:]),
        ]
    )
    return (
        f"INSERT INTO rollups ({columns}) "
        f"SELECT workspace_id, {level} AS level, coarse AS bucket, {tail}, {values} "
        f"FROM (SELECT *, {_bucket_sql('bucket', level)} AS coarse FROM {_FOLD_STAGE}) AS staged "
        f"GROUP BY workspace_id, coarse, {tail}" + order + _update_clause()
    )


# ---------------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class Segment:
    """[start, end) read from raw rows (level 0) or from the rollups of `level`."""

    start: float
    end: float
    level: int


def plan(start: float, end: float, bucket_seconds: float | None) -> list[Segment]:
    """Split [start, end) into the coarsest segments that keep the read exact.

    A level serves a read only if its buckets fit inside the read's time buckets
    (`bucket_seconds` a multiple of the level; None: no time buckets).
    """
    usable = [
        level
        for level in LEVELS
        if ENABLED
        and (bucket_seconds is None or (bucket_seconds % level == 0 and bucket_seconds >= level))
    ]
    return _split(start, end, usable)


def split(start: float, end: float, levels: Sequence[int]) -> list[Segment]:
    """Split [start, end) into whole buckets of `levels` (coarse to fine, each dividing the
    previous one) and level-0 edges, coarsest first where they fit.

    >>> [(s.start, s.end, s.level) for s in split(1800.0, 180000.0, (86400, 3600))][1:]
    [(3600.0, 86400.0, 3600), (86400.0, 172800.0, 86400), (172800.0, 180000.0, 3600)]
    """
    return _split(start, end, levels)


def segments(
    start: float, end: float, bucket_seconds: float | None, watermark: float
) -> list[Segment]:
    """`plan` for a database whose rollups are complete below `watermark` only: rollup
    segments end there, [max(start, watermark), end) is read from raw rows.

    >>> [(s.start, s.end, s.level) for s in segments(0.0, 7300.0, None, 3630.0)]
    [(0.0, 3600.0, 3600), (3600.0, 7300.0, 0)]
    """
    found = plan(start, min(end, watermark), bucket_seconds)
    rest = max(start, watermark)
    if rest < end:
        if found and found[-1].level == 0 and found[-1].end == rest:
            # One raw read for the edge below the watermark and everything above it.
            rest = found.pop().start
        found.append(Segment(rest, end, 0))
    return found


def _split(start: float, end: float, levels: Sequence[int]) -> list[Segment]:
    if start >= end:
        return []
    if not levels:
        return [Segment(start, end, 0)]
    level, finer = levels[0], levels[1:]
    low = float(math.ceil(start / level) * level)
    high = float(math.floor(end / level) * level)
    # The divisions round: never let a level's segment reach outside [start, end).
    if low < start:
        low += level
    if high > end:
        high -= level
    if low >= high:
        return _split(start, end, finer)
    return [
        *_split(start, low, finer),
        Segment(low, high, level),
        *_split(high, end, finer),
    ]


@dataclass
class Agg:
    """What every read needs of a group of results."""

    results: int = 0
    conf_sum: float = 0.0
    conf_min: float | None = None
    conf_max: float | None = None
    last_ts: float | None = None
    with_stats: int = 0
    predictions: int = 0
    prediction_sum: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    reports: int = 0

    def merge(self, row: Sequence[Any]) -> None:
        """Add one aggregate row: results, sum, min, max, last, with_stats, predictions,
        prediction_sum, reports, hist_0..9."""
        count, total, low, high, last, with_stats, predictions, prediction_sum, reports = row[:9]
        self.results += int(count)
        self.conf_sum += float(total)
        if low is not None and (self.conf_min is None or low < self.conf_min):
            self.conf_min = float(low)
        if high is not None and (self.conf_max is None or high > self.conf_max):
            self.conf_max = float(high)
        if last is not None and (self.last_ts is None or last > self.last_ts):
            self.last_ts = float(last)
        self.with_stats += int(with_stats)
        self.predictions += int(predictions)
        self.prediction_sum += float(prediction_sum)
        self.reports += int(reports or 0)
        for i, value in enumerate(row[9:]):
            self.hist[i] += int(value or 0)


_RAW_KEYS = {
    "model_id": results.c.model_id,
    "class_name": results.c.class_name,
    "device_id": results.c.device_id,
    "source_id": results.c.source_id,
}
_ROLLUP_KEYS = {
    "model_id": rollups.c.model_id,
    "class_name": rollups.c.class_name,
    "device_id": rollups.c.device_key,
    "source_id": rollups.c.source_key,
}


@dataclass(frozen=True)
class Filters:
    """The restrictions of a read: models, classes, one device, one source."""

    model_ids: Sequence[str] = ()
    class_names: Sequence[str] = ()
    device_id: str | None = None
    source_id: str | None = None


def _floor(conn: Connection, value: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    if conn.dialect.name == "postgresql":
        return sa.func.floor(value)
    truncated = sa.cast(value, sa.Integer)
    return sa.case((value < truncated, truncated - 1), else_=truncated)


def _raw_hist(conn: Connection) -> list[sa.ColumnElement[Any]]:
    scaled = results.c.confidence * HISTOGRAM_BUCKETS
    floor = (
        sa.func.floor(scaled) if conn.dialect.name == "postgresql" else sa.cast(scaled, sa.Integer)
    )
    bucket = sa.case(
        (results.c.confidence < 0, 0),
        (scaled >= HISTOGRAM_BUCKETS - 1, HISTOGRAM_BUCKETS - 1),
        else_=floor,
    )
    sampled = results.c.stats_count.is_(None)
    return [
        sa.func.sum(
            sa.func.coalesce(
                results.c[f"hist_{i}"], sa.case((sa.and_(sampled, bucket == i), 1), else_=0)
            )
        )
        for i in range(HISTOGRAM_BUCKETS)
    ]


def report_counter(keys: Sequence[str], filters: Filters) -> str:
    """The rollup counter whose sum per group of `keys` is the number of distinct reports.

    A report has one device and one time, so grouping or filtering by device never splits
    it; each counter is set once per report and per what it names (model, source), so it
    is exact when every group has one value of those.

    >>> report_counter(("device_id", "source_id"), Filters())
    'device_source_reports'
    """
    if filters.class_names:
        raise ValueError("distinct reports cannot be counted from rollups under a class filter")
    allowed = {"model_id", "device_id", "source_id"}
    if not set(keys) <= allowed:
        raise ValueError(f"distinct reports cannot be counted per {tuple(keys)} from rollups")
    one_model = "model_id" in keys or len(filters.model_ids) == 1
    one_source = "source_id" in keys or filters.source_id is not None
    if "model_id" not in keys and not filters.model_ids:  # across models
        return "device_source_reports" if one_source else "device_reports"
    if not one_model:
        raise ValueError("distinct reports over several models need a model key or no filter")
    return "source_reports" if one_source else "model_reports"


def aggregate(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    keys: Sequence[str],
    filters: Filters = Filters(),
    bucket_seconds: float | None = None,
    with_reports: bool = False,
    with_hist: bool = False,
) -> dict[tuple[Any, ...], Agg]:
    """Group the results in [start, end) by `keys` (and the time bucket index last, when
    `bucket_seconds` is given), from rollups where exact and raw rows elsewhere.

    `with_reports` counts distinct reports per group; `report_counter` says which rollup
    counter makes that exact for the keys and filters (ValueError when none does).
    """
    if with_reports:
        report_counter(keys, filters)
    found: dict[tuple[Any, ...], Agg] = {}
    watermark = complete_before(conn) if ENABLED else math.inf
    parts = segments(start, end, bucket_seconds, watermark)
    rolled = [segment for segment in parts if segment.level]
    # Every rollup segment in one statement (one GROUP BY over all of them: the segments
    # do not overlap, so their sums add up); each raw segment in its own.
    reads: list[tuple[list[Segment], bool]] = [
        ([segment], False) for segment in parts if not segment.level
    ]
    if rolled:
        reads.append((rolled, True))
    for chosen, decode in reads:
        if decode:
            rows = _rolled(
                conn, workspace_id, chosen, keys, filters, bucket_seconds, with_reports, with_hist
            )
        else:
            rows = _raw(
                conn,
                workspace_id,
                chosen[0],
                keys,
                filters,
                bucket_seconds,
                with_reports,
                with_hist,
            )
        width = len(keys) + (bucket_seconds is not None)
        for row in rows:
            key = tuple(row[:width])
            if decode:
                key = (
                    tuple(
                        decode_key(v) if name in ("device_id", "source_id") else v
                        for name, v in zip(keys, key, strict=False)
                    )
                    + key[len(keys) :]
                )
            if bucket_seconds is not None:
                key = key[:-1] + (int(key[-1]),)
            found.setdefault(key, Agg()).merge(row[width:])
    return found


def _filtered(
    filters: Filters,
    model: sa.ColumnElement[Any],
    class_name: sa.ColumnElement[Any],
    device: sa.ColumnElement[Any],
    source: sa.ColumnElement[Any],
    key: Callable[[str], str] = str,
) -> list[sa.ColumnElement[bool]]:
    """The conditions `filters` put on a table's model, class, device and source columns
    (`key`: how a device or source id is stored there)."""
    where: list[sa.ColumnElement[bool]] = []
    if filters.model_ids:
        where.append(model.in_(list(filters.model_ids)))
    if filters.class_names:
        where.append(class_name.in_(list(filters.class_names)))
    if filters.device_id is not None:
        where.append(device == key(filters.device_id))
    if filters.source_id is not None:
        where.append(source == key(filters.source_id))
    return where


def _raw(
    conn: Connection,
    workspace_id: int,
    segment: Segment,
    keys: Sequence[str],
    filters: Filters,
    bucket_seconds: float | None,
    with_reports: bool,
    with_hist: bool,
) -> Sequence[Any]:
    group: list[sa.ColumnElement[Any]] = [_RAW_KEYS[k] for k in keys]
    if bucket_seconds is not None:
        group.append(_floor(conn, results.c.ts / bucket_seconds))
    where = [
        results.c.workspace_id == workspace_id,
        results.c.ts >= segment.start,
        results.c.ts < segment.end,
    ]
    where += _filtered(
        filters, results.c.model_id, results.c.class_name, results.c.device_id, results.c.source_id
    )
    columns = [
        *group,
        sa.func.count(),
        sa.func.sum(results.c.confidence),
        sa.func.min(results.c.confidence),
        sa.func.max(results.c.confidence),
        sa.func.max(results.c.ts),
        sa.func.count(results.c.stats_count),
        sa.func.sum(sa.func.coalesce(results.c.stats_count, 1)),
        sa.func.sum(sa.func.coalesce(results.c.stats_sum, results.c.confidence)),
        sa.func.count(sa.distinct(results.c.report_id)) if with_reports else sa.literal(0),
        *(_raw_hist(conn) if with_hist else []),
    ]
    return conn.execute(sa.select(*columns).where(*where).group_by(*group)).all()


def _rolled(
    conn: Connection,
    workspace_id: int,
    chosen: Sequence[Segment],
    keys: Sequence[str],
    filters: Filters,
    bucket_seconds: float | None,
    with_reports: bool,
    with_hist: bool,
) -> Sequence[Any]:
    r = rollups.c
    group: list[sa.ColumnElement[Any]] = [_ROLLUP_KEYS[k] for k in keys]
    if bucket_seconds is not None:
        group.append(_floor(conn, r.bucket / bucket_seconds))
    where = [
        r.workspace_id == workspace_id,
        sa.or_(
            *(
                sa.and_(r.level == segment.level, r.bucket >= segment.start, r.bucket < segment.end)
                for segment in chosen
            )
        ),
    ]
    where += _filtered(
        filters, r.model_id, r.class_name, r.device_key, r.source_key, key=encode_key
    )
    report_column = r[report_counter(keys, filters)] if with_reports else None
    columns = [
        *group,
        sa.func.sum(r.results),
        sa.func.sum(r.conf_sum),
        sa.func.min(r.conf_min),
        sa.func.max(r.conf_max),
        sa.func.max(r.last_ts),
        sa.func.sum(r.with_stats),
        sa.func.sum(r.predictions),
        sa.func.sum(r.prediction_sum),
        sa.func.sum(report_column) if report_column is not None else sa.literal(0),
        *([sa.func.sum(r[f"hist_{i}"]) for i in range(HISTOGRAM_BUCKETS)] if with_hist else []),
    ]
    return conn.execute(sa.select(*columns).where(*where).group_by(*group)).all()
