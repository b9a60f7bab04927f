"""Read queries for drift and confidence trends (docs/alerts.md, docs/server.md).

The numbers come from the reports' statistics: a result with the `stats` extension stands for
`stats.count` predictions with sum `stats.sum` and histogram `stats.histogram`; one without
stands for its sampled confidence once (the same rule as `queries.histogram`). Mean is
sum / count; median and p10 are estimated from the summed histogram
(`drift.histogram_quantile`); best is the highest sampled confidence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server import drift, rollups
from mmagg.server.queries import TimeRange, iso
from mmagg.server.tables import results
from mmagg.window import HISTOGRAM_BUCKETS

# Below this many predictions in the recent window or in the baseline a drift score is not
# computed (null, level "unknown"): with ten buckets PSI's sampling noise is roughly
# 9 * (1/n_recent + 1/n_baseline), about 0.09 at 200 and 200.
MIN_DRIFT_COUNT = 100


@dataclass
class Stats:
    """Sums of one (model, class) over a period."""

    predictions: int = 0
    prediction_sum: float = 0.0
    best: float | None = None
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)

    @property
    def mean(self) -> float | None:
        return self.prediction_sum / self.predictions if self.predictions else None

    def quantile(self, q: float) -> float | None:
        return drift.histogram_quantile(self.histogram, q)


@dataclass(frozen=True)
class Filter:
    """Optional restrictions on the results read (all None: every result of the workspace)."""

    model_id: str | None = None
    class_name: str | None = None
    device_id: str | None = None
    source_id: str | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        where: list[sa.ColumnElement[bool]] = []
        if self.model_id is not None:
            where.append(results.c.model_id == self.model_id)
        if self.class_name is not None:
            where.append(results.c.class_name == self.class_name)
        if self.device_id is not None:
            where.append(results.c.device_id == self.device_id)
        if self.source_id is not None:
            where.append(results.c.source_id == self.source_id)
        return where

    def filters(self) -> rollups.Filters:
        """The same restrictions for `rollups.aggregate`."""
        return rollups.Filters(
            [] if self.model_id is None else [self.model_id],
            [] if self.class_name is None else [self.class_name],
            self.device_id,
            self.source_id,
        )


def _from_agg(agg: rollups.Agg) -> Stats:
    return Stats(agg.predictions, agg.prediction_sum, agg.conf_max, list(agg.hist))


def period_stats(
    conn: Connection, workspace_id: int, span: TimeRange, where: Filter = Filter()
) -> dict[tuple[str, str], Stats]:
    """Per (model_id, class_name): predictions, their sum, the best sample and the histogram.

    Served from rollups where exact (mmagg.server.rollups), raw rows elsewhere."""
    aggs = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("model_id", "class_name"),
        where.filters(),
        with_hist=True,
    )
    return {(key[0], key[1]): _from_agg(agg) for key, agg in aggs.items()}


def last_seen(
    conn: Connection, workspace_id: int, where: Filter = Filter(), per_class: bool = False
) -> dict[tuple[str, str | None], float]:
    """The newest result time per model (and class with `per_class`), over all time."""
    keys = [results.c.model_id, results.c.class_name] if per_class else [results.c.model_id]
    rows = conn.execute(
        sa.select(*keys, sa.func.max(results.c.ts))
        .where(results.c.workspace_id == workspace_id, *where.where())
        .group_by(*keys)
    )
    found: dict[tuple[str, str | None], float] = {}
    for row in rows:
        if per_class:
            found[(row[0], row[1])] = float(row[2])
        else:
            found[(row[0], None)] = float(row[1])
    return found


def class_trends(
    conn: Connection,
    workspace_id: int,
    model_id: str,
    span: TimeRange,
    bucket_seconds: float,
    where: Filter = Filter(),
) -> dict[str, Any]:
    """Per class and time bucket: mean, median, p10 and best confidence, predictions per minute."""
    aggs = rollups.aggregate(
        conn,
        workspace_id,
        span.start,
        span.end,
        ("class_name",),
        Filter(model_id, where.class_name, where.device_id, where.source_id).filters(),
        bucket_seconds=bucket_seconds,
        with_hist=True,
    )
    rows = [(key[0], key[1], agg) for key, agg in sorted(aggs.items())]
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    per_minute = 60.0 / bucket_seconds
    for row in rows:
        stats = _from_agg(row[2])
        start = float(row[1]) * bucket_seconds
        series[row[0]].append(
            {
                "t": start,
                "time": iso(start),
                "mean_confidence": stats.mean,
                "median_confidence": stats.quantile(0.5),
                "p10_confidence": stats.quantile(0.1),
                "best_confidence": None if stats.best is None else float(stats.best),
                "prediction_count": stats.predictions,
                "predictions_per_minute": stats.predictions * per_minute,
            }
        )
    return {
        "model_id": model_id,
        "bucket_seconds": bucket_seconds,
        "start_time": iso(span.start),
        "end_time": iso(span.end),
        "series": [{"class_name": name, "points": points} for name, points in series.items()],
    }


def _score(recent: Stats | None, base: Stats | None, min_count: int) -> dict[str, Any]:
    r = recent or Stats()
    b = base or Stats()
    enough = r.predictions >= min_count and b.predictions >= min_count
    score = drift.psi(r.histogram, b.histogram) if enough else None
    return {
        "psi": score,
        "js_distance": drift.js_distance(r.histogram, b.histogram) if enough else None,
        "level": drift.level(score),
        "recent_count": r.predictions,
        "baseline_count": b.predictions,
        "recent_median": r.quantile(0.5),
        "baseline_median": b.quantile(0.5),
        "recent_mean": r.mean,
        "baseline_mean": b.mean,
    }


def drift_report(
    conn: Connection,
    workspace_id: int,
    end: float,
    window: float,
    baseline: float,
    where: Filter = Filter(),
    min_count: int = MIN_DRIFT_COUNT,
) -> dict[str, Any]:
    """Drift of every model (and class) in [end - window, end) against the `baseline` before.

    Per class: PSI and Jensen-Shannon distance of the confidence histograms; per model: the
    class-mix PSI (each class's share of predictions). Scores with fewer than `min_count`
    predictions on either side are null.
    """
    recent_span = TimeRange(end - window, end)
    base_span = TimeRange(end - window - baseline, end - window)
    recent = period_stats(conn, workspace_id, recent_span, where)
    base = period_stats(conn, workspace_id, base_span, where)
    by_model: dict[str, set[str]] = defaultdict(set)
    for model_id, class_name in recent.keys() | base.keys():
        by_model[model_id].add(class_name)
    models = []
    for model_id in sorted(by_model):
        names = sorted(by_model[model_id])
        classes = [
            {
                "class_name": name,
                **_score(recent.get((model_id, name)), base.get((model_id, name)), min_count),
            }
            for name in names
        ]
        mix_recent = {
            n: recent[(model_id, n)].predictions for n in names if (model_id, n) in recent
        }
        mix_base = {n: base[(model_id, n)].predictions for n in names if (model_id, n) in base}
        enough = sum(mix_recent.values()) >= min_count and sum(mix_base.values()) >= min_count
        mix_score = drift.psi(*drift.class_mix(mix_recent, mix_base)) if enough else None
        scores = [c["psi"] for c in classes if c["psi"] is not None]
        worst = max(scores) if scores else None
        models.append(
            {
                "model_id": model_id,
                "max_psi": worst,
                "level": drift.level(worst),
                "class_mix": {"psi": mix_score, "level": drift.level(mix_score)},
                "classes": classes,
            }
        )
    return {
        "recent_start": iso(recent_span.start),
        "recent_end": iso(recent_span.end),
        "baseline_start": iso(base_span.start),
        "baseline_end": iso(base_span.end),
        "measure": "psi",
        "thresholds": {"moderate": drift.PSI_MODERATE, "significant": drift.PSI_SIGNIFICANT},
        "min_count": min_count,
        "models": models,
    }
