"""Read queries behind the read endpoint and the dashboard JSON API.

Each function takes a connection, the workspace id and already-validated parameters, and
returns a JSON-ready dict; the HTTP layer only authenticates and parses. docs/server.md
documents every shape returned here.

Counting rules (docs/server.md, "What the numbers mean"): a stored *result* is one sampled
prediction (the best of its class in a report window). A result that carries the `stats`
extension also stands for `stats.count` predictions; one without stands for itself only.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server import medians as median_digests
from mmagg.server import rollups
from mmagg.server.rollups import Filters
from mmagg.server.tables import reports, results
from mmagg.wire import HISTOGRAM_BUCKETS

MAX_SERIES_POINTS = 20_000
# Results read to estimate a model's reporting interval (a few hundred reports).
INTERVAL_RESULTS = 2_000


@dataclass(frozen=True)
class TimeRange:
    """A half-open interval [start, end) in epoch seconds."""

    start: float
    end: float

    def previous(self) -> TimeRange:
        """The period of equal length just before this one."""
        return TimeRange(self.start - (self.end - self.start), self.start)


def _ratio(total: Any, count: Any) -> float | None:
    """`total / count`, None for no count (a v0.1 database may hold `stats.count == 0`)."""
    return float(total) / int(count) if count else None


def iso(epoch: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC string."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def _in_range(workspace_id: int, span: TimeRange) -> list[sa.ColumnElement[bool]]:
    return [
        results.c.workspace_id == workspace_id,
        results.c.ts >= span.start,
        results.c.ts < span.end,
    ]


def confidence_bucket(confidence: float) -> int:
    """The histogram bucket of docs/wire-format.md: [i/10, (i+1)/10), 1.0 in the last."""
    return min(max(int(confidence * HISTOGRAM_BUCKETS), 0), HISTOGRAM_BUCKETS - 1)


def histogram_median(histogram: Sequence[int]) -> float | None:
    """Median estimated from 10 equal buckets over [0, 1], linear within the bucket."""
    total = sum(histogram)
    if total == 0:
        return None
    half = total / 2
    seen = 0
    width = 1 / len(histogram)
    for index, count in enumerate(histogram):
        if count and seen + count >= half:
            return (index + (half - seen) / count) * width
        seen += count
    return 1.0


@dataclass(frozen=True)
class _Group:
    results: int
    confidence_sum: float
    predictions: int
    prediction_sum: float
    median: float | None = None


def _groups(
    conn: Connection,
    workspace_id: int,
    span: TimeRange,
    model_names: Sequence[str],
    with_median: bool,
) -> dict[tuple[str, str], _Group]:
    """Per (model, class): counts and sums from rollups where exact (mmagg.server.rollups),
    the exact median from median digests where valid (mmagg.server.medians)."""
    aggs = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("model_id", "class_name"),
        Filters(model_ids=model_names),
    )
    medians: dict[tuple[str, str], float | None] = {}
    if with_median and aggs:
        # The rollups' counts check the digests (read in this snapshot, not read again);
        # counts read over raw rows only (rollups off) are not what the check assumes.
        totals = (
            {(key[0], key[1]): agg.results for key, agg in aggs.items()}
            if rollups.ENABLED
            else None
        )
        medians = median_digests.medians(
            conn, workspace_id, span.start, span.end, model_names, totals
        )
    return {
        (model_id, class_name): _Group(
            agg.results,
            agg.conf_sum,
            agg.predictions,
            agg.prediction_sum,
            medians.get((model_id, class_name)),
        )
        for (model_id, class_name), agg in aggs.items()
    }


def inference_stats(
    conn: Connection, workspace_id: int, span: TimeRange, model_names: Sequence[str] = ()
) -> dict[str, Any]:
    """Roboflow's `GET /{workspace}/inference-stats` shape, per model and class.

    `num_inferences`, `avg_confidence`, `median_confidence` are over the sampled results;
    `class_count` counts predictions (stats when present); `prev_*` are the same numbers for
    the period of equal length just before. Fields mmagg cannot know (errors, response
    times) are null. Every aggregate runs in the database, in one `GROUP BY` pass per period.
    """
    current = _groups(conn, workspace_id, span, model_names, with_median=True)
    previous = _groups(conn, workspace_id, span.previous(), model_names, with_median=False)
    items = []
    for model_id, class_name in sorted(current):
        group = current[(model_id, class_name)]
        prev = previous.get((model_id, class_name))
        items.append(
            {
                "model_name": model_id,
                "predicted_class": class_name,
                "num_inferences": group.results,
                "prev_num_inferences": prev.results if prev else 0,
                "num_errors": None,
                "prev_num_errors": None,
                "avg_confidence": group.confidence_sum / group.results,
                "prev_avg_confidence": prev.confidence_sum / prev.results if prev else None,
                "median_confidence": group.median,
                "avg_response_time": None,
                "prev_avg_response_time": None,
                "class_count": group.predictions,
                "predictions_avg_confidence": group.prediction_sum / group.predictions
                if group.predictions
                else None,
            }
        )

    def overall(groups: dict[tuple[str, str], _Group]) -> tuple[int, float | None]:
        count = sum(g.results for g in groups.values())
        total = sum(g.confidence_sum for g in groups.values())
        return count, (total / count if count else None)

    num, avg = overall(current)
    prev_num, prev_avg = overall(previous)
    return {
        "start_time": iso(span.start),
        "end_time": iso(span.end),
        "num_inferences": num,
        "prev_num_inferences": prev_num,
        "num_errors": 0,
        "prev_num_errors": 0,
        "avg_confidence": avg,
        "prev_avg_confidence": prev_avg,
        "avg_response_time": None,
        "prev_avg_response_time": None,
        "inference_stats": items,
    }


def _median_gap(times_by_device: dict[str | None, list[float]]) -> float | None:
    gaps: list[float] = []
    for times in times_by_device.values():
        times.sort()
        gaps.extend(b - a for a, b in zip(times, times[1:], strict=False) if b > a)
    return statistics.median(gaps) if gaps else None


def _reporting_interval(
    conn: Connection, where: list[sa.ColumnElement[bool]], model_id: str
) -> tuple[float | None, str | None]:
    """A model's reporting interval from its latest results, over all time.

    The `mmagg.frequency` of the newest report that declared one, else the median gap
    between consecutive reports of each device. Only the newest `INTERVAL_RESULTS` results
    are read (an index range scan from the end), whatever the age of the data.
    """
    # The limit sits in a subquery so that the join only ever sees the newest results: left
    # to itself, PostgreSQL may hash-join the whole reports table first.
    recent = (
        sa.select(results.c.id, results.c.report_id, results.c.device_id, results.c.ts)
        .where(*where, results.c.model_id == model_id)
        .order_by(results.c.ts.desc(), results.c.id.desc())
        .limit(INTERVAL_RESULTS)
        .subquery()
    )
    rows = conn.execute(
        sa.select(recent.c.report_id, recent.c.device_id, recent.c.ts, reports.c.frequency)
        .join(reports, reports.c.id == recent.c.report_id)
        .order_by(recent.c.ts.desc(), recent.c.id.desc())
    ).all()
    for row in rows:
        if row.frequency is not None:
            return float(row.frequency), "extension"
    seen: set[int] = set()
    by_device: dict[str | None, list[float]] = defaultdict(list)
    for row in rows:
        if row.report_id not in seen:
            seen.add(row.report_id)
            by_device[row.device_id].append(row.ts)
    gap = _median_gap(by_device)
    return (gap, "median_gap") if gap is not None else (None, None)


def _matching(device_id: str | None, source_id: str | None) -> list[sa.ColumnElement[bool]]:
    where = []
    if device_id is not None:
        where.append(results.c.device_id == device_id)
    if source_id is not None:
        where.append(results.c.source_id == source_id)
    return where


def _last_reports(
    conn: Connection, workspace_id: int, matching: list[sa.ColumnElement[bool]]
) -> dict[str, float]:
    """The time of the latest result matching `matching` of every model, over all time.

    A loose index scan on `(workspace_id, model_id, ts)`: a recursive query steps from one
    model id to the next (`MIN(model_id) > previous`, one index seek each) and reads each
    model's newest matching result walking the index backwards from its end. Unfiltered
    that is one seek per model, whatever the history; a plain `GROUP BY model_id` would read
    every result of the workspace. With a device / source filter the backward walk stops at
    the first match: quick for a device that reports, a scan of the model's results for a
    model the device never ran (no extra index: it would slow every ingest down).
    """
    workspace = results.c.workspace_id == workspace_id
    walk = (
        sa.select(sa.func.min(results.c.model_id).label("model_id"))
        .where(workspace)
        .cte("model_walk", recursive=True)
    )
    following = (
        sa.select(sa.func.min(results.c.model_id))
        .where(workspace, results.c.model_id > walk.c.model_id)
        .scalar_subquery()
    )
    walk = walk.union_all(sa.select(following).where(walk.c.model_id.is_not(None)))
    latest = (
        sa.select(results.c.ts)
        .where(workspace, results.c.model_id == walk.c.model_id, *matching)
        .order_by(results.c.ts.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = conn.execute(sa.select(walk.c.model_id, latest).where(walk.c.model_id.is_not(None)))
    return {model_id: float(ts) for model_id, ts in rows if ts is not None}


def models(
    conn: Connection,
    workspace_id: int,
    span: TimeRange,
    device_id: str | None = None,
    source_id: str | None = None,
) -> dict[str, Any]:
    """Every model that ever reported, with its activity in the range and its health inputs.

    Counts, devices and sources are over the range; `last_report_at_all_time` and the
    reporting interval are over all time, so a model that went silent before the range is
    still listed (with zero counts). `device_id` / `source_id` restrict every number,
    the all-time ones included, to the results of that device / video source.
    """
    matching = _matching(device_id, source_id)
    filters = Filters(device_id=device_id, source_id=source_id)
    per_model = rollups.aggregate(
        conn, workspace_id, span.start, span.end, ("model_id",), filters, with_reports=True
    )
    activity = {
        key[0]: (agg.last_ts, agg.reports, agg.results, agg.predictions, 0)
        for key, agg in per_model.items()
    }
    class_names: dict[str, set[str]] = defaultdict(set)
    found_devices: dict[str, set[str]] = defaultdict(set)
    found_sources: dict[str, set[str]] = defaultdict(set)
    for model_key, class_key, device_key, source_key in rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("model_id", "class_name", "device_id", "source_id"),
        filters,
    ):
        class_names[model_key].add(class_key)
        if device_key is not None:
            found_devices[model_key].add(device_key)
        if source_key is not None:
            found_sources[model_key].add(source_key)
    for model_key, values in activity.items():
        activity[model_key] = (*values[:4], len(class_names[model_key]))
    devices = {model: sorted(found) for model, found in found_devices.items()}
    sources = {model: sorted(found) for model, found in found_sources.items()}
    last_ever = _last_reports(conn, workspace_id, matching)
    items = []
    for model_id in sorted(last_ever.keys() | activity.keys()):
        last, report_count, result_count, predictions, class_count = activity.get(
            model_id, (None, 0, 0, 0, 0)
        )
        interval, interval_source = _reporting_interval(
            conn, [results.c.workspace_id == workspace_id, *matching], model_id
        )
        items.append(
            {
                "model_id": model_id,
                "last_report_at": iso(last),
                "last_report_at_all_time": iso(last_ever.get(model_id, last)),
                "report_count": int(report_count),
                "result_count": int(result_count),
                "prediction_count": int(predictions),
                "class_count": int(class_count),
                "devices": devices.get(model_id, []),
                "sources": sources.get(model_id, []),
                "estimated_interval_seconds": interval,
                "interval_source": interval_source,
            }
        )
    return {"start_time": iso(span.start), "end_time": iso(span.end), "models": items}


def classes(conn: Connection, workspace_id: int, model_id: str, span: TimeRange) -> dict[str, Any]:
    """The classes a model reported in the range, with sampled and prediction statistics."""
    aggs = rollups.aggregate(
        conn, workspace_id, span.start, span.end, ("class_name",), Filters(model_ids=[model_id])
    )
    items = [
        {
            "class_name": name,
            "result_count": agg.results,
            "avg_confidence": agg.conf_sum / agg.results,
            "max_confidence": agg.conf_max,
            "min_confidence": agg.conf_min,
            "prediction_count": agg.predictions,
            "predictions_avg_confidence": _ratio(agg.prediction_sum, agg.predictions),
            "last_seen_at": iso(agg.last_ts),
            "results_with_stats": agg.with_stats,
        }
        for (name,), agg in sorted(aggs.items())
    ]
    return {
        "model_id": model_id,
        "start_time": iso(span.start),
        "end_time": iso(span.end),
        "classes": items,
    }


def devices(
    conn: Connection, workspace_id: int, span: TimeRange, model_id: str | None = None
) -> dict[str, Any]:
    """Devices (and the video sources seen on each) that reported in the range.

    Served from rollups where exact (mmagg.server.rollups): report counts are the counters
    `device_reports` / `device_source_reports` (or, for one model, `model_reports` /
    `source_reports`), which count each report once per device and per source.
    """
    filters = Filters(model_ids=[] if model_id is None else [model_id])
    per_source = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("device_id", "source_id"),
        filters,
        with_reports=True,
    )
    sources_of: dict[str | None, list[int]] = defaultdict(list)
    for (device_id, _source_id), agg in per_source.items():
        sources_of[device_id].append(agg.reports)
    # A device seen with one source only: each of its reports has that source, so the
    # source's count is the device's. Only devices with several sources need a second pass.
    report_counts = {
        device_id: counts[0] for device_id, counts in sources_of.items() if len(counts) == 1
    }
    if len(report_counts) < len(sources_of):
        per_device = rollups.aggregate(
            conn, workspace_id, span.start, span.end, ("device_id",), filters, with_reports=True
        )
        report_counts = {key[0]: agg.reports for key, agg in per_device.items()}
    by_device: dict[str | None, dict[str, Any]] = {}
    for (device_id, source_id), agg in per_source.items():
        device = by_device.setdefault(
            device_id,
            {"device_id": device_id, "last_report_at": None, "result_count": 0, "sources": []},
        )
        device["result_count"] += agg.results
        if device["last_report_at"] is None or (agg.last_ts or 0.0) > device["_last"]:
            device["_last"] = agg.last_ts
            device["last_report_at"] = iso(agg.last_ts)
        device["sources"].append(
            {
                "source_id": source_id,
                "last_report_at": iso(agg.last_ts),
                "report_count": agg.reports,
                "result_count": agg.results,
            }
        )
    items = []
    for device_id in sorted(by_device, key=lambda d: (d is None, d or "")):
        device = by_device[device_id]
        device.pop("_last", None)
        device["report_count"] = report_counts.get(device_id, 0)
        device["sources"].sort(key=lambda s: (s["source_id"] is None, s["source_id"] or ""))
        items.append(device)
    return {"start_time": iso(span.start), "end_time": iso(span.end), "devices": items}


def _filters(
    model_id: str,
    class_names: Iterable[str],
    source_id: str | None,
    device_id: str | None,
) -> list[sa.ColumnElement[bool]]:
    where = [results.c.model_id == model_id]
    names = list(class_names)
    if names:
        where.append(results.c.class_name.in_(names))
    if source_id is not None:
        where.append(results.c.source_id == source_id)
    if device_id is not None:
        where.append(results.c.device_id == device_id)
    return where


def timeseries(
    conn: Connection,
    workspace_id: int,
    model_id: str,
    span: TimeRange,
    bucket_seconds: float,
    class_names: Sequence[str] = (),
    source_id: str | None = None,
    device_id: str | None = None,
) -> dict[str, Any]:
    """Per class, one point per `bucket_seconds` bucket that holds results.

    Raises ValueError when the range would produce more than `MAX_SERIES_POINTS` buckets.
    """
    if (span.end - span.start) / bucket_seconds > MAX_SERIES_POINTS:
        raise ValueError(
            f"bucket_seconds: expected at most {MAX_SERIES_POINTS} buckets in the range, got "
            f"{(span.end - span.start) / bucket_seconds:.0f}; use a wider bucket"
        )
    aggs = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("class_name",),
        Filters([model_id], list(class_names), device_id, source_id),
        bucket_seconds=bucket_seconds,
    )
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (name, index), agg in sorted(aggs.items()):
        start = float(index) * bucket_seconds
        series[name].append(
            {
                "t": start,
                "time": iso(start),
                "max_confidence": agg.conf_max,
                "avg_confidence": agg.conf_sum / agg.results,
                "min_confidence": agg.conf_min,
                "samples": agg.results,
                "results_with_stats": agg.with_stats,
                "prediction_count": agg.predictions,
                "predictions_avg_confidence": _ratio(agg.prediction_sum, agg.predictions),
            }
        )
    return {
        "model_id": model_id,
        "bucket_seconds": bucket_seconds,
        "start_time": iso(span.start),
        "end_time": iso(span.end),
        "series": [{"class_name": name, "points": points} for name, points in series.items()],
    }


def _floor(conn: Connection, value: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """floor() on both engines: SQLite's CAST truncates towards zero, wrong below 0 (before
    1970), so one is taken off a negative value that is not already whole."""
    if conn.dialect.name == "postgresql":
        return sa.func.floor(value)
    truncated = sa.cast(value, sa.Integer)
    return sa.case((value < truncated, truncated - 1), else_=truncated)


def histogram(
    conn: Connection,
    workspace_id: int,
    model_id: str,
    span: TimeRange,
    class_names: Sequence[str] = (),
    source_id: str | None = None,
    device_id: str | None = None,
) -> dict[str, Any]:
    """Per class, confidence counts in the 10 buckets of docs/wire-format.md.

    A result with `stats` contributes its whole `stats.histogram`; one without contributes
    its sampled confidence once.
    """
    aggs = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("class_name",),
        Filters([model_id], list(class_names), device_id, source_id),
        with_hist=True,
    )
    items = []
    for (name,), agg in sorted(aggs.items()):
        buckets = list(agg.hist)
        items.append(
            {
                "class_name": name,
                "counts": buckets,
                "total": sum(buckets),
                "median_estimate": histogram_median(buckets),
                "result_count": agg.results,
                "results_with_stats": agg.with_stats,
            }
        )
    return {
        "model_id": model_id,
        "start_time": iso(span.start),
        "end_time": iso(span.end),
        "bin_edges": [i / HISTOGRAM_BUCKETS for i in range(HISTOGRAM_BUCKETS + 1)],
        "classes": items,
    }


def samples(
    conn: Connection,
    workspace_id: int,
    span: TimeRange,
    limit: int,
    model_id: str | None = None,
    class_names: Sequence[str] = (),
    source_id: str | None = None,
    device_id: str | None = None,
) -> dict[str, Any]:
    """The latest sampled predictions, newest first."""
    where = _in_range(workspace_id, span)
    if model_id is not None:
        where.extend(_filters(model_id, class_names, source_id, device_id))
    else:
        if class_names:
            where.append(results.c.class_name.in_(list(class_names)))
        if source_id is not None:
            where.append(results.c.source_id == source_id)
        if device_id is not None:
            where.append(results.c.device_id == device_id)
    rows = conn.execute(
        sa.select(
            results.c.ts,
            results.c.model_id,
            results.c.class_name,
            results.c.confidence,
            results.c.inference_id,
            results.c.model_type,
            results.c.device_id,
            results.c.source_id,
            results.c.stats_count,
            results.c.report_id,
        )
        .where(*where)
        .order_by(results.c.ts.desc(), results.c.id.desc())
        .limit(limit)
    )
    found = []
    for row in rows:
        found.append(
            {
                "time": iso(row.ts),
                "t": row.ts,
                "model_id": row.model_id,
                "class_name": row.class_name,
                "confidence": row.confidence,
                "inference_id": row.inference_id,
                "model_type": row.model_type,
                "device_id": row.device_id,
                "source_id": row.source_id,
                "prediction_count": 1 if row.stats_count is None else int(row.stats_count),
                "report_id": int(row.report_id),
            }
        )
    return {"samples": found}
