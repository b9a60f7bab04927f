"""Rollups kept longer than raw rows (retention per level, `mmagg.server.retention`).

A read whose range reaches before the raw bound is answered from the rollups still kept:
it counts a result iff the piece of the read's plan holding it still has its data. The plan
cuts the range into the coarsest whole buckets that fit it (day, 6 h, hour, 5 min, minute;
a bucketed read only the levels dividing its bucket) and raw edges; a rollup piece is kept
while its level's retention keeps the bucket (it ends after the level's bound), a raw edge
at or after the raw bound. `_covered` below says the same from the bucket arithmetic alone
(no code of mmagg), and the reference is a second database holding only the covered
reports, read over raw rows. Real SQLite files and real PostgreSQL; times relative to a
midnight some days back, so the tests hold on any date.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_payloads import report, result
from server_payloads import stats as payload_stats
from server_support import scratch_pg_database, start_server

from mmagg.server import Database, create_app, queries, rollups
from mmagg.server.bounds import Placement
from mmagg.server.db import Principal
from mmagg.server.queries import TimeRange
from mmagg.server.retention import Bounds, Retention, RetentionError
from mmagg.server.schemas import REPORT_ADAPTER

DAY = 86_400.0
SPAN_DAYS = 4
MODELS = ("yard/1", "dock/2")
CLASSES = ("car", "person")
DEVICES = ("edge-a", "edge-b")
LEVELS = (86400, 21600, 3600, 300, 60)


def _base() -> float:
    """Midnight UTC six days ago: the data spans the four days after it."""
    return (math.floor(time.time() / DAY) - 6) * DAY


@contextmanager
def _database(engine: str) -> Iterator[Database]:
    """A fresh database of `engine` (a SQLite file, or a PostgreSQL database of its own: a
    prune drops partitions database-wide), closed and removed after."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            db = Database(f"sqlite:///{Path(folder) / 'levels.db'}")
            try:
                yield db
            finally:
                db.close()
    else:
        with scratch_pg_database("mmagg_levels_") as url:
            db = Database(url)
            try:
                yield db
            finally:
                db.close()


def _principal(db: Database) -> Principal:
    principal = db.authenticate(db.create_key("acme"))
    assert principal is not None
    return principal


Drawn = tuple[int, int, list[tuple[int, int, float, bool]]]


def _store(db: Database, principal: Principal, base: float, drawn: list[Drawn]) -> None:
    for millis, device, items in drawn:
        ts = base + millis / 1000
        body_items = []
        for model, class_index, confidence, with_stats in items:
            extra: dict[str, Any] = {}
            if with_stats:
                extra["stats"] = payload_stats([confidence / 2, confidence * 0.8, confidence])
            body_items.append(result(CLASSES[class_index], confidence, MODELS[model], **extra))
        when = datetime.fromtimestamp(ts, timezone.utc)
        body = report(body_items, timestamp=when, device_id=DEVICES[device])
        placement = Placement(ts, time.time(), when.isoformat(), "client")
        db.store_report(principal, REPORT_ADAPTER.validate_python(body), None, placement)


def _covered(t: float, start: float, end: float, bucket: float | None, bounds: Bounds) -> bool:
    """Whether a read of [start, end) (time buckets of `bucket` s, or None) still counts a
    result at `t`: the coarsest usable level whose bucket holding `t` lies inside the range
    decides (kept while that bucket ends after the level's bound); no such level: the raw
    row (kept from the raw bound on)."""
    if not start <= t < end:
        return False
    for level in LEVELS:
        if bucket is not None and (bucket % level or bucket < level):
            continue
        low = math.floor(t / level) * level
        if low >= start and low + level <= end:
            return low + level > bounds.levels[level]
    return t >= bounds.raw


def _same(got: Any, expected: Any, where: str = "") -> None:
    """Equal, floats (sums in another order) to 1e-12 relative."""
    if isinstance(expected, float) and isinstance(got, float):
        assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12), (where, got, expected)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got, expected)
        for key in expected:
            _same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            _same(a, b, f"{where}[{index}]")
    else:
        assert got == expected, (where, got, expected)


def _without_medians(stats: dict[str, Any]) -> dict[str, Any]:
    """`inference-stats` without `median_confidence` (digests: not part of this claim)."""
    return {
        **stats,
        "inference_stats": [
            {**item, "median_confidence": None} for item in stats["inference_stats"]
        ],
    }


def _reads(db: Database, span: TimeRange, bucket: float | None, raw: bool) -> dict[str, Any]:
    workspace_id = db.ensure_workspace("acme")
    rollups.ENABLED = not raw
    try:
        with db.read() as conn:
            if bucket is None:
                return {
                    "inference-stats": _without_medians(
                        queries.inference_stats(conn, workspace_id, span)
                    ),
                    "classes": queries.classes(conn, workspace_id, MODELS[0], span),
                    "devices": queries.devices(conn, workspace_id, span),
                    "histogram": queries.histogram(conn, workspace_id, MODELS[1], span),
                }
            return {
                "timeseries": queries.timeseries(conn, workspace_id, MODELS[0], span, bucket),
                "timeseries device": queries.timeseries(
                    conn, workspace_id, MODELS[1], span, bucket, device_id=DEVICES[0]
                ),
            }
    finally:
        rollups.ENABLED = True


