"""The rollup watermark (issue 15): ingest rolls up late reports only, a job folds the rest.

Invariant: every result with `ts < W` is in the rollups at every level and none after W is.
Reads take rollups below W and raw rows above it, so they must equal the raw read wherever
W is: the job never run, run in random chunks, lagging, caught up, with late reports
arriving between folds. Checked on a SQLite file and on PostgreSQL, and under concurrency
(reports stored from threads while folds run) against `rebuild_rollups`.

Each example works in a time range of its own past the current watermark (the watermark
is one per database and only moves forward), in the future of the wall clock: reads name
their range, so the clock does not matter to them.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_payloads import report, result
from server_payloads import stats as payload_stats
from server_support import PG_ADMIN_DSN, drop_pg_database
from test_rollups import (
    CLASSES,
    DEVICES,
    MODELS,
    SOURCES,
    _both,
    assert_every_read_equal,
    assert_same,
    items,
)

from mmagg.server import Database, queries, rollups
from mmagg.server.bounds import Placement
from mmagg.server.db import PendingReport
from mmagg.server.queries import TimeRange
from mmagg.server.schemas import REPORT_ADAPTER
from mmagg.server.tables import reports, results
from mmagg.server.tables import rollups as rollup_table

HOURS = 3


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('watermark') / 'w.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    database = Database(url)
    yield database
    database.close()


def watermark(db: Database) -> float:
    with db.read() as conn:
        return rollups.complete_before(conn)


def fresh_anchor(db: Database) -> float:
    """A whole hour past the watermark and every stored result (earlier examples leave
    unfolded results behind): nothing of this range is folded or stored yet."""
    with db.read() as conn:
        newest = conn.execute(sa.select(sa.func.max(results.c.ts))).scalar() or 0.0
    return math.ceil(max(watermark(db), newest) / 3600) * 3600 + 3600


def _body(ts: float, device: str | None, drawn_items: list[Any]) -> Any:
    body_items = []
    for model, class_name, source, values, with_stats in drawn_items:
        extra: dict[str, Any] = {}
        if source is not None:
            extra["source_id"] = source
        if with_stats:
            extra["stats"] = payload_stats(values)
        body_items.append(result(class_name, max(values), model, **extra))
    when = datetime.fromtimestamp(ts, timezone.utc)
    body = report(body_items, timestamp=when)
    if device is None:
        del body["device_id"]
    else:
        body["device_id"] = device
    return REPORT_ADAPTER.validate_python(body), Placement(ts, time.time(), when.isoformat(), "x")


def _store_one(db: Database, principal: Any, ts: float, device: Any, drawn_items: Any) -> None:
    parsed, placement = _body(ts, device, drawn_items)
    db.store_report(principal, parsed, None, placement)


one_report = st.tuples(
    st.one_of(
        st.integers(0, HOURS * 3600_000 - 1),
        st.integers(1, HOURS * 60).map(lambda m: m * 60_000 - 1),
        st.integers(0, HOURS * 60).map(lambda m: m * 60_000),
    ),
    st.sampled_from(DEVICES),
    st.lists(items, min_size=1, max_size=4),
)
# A fold to minute `m` of the range, `chunk` seconds per transaction.
one_fold = st.tuples(st.integers(0, HOURS * 60), st.sampled_from([60, 120, 600, 3600]))
steps = st.lists(
    st.one_of(one_report.map(lambda r: ("report", r)), one_fold.map(lambda f: ("fold", f))),
    min_size=1,
    max_size=30,
)
offsets = st.one_of(
    st.integers(-120_000, HOURS * 3600_000 + 120_000),
    st.integers(0, HOURS * 60).map(lambda m: m * 60_000),
)
buckets = st.sampled_from([60, 120, 300, 900, 3600, 7200, 21600, 45, 90.5])


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=steps,
    start=offsets,
    end=offsets,
    bucket=buckets,
    device=st.sampled_from(DEVICES),
    source=st.sampled_from(SOURCES),
    names=st.lists(st.sampled_from(CLASSES), max_size=2, unique=True),
)
def test_every_read_is_exact_wherever_the_watermark_is(
    db: Database,
    drawn: list[Any],
    start: int,
    end: int,
    bucket: float,
    device: str | None,
    source: str | None,
    names: list[str],
) -> None:
    anchor = fresh_anchor(db)
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    stored = 0
    for kind, step in drawn:
        if kind == "report":
            millis, report_device, drawn_items = step
            _store_one(db, principal, anchor + millis / 1000, report_device, drawn_items)
            stored += len(drawn_items)
        else:
            minute, chunk = step
            before = watermark(db)
            db.fold_rollups(until=anchor + minute * 60, chunk=chunk)
            # The watermark never goes back, and lands where it was asked to.
            assert watermark(db) == max(before, anchor + minute * 60)
    workspace_id = db.ensure_workspace(workspace)
    low, high = sorted((start, end))
    span = TimeRange(anchor + low / 1000, anchor + high / 1000 + 0.001)
    wide = TimeRange(anchor - 60, anchor + HOURS * 3600 + 60)
    assert_every_read_equal(db, workspace_id, span, wide, bucket, device, source, names)


def test_a_fold_writes_one_row_per_key_and_bucket(db: Database) -> None:
    """The saving: 30 reports of one key in one minute fold into one minute row (and one row
    per coarser level), where ingest would have upserted one row per report and level."""
    anchor = fresh_anchor(db)
    db.fold_rollups(until=anchor)  # what earlier tests left unfolded: not counted below
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    for n in range(30):
        _store_one(db, principal, anchor + n, "edge-a", [("m/1", "car", None, [0.5], False)])
    workspace_id = db.ensure_workspace(workspace)
    count = sa.select(sa.func.count()).where(rollup_table.c.workspace_id == workspace_id)
    with db.read() as conn:
        assert conn.execute(count.select_from(rollup_table)).scalar() == 0  # not late
    assert db.fold_rollups(until=anchor + 60) == 30
    with db.read() as conn:
        rows = conn.execute(
            sa.select(rollup_table.c.level, rollup_table.c.results, rollup_table.c.model_reports)
            .where(rollup_table.c.workspace_id == workspace_id)
            .order_by(rollup_table.c.level)
        ).all()
    assert [tuple(row) for row in rows] == [(level, 30, 30) for level in sorted(rollups.LEVELS)]
    # A late report (before the watermark) is rolled up as it is stored.
    _store_one(db, principal, anchor + 59, "edge-a", [("m/1", "car", None, [0.5], False)])
    with db.read() as conn:
        minute = conn.execute(
            sa.select(rollup_table.c.results).where(
                rollup_table.c.workspace_id == workspace_id, rollup_table.c.level == 60
            )
        ).scalar()
    assert minute == 31


def test_the_watermark_starts_at_the_upgrade_past_every_stored_result(tmp_path: Path) -> None:
    """Schema step 10: rollups written at ingest until then are complete, so the watermark
    starts no earlier than the upgrade and past the newest result (even one ahead of the
    clock), and a fold right after it folds nothing twice."""
    url = f"sqlite:///{tmp_path / 'up.db'}"
    before = time.time()
    db = Database(url)
    try:
        assert before <= watermark(db) <= time.time()
        principal = db.authenticate(db.create_key("acme"))
        assert principal is not None
        ahead = time.time() + 7200.25  # a client clock two hours ahead, stored as it was
        _store_one(db, principal, ahead, "edge-a", [("m/1", "car", None, [0.5], False)])
        with db.write() as conn:  # as if written before step 10: rolled up at ingest
            conn.exec_driver_sql("DROP TABLE rollup_watermark")
            rollups.rebuild_rollups(conn)
            conn.exec_driver_sql("UPDATE schema_version SET version = 9")
    finally:
        db.close()
    upgraded = Database(url)
    try:
        assert watermark(upgraded) > ahead
        assert upgraded.fold_rollups(now=ahead + 3600) == 0
        with upgraded.read() as conn:
            assert conn.execute(sa.text("SELECT SUM(results) FROM rollups")).scalar() == len(
                rollups.LEVELS
            )
    finally:
        upgraded.close()


def test_pruned_raw_rows_that_were_never_folded_leave_reads_exact(db: Database) -> None:
    """Retention removing raw rows the job had not folded yet: they are in no read, rollup
    or raw, and what remains reads the same both ways."""
    anchor = fresh_anchor(db)
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    for n in range(0, 7200, 300):
        _store_one(db, principal, anchor + n, "edge-a", [("m/1", "car", None, [0.25], False)])
    db.prune(before=anchor + 3600)  # before any fold of this range
    db.fold_rollups(until=anchor + 2 * 3600)
    workspace_id = db.ensure_workspace(workspace)
    with db.read() as conn:
        for span in (TimeRange(anchor, anchor + 7200), TimeRange(anchor + 3600, anchor + 7200)):
            rolled, raw = _both(lambda span=span: queries.inference_stats(conn, workspace_id, span))
            assert_same(rolled, raw)
            assert rolled["num_inferences"] == 12


# ------------------------------------------------------------------------ concurrency

RACE_RUNS = int(os.environ.get("MMAGG_FOLD_RACE_RUNS", "3"))


def _rollup_rows(conn: sa.Connection, workspace_id: int) -> list[tuple[Any, ...]]:
    columns = [rollup_table.c[name] for name in rollups.ROLLUP_COLUMNS]
    return [
        tuple(row)
        for row in conn.execute(
            sa.select(*columns)
            .where(rollup_table.c.workspace_id == workspace_id)
            .order_by(*columns[:7])
        )
    ]


def _rebuilt_rows(db: Database, workspace_id: int) -> list[tuple[Any, ...]]:
    """The workspace's rollup rows as `rebuild_rollups` makes them, the database left as
    it was (the rebuild is rolled back)."""
    with db.engine.connect() as conn:
        transaction = conn.begin()
        try:
            rollups.rebuild_rollups(conn)
            return _rollup_rows(conn, workspace_id)
        finally:
            transaction.rollback()


@pytest.mark.parametrize("run", range(RACE_RUNS))
def test_folds_racing_ingest_equal_a_rebuild(db: Database, run: int) -> None:
    """Threads store reports (many of them late) while another folds minute by minute; after
    a last fold the rollups equal `rebuild_rollups` from the raw rows, row for row.

    Confidences are multiples of 1/64, so sums are exact in any order and rows compare
    with `==`. `MMAGG_FOLD_RACE_RUNS=50` runs it fifty times.
    """
    anchor = fresh_anchor(db)
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    workspace_id = db.ensure_workspace(workspace)
    minutes = 20
    stop = threading.Event()
    errors: list[BaseException] = []

    def ingest(seed: int) -> None:
        rng = random.Random(seed * 1000 + run)
        try:
            for _ in range(12):
                batch = []
                for _ in range(rng.randint(1, 4)):
                    ts = anchor + rng.randrange(minutes * 60 * 4) / 4
                    drawn_items = [
                        (
                            rng.choice(MODELS),
                            rng.choice(CLASSES),
                            rng.choice(SOURCES),
                            [rng.randrange(65) / 64 for _ in range(rng.randint(1, 3))],
                            rng.random() < 0.5,
                        )
                        for _ in range(rng.randint(1, 4))
                    ]
                    parsed, placement = _body(ts, rng.choice(DEVICES), drawn_items)
                    batch.append(PendingReport(principal, parsed, None, placement))
                for outcome in db.store_reports(batch):
                    assert not isinstance(outcome, Exception), outcome
        except BaseException as error:  # handed to the test thread
            errors.append(error)

    def fold() -> None:
        try:
            minute = 0
            while not stop.is_set() and minute <= minutes:
                db.fold_rollups(until=anchor + minute * 60, chunk=120)
                minute += 1
                time.sleep(0.002)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ingest, args=(n,)) for n in range(3)]
    folder = threading.Thread(target=fold)
    folder.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    folder.join()
    assert not errors, errors
    db.fold_rollups(until=anchor + minutes * 60 + 60)
    with db.read() as conn:
        folded = _rollup_rows(conn, workspace_id)
    rebuilt = _rebuilt_rows(db, workspace_id)
    assert folded == rebuilt
    assert sum(row[7] for row in folded if row[1] == 60) > 0
    # Keep the database small for the next run's rebuild.
    with db.write() as conn:
        conn.execute(sa.delete(rollup_table).where(rollup_table.c.workspace_id == workspace_id))
        conn.execute(sa.delete(results).where(results.c.workspace_id == workspace_id))
        conn.execute(sa.delete(reports).where(reports.c.workspace_id == workspace_id))


# ------------------------------------------------------------- the fold in SQL (issue 15)

# Names whose order trips up anything but Python's (code point) order: prefixes, a trailing
# space and a control character (below every letter), case, accents, characters outside the
# Basic Multilingual Plane, the empty class.
TRICKY_MODELS = ("m/1", "m/1 ", "m/10", "M/1", "m\u00e9", "m/1\x01")
TRICKY_CLASSES = ("", "car", "car ", "car0", "ca", "Car", "c\u00e4r", "car\x01", "\U0001f697")
TRICKY_SOURCES = (None, "", "c", "c ", "c0", "C", "\u00e7", "\uffff", "\U0001f4f7")
# Multiples of 1/8: sums are exact in any order and the best confidence is often tied.
tied_confidences = st.integers(0, 8).map(lambda n: n / 8)
tricky_items = st.tuples(
    st.sampled_from(TRICKY_MODELS),
    st.sampled_from(TRICKY_CLASSES),
    st.sampled_from(TRICKY_SOURCES),
    st.lists(tied_confidences, min_size=1, max_size=3),
    st.booleans(),
)
# Seconds after the anchor: anywhere in two hours, on a minute, or the last float before one.
tricky_times = st.one_of(
    st.integers(0, 7200_000 - 1).map(lambda n: n / 1000),
    st.integers(0, 120).map(lambda m: m * 60.0),
    st.integers(1, 120).map(lambda m: -float(m * 60)),  # marker: nextafter below minute m
)
# A fold to `seconds` after the anchor, the last minute of it in slices of `chunk` seconds
# (below a minute: the watermark stops inside minutes; `_fold_inside_minute`).
tricky_folds = st.tuples(
    st.integers(0, 7200 * 4).map(lambda n: n / 4), st.sampled_from([5, 7.5, 10, 30, 60])
)


tricky_steps = st.lists(
    st.one_of(
        st.tuples(
            tricky_times,
            st.sampled_from(DEVICES),
            st.lists(tricky_items, min_size=1, max_size=5),
        ).map(lambda r: ("report", r)),
        tricky_folds.map(lambda f: ("fold", f)),
    ),
    min_size=1,
    max_size=25,
)


def _fold_inside_minute(db: Database, anchor: float, seconds: float, chunk: float) -> None:
    """Fold to the minute before `anchor + seconds` in ten-minute transactions, then on to
    `anchor + seconds` in `chunk`-second ones; the watermark lands there."""
    before = watermark(db)
    db.fold_rollups(until=anchor + max(0.0, seconds - 60), chunk=600)
    db.fold_rollups(until=anchor + seconds, chunk=chunk)
    assert watermark(db) == max(before, anchor + seconds)


def _tricky_ts(anchor: float, drawn: float) -> float:
    if drawn < 0:
        return math.nextafter(anchor - drawn, -math.inf)
    return anchor + drawn


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=tricky_steps)
def test_a_fold_in_sql_equals_the_python_aggregation(db: Database, drawn: list[Any]) -> None:
    """The fold aggregates in SQL on PostgreSQL (one statement per level); ingest's late
    path, `rebuild_rollups` and SQLite's fold compute each report's rows in Python. On any
    reports (names ordered differently by byte, case or locale, tied best confidences,
    times just below a minute, duplicated keys in a report) and folds at any second, in
    slices of any size, the rows equal a rebuild from the raw rows, row for row."""
    _check_fold_equals_rebuild(db, drawn)


@pytest.fixture(scope="module")
def locale_db(pg_database_url: str) -> Iterator[Database]:
    """A PostgreSQL database whose default collation is ICU's English one (case and accents
    ordered as people read them, not by code point), as many installations are."""
    import psycopg

    name = f"mmagg_test_icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    database = Database(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        yield database
    finally:
        database.close()
        drop_pg_database(name)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=tricky_steps)
def test_a_fold_in_sql_follows_python_order_under_a_locale_collation(
    locale_db: Database, drawn: list[Any]
) -> None:
    """The counters mark each report's least key in Python's order (code points); the SQL
    fold compares in the "C" collation whatever the database's default, so a database
    ordering "Car" next to "car" still folds exactly what Python rebuilds."""
    _check_fold_equals_rebuild(locale_db, drawn)


def _check_fold_equals_rebuild(db: Database, drawn: list[Any]) -> None:
    anchor = fresh_anchor(db)
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    workspace_id = db.ensure_workspace(workspace)
    try:
        for kind, step in drawn:
            if kind == "report":
                when, device, drawn_items = step
                _store_one(db, principal, _tricky_ts(anchor, when), device, drawn_items)
            else:
                _fold_inside_minute(db, anchor, *step)
        db.fold_rollups(until=anchor + 7260, chunk=600)
        with db.read() as conn:
            folded = _rollup_rows(conn, workspace_id)
        assert folded == _rebuilt_rows(db, workspace_id)
    finally:  # keep the database small for the next example's rebuild
        with db.write() as conn:
            for table in (rollup_table, results, reports):
                conn.execute(sa.delete(table).where(table.c.workspace_id == workspace_id))


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=st.lists(
        st.one_of(
            one_report.map(lambda r: ("report", r)),
            st.tuples(
                st.integers(0, HOURS * 3600 * 4).map(lambda n: n / 4),
                st.sampled_from([5, 7.5, 10, 30]),
            ).map(lambda f: ("fold", f)),  # `_fold_inside_minute`
        ),
        min_size=1,
        max_size=30,
    ),
    start=offsets,
    end=offsets,
    bucket=buckets,
    device=st.sampled_from(DEVICES),
    source=st.sampled_from(SOURCES),
)
def test_every_read_is_exact_with_the_watermark_inside_minutes(
    db: Database,
    drawn: list[Any],
    start: int,
    end: int,
    bucket: float,
    device: str | None,
    source: str | None,
) -> None:
    """Folds in slices shorter than a minute leave the watermark inside a minute (the job
    with `chunk` below 60 s): every read still equals the raw read."""
    anchor = fresh_anchor(db)
    workspace = f"w{uuid.uuid4().hex[:12]}"
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    for kind, step in drawn:
        if kind == "report":
            millis, report_device, drawn_items = step
            _store_one(db, principal, anchor + millis / 1000, report_device, drawn_items)
        else:
            _fold_inside_minute(db, anchor, *step)
    workspace_id = db.ensure_workspace(workspace)
    low, high = sorted((start, end))
    span = TimeRange(anchor + low / 1000, anchor + high / 1000 + 0.001)
    wide = TimeRange(anchor - 60, anchor + HOURS * 3600 + 60)
    assert_every_read_equal(db, workspace_id, span, wide, bucket, device, source, [])
