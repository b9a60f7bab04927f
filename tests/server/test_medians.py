"""Median digests (issue 15): the exact median of `inference-stats` read from hour and day
digests equals the engine's median over the raw rows, exactly, on SQLite and PostgreSQL,
whatever the digests' state (never built, built, stale after late reports, partly pruned).

The reference is `medians.raw_medians`: the engine's own aggregate over `results`
(`percentile_cont(0.5)` on PostgreSQL, `mmagg_median` on SQLite), the read as it was before
digests existed.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_payloads import report, result
from server_support import scratch_pg_database, start_server

from mmagg.server import Database, create_app, medians, queries, rollups
from mmagg.server.bounds import Placement
from mmagg.server.lease import Lease
from mmagg.server.queries import TimeRange
from mmagg.server.schemas import REPORT_ADAPTER
from mmagg.server.tables import median_digests, results

MODELS = ("yard/1", "dock/2")
CLASSES = ("car", "person")
DAYS = 3
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def _anchor() -> float:
    """A UTC midnight four days back: every stored hour ended long before now."""
    return math.floor(time.time() / 86400) * 86400 - (DAYS + 1) * 86400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A database of this module's own: its prunes touch nobody else's rows."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path_factory.mktemp('medians') / 'm.db'}")
        yield database
        database.close()
        return
    request.getfixturevalue("pg_database_url")  # skips when PostgreSQL is not reachable
    with scratch_pg_database("mmagg_medians_") as url:
        database = Database(url)
        yield database
        database.close()


# Confidences with ties, 0.0, 1.0 and values on and beside band edges (width 0.001).
confidences = st.one_of(
    st.integers(0, 1000).map(lambda n: n / 1000),
    st.sampled_from([0.0, 1.0, 0.001, 0.000999, 0.5, 0.4999999, 0.5000001, 0.999, 0.9999999]),
    st.floats(0.0, 1.0, allow_nan=False),
)
items = st.lists(
    st.tuples(st.sampled_from(MODELS), st.sampled_from(CLASSES), confidences),
    min_size=1,
    max_size=4,
)
moments = st.one_of(
    st.integers(0, DAYS * DAY_MS - 1),
    st.integers(0, DAYS * 24).map(lambda h: h * HOUR_MS),
    st.integers(1, DAYS * 24).map(lambda h: h * HOUR_MS - 1),
)
reports_strategy = st.lists(st.tuples(moments, st.integers(0, 1), items), min_size=1, max_size=30)
offsets = st.one_of(
    st.integers(-HOUR_MS, DAYS * DAY_MS + HOUR_MS),
    st.integers(0, DAYS * 24).map(lambda h: h * HOUR_MS),
    st.integers(0, DAYS).map(lambda d: d * DAY_MS),
)


def _store(db: Database, workspaces: list[str], anchor: float, drawn: list[Any]) -> None:
    principals = [db.authenticate(db.create_key(name)) for name in workspaces]
    for millis, which, drawn_items in drawn:
        principal = principals[which]
        assert principal is not None
        ts = anchor + millis / 1000
        when = datetime.fromtimestamp(ts, timezone.utc)
        body = report([result(c, conf, m) for m, c, conf in drawn_items], timestamp=when)
        placement = Placement(ts, time.time(), when.isoformat(), "client")
        db.store_report(principal, REPORT_ADAPTER.validate_python(body), None, placement)


def _python_median(values: list[float], dialect: str) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    low, high = ordered[middle - 1], ordered[middle]
    return low + (high - low) * 0.5 if dialect == "postgresql" else (low + high) / 2


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=reports_strategy,
    late=st.lists(st.tuples(moments, st.integers(0, 1), items), max_size=6),
    state=st.sampled_from(["never", "built", "late", "pruned", "pruned then built"]),
    bound=st.integers(0, DAYS * DAY_MS),
    ranges=st.lists(st.tuples(offsets, offsets), min_size=1, max_size=4),
    models=st.sampled_from([(), (MODELS[0],), MODELS]),
)
def test_the_median_from_digests_equals_the_raw_median(
    db: Database,
    drawn: list[Any],
    late: list[Any],
    state: str,
    bound: int,
    ranges: list[tuple[int, int]],
    models: tuple[str, ...],
) -> None:
    anchor = _anchor()
    names = [f"w{uuid.uuid4().hex[:12]}" for _ in range(2)]
    _store(db, names, anchor, drawn)
    ids = [db.ensure_workspace(name) for name in names]
    now = time.time()
    if state != "never":
        while db.build_median_digests(now).more:
            pass
    if state == "late":
        _store(db, names, anchor, late)
    if state.startswith("pruned"):
        db.prune(anchor + bound / 1000)
    if state == "pruned then built":
        _store(db, names, anchor, [row for row in late if row[0] >= bound])
        while db.build_median_digests(now, keep_after=anchor + bound / 1000).more:
            pass
    with db.read() as conn:
        spans = [
            TimeRange(anchor + min(a, b) / 1000, anchor + max(a, b) / 1000 + 0.001)
            for a, b in ranges
        ] + [TimeRange(anchor - 1, anchor + DAYS * 86400 + 1)]
        for span in spans:
            for workspace_id in ids:
                got = medians.medians(conn, workspace_id, span.start, span.end, models)
                raw = medians.raw_medians(conn, workspace_id, span.start, span.end, models)
                assert got == raw, (state, span, models)
                # Digests checked per group against the rollups' totals (inference-stats'
                # path): the same medians for every group the rollups count.
                totals = _rollup_totals(conn, workspace_id, span, models)
                by_totals = medians.medians(
                    conn, workspace_id, span.start, span.end, models, totals
                )
                assert by_totals == {group: raw.get(group) for group in totals}, (
                    state,
                    span,
                    models,
                )
                # The same answer through the endpoint's query, digests on and off.
                served = queries.inference_stats(conn, workspace_id, span, models)
                medians.ENABLED = False
                try:
                    plain = queries.inference_stats(conn, workspace_id, span, models)
                finally:
                    medians.ENABLED = True
                assert [i["median_confidence"] for i in served["inference_stats"]] == [
                    i["median_confidence"] for i in plain["inference_stats"]
                ]


def _rollup_totals(
    conn: Any, workspace_id: int, span: TimeRange, models: tuple[str, ...]
) -> dict[tuple[str, str], int]:
    """Results per (model, class) in `span` as the rollups count them (inference-stats)."""
    found = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("model_id", "class_name"),
        rollups.Filters(model_ids=models),
    )
    return {(model_id, class_name): agg.results for (model_id, class_name), agg in found.items()}


def test_reads_really_use_digests_and_tenants_never_mix(db: Database) -> None:
    """Deleting raw rows behind the digests' back (not through retention) leaves the digest
    answer in place: whole hours and days are read from digests. The two workspaces hold
    the same model and class with different values; each gets its own median."""
    anchor = _anchor()
    names = [f"w{uuid.uuid4().hex[:12]}" for _ in range(2)]
    values = {0: [0.25, 0.5, 0.5, 0.75, 0.1234567], 1: [0.9, 0.91, 0.92, 0.93]}
    drawn = [
        (hour * HOUR_MS + 5000 * i, which, [(MODELS[0], CLASSES[0], value)])
        for which, found in values.items()
        for hour in (0, 1, 30)
        for i, value in enumerate(found)
    ]
    _store(db, names, anchor, drawn)
    ids = [db.ensure_workspace(name) for name in names]
    built = db.build_median_digests(time.time())
    assert built.hours >= 6 and built.days >= 2
    span = TimeRange(anchor, anchor + 2 * 86400)
    dialect = db.dialect
    for which, workspace_id in enumerate(ids):
        expected = _python_median(values[which] * 3, dialect)
        with db.read() as conn:
            assert medians.medians(conn, workspace_id, span.start, span.end) == {
                (MODELS[0], CLASSES[0]): expected
            }
    with db.write() as conn:
        conn.execute(
            sa.delete(results).where(results.c.workspace_id == ids[0], results.c.ts < anchor + 7200)
        )
    with db.read() as conn:
        got = medians.medians(conn, ids[0], span.start, span.end)
        raw = medians.raw_medians(conn, ids[0], span.start, span.end)
        by_totals = medians.medians(
            conn, ids[0], span.start, span.end, (), _rollup_totals(conn, ids[0], span, ())
        )
    assert got == by_totals == {(MODELS[0], CLASSES[0]): _python_median(values[0] * 3, dialect)}
    assert raw == {(MODELS[0], CLASSES[0]): _python_median(values[0], dialect)}


def test_the_engine_bins_every_value_as_bands_of_does(db: Database) -> None:
    """Raw rows binned in SQL (`band_column`) land in the band `bands_of` gives the digests:
    every thousandth (as k / 1000 and as k * 0.001, which differ for some k), the floats just
    below and above each, 0, 1 and random values."""
    rng = np.random.default_rng(15)
    edges = [k / 1000 for k in range(1001)] + [k * 0.001 for k in range(1001)]
    values = sorted(
        {
            *edges,
            *(math.nextafter(edge, 2.0) for edge in edges if edge < 1.0),
            *(math.nextafter(edge, -1.0) for edge in edges if edge > 0.0),
            *rng.random(500).tolist(),
        }
    )
    name = f"w{uuid.uuid4().hex[:12]}"
    anchor = _anchor()
    drawn = [
        (i * 1000, 0, [(MODELS[0], CLASSES[0], value) for value in values[i : i + 1000]])
        for i in range(0, len(values), 1000)
    ]
    _store(db, [name], anchor, drawn)
    workspace_id = db.ensure_workspace(name)
    with db.read() as conn:
        rows = conn.execute(
            sa.select(results.c.confidence, medians.band_column(conn)).where(
                results.c.workspace_id == workspace_id
            )
        ).all()
    assert len(rows) == len(values)
    stored = np.array([confidence for confidence, _band in rows])
    assert sorted(stored.tolist()) == values
    expected = medians.bands_of(stored).tolist()
    assert [int(band) for _confidence, band in rows] == expected


def test_a_late_report_is_counted_before_and_after_the_rebuild(db: Database) -> None:
    anchor = _anchor()
    name = f"w{uuid.uuid4().hex[:12]}"
    _store(db, [name], anchor, [(1000 * i, 0, [(MODELS[1], CLASSES[1], 0.2)]) for i in range(5)])
    workspace_id = db.ensure_workspace(name)
    db.build_median_digests(time.time())
    span = TimeRange(anchor, anchor + 86400)
    # Four late values above: the median moves from 0.2 to the mean of 0.2 and 0.9.
    _store(db, [name], anchor, [(9000 + i, 0, [(MODELS[1], CLASSES[1], 0.9)]) for i in range(4)])
    expected = _python_median([0.2] * 5 + [0.9] * 4, db.dialect)
    with db.read() as conn:
        assert medians.medians(conn, workspace_id, span.start, span.end) == {
            (MODELS[1], CLASSES[1]): expected
        }
    rebuilt = db.build_median_digests(time.time())
    assert rebuilt.hours >= 1 and rebuilt.days >= 1
    with db.read() as conn:
        assert medians.medians(conn, workspace_id, span.start, span.end) == {
            (MODELS[1], CLASSES[1]): expected
        }


def test_retention_deletes_the_digests_before_the_bound(db: Database) -> None:
    anchor = _anchor()
    name = f"w{uuid.uuid4().hex[:12]}"
    drawn = [(h * HOUR_MS + 10, 0, [(MODELS[0], CLASSES[1], h / 100)]) for h in range(0, 60, 3)]
    _store(db, [name], anchor, drawn)
    workspace_id = db.ensure_workspace(name)
    db.build_median_digests(time.time())
    bound = anchor + 86400 + 1800  # inside an hour: that hour goes to raw rows
    db.prune(bound)
    with db.read() as conn:
        oldest = conn.execute(sa.select(sa.func.min(median_digests.c.bucket))).scalar()
        got = medians.medians(conn, workspace_id, anchor, anchor + 3 * 86400)
        raw = medians.raw_medians(conn, workspace_id, anchor, anchor + 3 * 86400)
    assert oldest is None or oldest >= bound
    assert (
        got
        == raw
        == {
            (MODELS[0], CLASSES[1]): _python_median([h / 100 for h in range(27, 60, 3)], db.dialect)
        }
    )


def test_bands_put_every_value_in_its_own_thousandth() -> None:
    edges = np.array([-1.0, 0.0, 0.0009999, 0.001, 0.0019999, 0.5, 0.999, 0.9999999, 1.0, 2.0])
    assert medians.bands_of(edges).tolist() == [0, 0, 0, 1, 1, 500, 999, 999, 999, 999]
    counts = medians.band_counts(edges)
    assert counts.sum() == len(edges) and counts[999] == 4
    assert (medians.decode_counts(medians.encode_counts(counts)) == counts).all()


def _http_stats(base_url: str, key: str, name: str, start: float, end: float) -> Any:
    response = httpx.get(
        f"{base_url}/{name}/inference-stats",
        params={
            "startTime": datetime.fromtimestamp(start, timezone.utc).isoformat(),
            "endTime": datetime.fromtimestamp(end, timezone.utc).isoformat(),
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return [
        (i["model_name"], i["predicted_class"], i["median_confidence"])
        for i in response.json()["inference_stats"]
    ]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_over_http_the_job_builds_under_its_lease_and_answers_stay_exact(
    engine: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """`mmagg serve`'s app over real HTTP: the endpoint answers the same before the job ran,
    after it built the digests (under the "median-digests" lease, which a second holder
    cannot take meanwhile), after a late report and after retention."""
    if engine == "sqlite":
        _http_case(f"sqlite:///{tmp_path / 'http.db'}")
        return
    request.getfixturevalue("pg_database_url")  # skips when PostgreSQL is not reachable
    with scratch_pg_database("mmagg_medians_http_") as url:
        _http_case(url)


def _http_case(url: str) -> None:
    db = Database(url)
    anchor = _anchor()
    name = f"w{uuid.uuid4().hex[:12]}"
    drawn = [
        (h * HOUR_MS + 61_000 * i, 0, [(MODELS[i % 2], CLASSES[i % 2], ((h * 7 + i) % 13) / 13)])
        for h in range(0, DAYS * 24, 5)
        for i in range(3)
    ]
    _store(db, [name], anchor, drawn)
    key = db.create_key(name, "read")
    start, end = anchor + 1234.5, anchor + DAYS * 86400 - 99.0
    with db.read() as conn:
        workspace_id = db.ensure_workspace(name)
        raw = medians.raw_medians(conn, workspace_id, start, end)
    assert raw
    running = start_server(create_app(db=db, median_digest_interval=0.2))
    try:
        before = _http_stats(running.base_url, key, name, start, end)
        assert sorted((m, c, v) for (m, c), v in raw.items()) == before
        deadline = time.time() + 60
        while time.time() < deadline:
            with db.read() as conn:
                days = conn.execute(
                    sa.select(sa.func.count()).where(
                        median_digests.c.workspace_id == workspace_id,
                        median_digests.c.level == medians.DAY,
                    )
                ).scalar()
            if days:
                break
            time.sleep(0.2)
        assert days, "the job built no day digest within a minute"
        # The job's process holds the lease: another holder is refused meanwhile.
        assert not Lease(db, "median-digests", ttl=60.0).acquire(time.time())
        assert _http_stats(running.base_url, key, name, start, end) == before
        _store(db, [name], anchor, [(DAY_MS + 77, 0, [(MODELS[0], CLASSES[0], 0.999)])])
        with db.read() as conn:
            after_late = medians.raw_medians(conn, workspace_id, start, end)
        assert _http_stats(running.base_url, key, name, start, end) == sorted(
            (m, c, v) for (m, c), v in after_late.items()
        )
        db.prune(anchor + 86400 + 3 * 3600 + 1)
        with db.read() as conn:
            after_prune = medians.raw_medians(conn, workspace_id, start, end)
        assert _http_stats(running.base_url, key, name, start, end) == sorted(
            (m, c, v) for (m, c), v in after_prune.items()
        )
        metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
        assert 'mmagg_median_digests_built_total{level="day"}' in metrics
    finally:
        running.stop()
        db.close()


def test_two_middle_values_in_different_bands_and_empty_ranges(db: Database) -> None:
    """An even count whose middle values straddle a band edge picks one from each band; a
    range with no results (or none of the model asked for) has no median at all."""
    anchor = _anchor()
    name = f"w{uuid.uuid4().hex[:12]}"
    values = [0.05, 0.0999999, 0.1, 0.95]  # middle: 0.0999999 (band 99) and 0.1 (band 100)
    drawn = [
        (h * DAY_MS + 5, 0, [(MODELS[0], CLASSES[0], value)]) for h, value in enumerate(values[:3])
    ]
    drawn.append((2 * HOUR_MS + 1, 0, [(MODELS[0], CLASSES[0], values[3])]))
    _store(db, [name], anchor, drawn)
    workspace_id = db.ensure_workspace(name)
    db.build_median_digests(time.time())
    low, high = 0.0999999, 0.1
    expected = low + (high - low) * 0.5 if db.dialect == "postgresql" else (low + high) / 2
    with db.read() as conn:
        whole = medians.medians(conn, workspace_id, anchor, anchor + DAYS * 86400)
        assert whole == {(MODELS[0], CLASSES[0]): expected}
        assert medians.medians(conn, workspace_id, anchor + 3600 * 5, anchor + 3600 * 20) == {}
        assert medians.medians(conn, workspace_id, anchor, anchor + DAYS * 86400, ["none/1"]) == {}