reports_drawn = st.lists(
    st.tuples(
        st.integers(0, SPAN_DAYS * 86_400_000 - 1),
        st.integers(0, len(DEVICES) - 1),
        st.lists(
            st.tuples(
                st.integers(0, len(MODELS) - 1),
                st.integers(0, len(CLASSES) - 1),
                st.floats(0.01, 0.99),
                st.booleans(),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    min_size=1,
    max_size=30,
)
# Seconds: whole days, hours, minutes and ragged values, so that bounds and ranges fall on
# and off every level's edges.
offsets = st.one_of(
    st.integers(0, SPAN_DAYS).map(lambda d: d * 86_400),
    st.integers(0, SPAN_DAYS * 24).map(lambda h: h * 3_600),
    st.integers(0, SPAN_DAYS * 1_440).map(lambda m: m * 60),
    st.integers(0, SPAN_DAYS * 86_400),
)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=reports_drawn,
    raw=offsets,
    longer=st.tuples(offsets, offsets, offsets),
    edges=st.tuples(offsets, offsets),
    bucket=st.sampled_from([None, None, 60, 300, 3600, 7200, 21600, 86400]),
)
def test_reads_before_the_raw_bound_count_what_the_kept_rollups_hold(
    engine: str,
    pg_database_url: str,
    drawn: list[Drawn],
    raw: int,
    longer: tuple[int, int, int],
    edges: tuple[int, int],
    bucket: float | None,
) -> None:
    """Random reports over four days; raw rows pruned at a random bound, minute, hour and
    day rollups each at a random earlier (or the same) bound; a random read range (before,
    across or after the raw bound) and bucket. Every read equals the raw read of a second
    database holding only the reports `_covered` says the plan still holds."""
    base = _base()
    minute = raw - longer[0] % (raw + 1)
    hour = minute - longer[1] % (minute + 1)
    day = hour - longer[2] % (hour + 1)
    levels = {60: minute, 300: minute, 3600: hour, 21600: hour, 86400: day}
    bounds = Bounds(base + raw, {k: base + v for k, v in levels.items()}, {})
    start, end = sorted(base + e for e in edges)
    if start == end:
        end += 3600
    span = TimeRange(start, end)
    previous = span.previous()

    def kept(millis: int) -> bool:
        t = base + millis / 1000
        return _covered(t, span.start, span.end, bucket, bounds) or (
            bucket is None and _covered(t, previous.start, previous.end, None, bounds)
        )

    with _database(engine) as pruned, _database("sqlite") as reference:
        _store(pruned, _principal(pruned), base, drawn)
        _store(reference, _principal(reference), base, [d for d in drawn if kept(d[0])])
        pruned.prune(before=bounds.raw, rollups_before=bounds.levels)
        _same(_reads(pruned, span, bucket, raw=False), _reads(reference, span, bucket, raw=True))


def test_levels_kept_shorter_than_finer_data_are_refused(tmp_path: Path) -> None:
    """Bad settings name the option, the expected and the given value; a prune given bounds
    out of order refuses too, before deleting anything."""
    with pytest.raises(RetentionError, match=r"--keep-hour-rollups: expected at least"):
        Retention(7, minute_days=30, hour_days=10)
    with pytest.raises(RetentionError, match=r"--keep-minute-rollups: .* got 2"):
        Retention(7, minute_days=2)
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(ValueError, match=r"rollups_before\[3600\]: expected at most"):
            db.prune(before=1000.0, rollups_before={60: 900.0, 3600: 950.0})
        with pytest.raises(ValueError, match=r"rollups_before\[60\]: expected at most"):
            db.prune(before=1000.0, rollups_before={60: 1100.0})
    finally:
        db.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_serve_keeps_hour_rollups_and_reads_old_whole_hours_over_http(
    engine: str, pg_database_url: str
) -> None:
    """The app with `--retention-days 2 --keep-hour-rollups 30 --keep-day-rollups 30`: its
    retention pass at start-up drops raw rows and minute rollups of five days ago but keeps
    their hours. Over HTTP a range of whole hours back then counts every result; a range
    with ragged edges counts its whole hours only; the latest samples there are gone."""
    base = (math.floor(time.time() / 3600) - 5 * 24) * 3600.0
    with _database(engine) as db:
        key = db.create_key("acme", "ingest,read")
        principal = db.authenticate(key)
        assert principal is not None
        # One report every 7 minutes for 3 hours, two results each.
        minutes = list(range(3, 180, 7))
        drawn = [
            (m * 60_000, 0, [(0, 0, 0.25 + (m % 5) / 10, False), (0, 1, 0.5, m % 2 == 0)])
            for m in minutes
        ]
        _store(db, principal, base, drawn)
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM results").scalar() == 2 * len(minutes)
        running = start_server(
            create_app(
                db=db,
                retention_days=2,
                keep_hour_rollups=30,
                keep_day_rollups=30,
                median_digest_interval=None,
                rollup_interval=None,
            )
        )
        try:
            with httpx.Client(base_url=running.base_url, timeout=30) as http:
                deadline = time.monotonic() + 30
                while "mmagg_retention_runs_total 1.0" not in http.get("/metrics").text:
                    assert time.monotonic() < deadline, "the retention pass did not run"
                    time.sleep(0.2)

                def stats(start: float, end: float) -> dict[str, Any]:
                    got = http.get(
                        "/acme/inference-stats",
                        params={
                            "api_key": key,
                            "startTime": datetime.fromtimestamp(start, timezone.utc).isoformat(),
                            "endTime": datetime.fromtimestamp(end, timezone.utc).isoformat(),
                        },
                    )
                    assert got.status_code == 200, got.text
                    return dict(got.json())

                whole = stats(base, base + 3 * 3600)
                assert whole["num_inferences"] == 2 * len(minutes)
                ragged = stats(base + 1800, base + 3 * 3600 - 60)  # holds hour 2 whole only
                expected = sum(2 for m in minutes if 60 <= m < 120)
                assert ragged["num_inferences"] == expected
                car = [i for i in whole["inference_stats"] if i["predicted_class"] == "car"]
                assert car[0]["avg_confidence"] == pytest.approx(
                    sum(0.25 + (m % 5) / 10 for m in minutes) / len(minutes), rel=1e-12
                )
                samples = http.get(
                    "/acme/api/samples",
                    params={
                        "api_key": key,
                        "startTime": datetime.fromtimestamp(base, timezone.utc).isoformat(),
                        "endTime": datetime.fromtimestamp(
                            base + 3 * 3600, timezone.utc
                        ).isoformat(),
                    },
                )
                assert samples.status_code == 200, samples.text
                assert samples.json()["samples"] == []
        finally:
            running.stop()
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM results").scalar() == 0
            levels = {
                int(level)
                for (level,) in conn.exec_driver_sql("SELECT DISTINCT level FROM rollups").all()
            }
        assert levels == {3600, 21600, 86400}


def test_the_covered_rule_on_worked_cases() -> None:
    """`_covered`, the reference of the property test, on cases worked by hand."""
    bounds = Bounds(
        10_000.0, {60: 7_200.0, 300: 7_200.0, 3600: 3_600.0, 21600: 0.0, 86400: 0.0}, {}
    )
    # A whole hour [3600, 7200) kept at the hour level (ends after 3600).
    assert _covered(3_700.0, 3_600.0, 7_200.0, None, bounds)
    # Its minutes are gone (end by 7200) and raw rows too (before 10000): a ragged range
    # inside that hour counts nothing.
    assert not _covered(3_700.0, 3_660.0, 7_200.0, None, bounds)
    # A ragged range after the minute bound: minute rows kept.
    assert _covered(7_230.0, 7_200.0, 7_290.0, None, bounds)
    # Raw edges from the raw bound on.
    assert _covered(10_000.5, 10_000.2, 10_001.0, None, bounds)
    assert not _covered(9_999.5, 9_999.2, 10_001.0, None, bounds)
    # A bucketed read of 3600 s cannot use the 6-hour or day rows: hour rows serve it.
    assert _covered(3_700.0, 0.0, 86_400.0, 3_600, bounds)


def test_prune_command_keeps_hour_rollups_and_refuses_bad_settings(tmp_path: Path) -> None:
    """`mmagg prune --older-than 2 --keep-hour-rollups 30`: the reports of five days ago go,
    their hour, 6-hour and day rollups stay (the day level follows the hour one), the minute
    ones go. A setting shorter than what it follows, or a `--keep-…` on `serve` without
    `--retention-days`, exits 2 naming the option and deletes nothing."""
    from typer.testing import CliRunner

    from mmagg.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    base = (math.floor(time.time() / 3600) - 5 * 24) * 3600.0
    db = Database(url)
    try:
        _store(db, _principal(db), base, [(m * 60_000, 0, [(0, 0, 0.5, False)]) for m in (5, 70)])
    finally:
        db.close()
    refused = CliRunner().invoke(
        app, ["prune", "--older-than", "2", "--keep-hour-rollups", "1", "--database-url", url]
    )
    assert refused.exit_code == 2
    assert "--keep-hour-rollups: expected at least the raw retention (2 days), got 1" in (
        refused.output
    )
    alone = CliRunner().invoke(app, ["serve", "--keep-day-rollups", "3", "--database-url", url])
    assert alone.exit_code == 2 and "--keep-day-rollups: expected together with" in alone.output
    done = CliRunner().invoke(
        app, ["prune", "--older-than", "2", "--keep-hour-rollups", "30", "--database-url", url]
    )
    assert done.exit_code == 0, done.output
    assert "Deleted 2 reports" in done.output
    db = Database(url)
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM reports").scalar() == 0
            rows = conn.exec_driver_sql(
                "SELECT level, SUM(results) FROM rollups GROUP BY level ORDER BY level"
            ).all()
        assert [tuple(row) for row in rows] == [(3600, 2), (21600, 2), (86400, 2)]
    finally:
        db.close()
