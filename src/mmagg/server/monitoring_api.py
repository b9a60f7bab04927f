"""Read endpoints for drift, confidence trends and alerts, mounted like `api.build_api_router`.

- `GET .../api/trends?model=M`: per class and time bucket, mean / median / p10 / best
  confidence and predictions per minute (`trends.class_trends`).
- `GET .../api/drift?window=300&baseline=3600[&model=M]`: PSI and Jensen-Shannon distance per
  class and the class-mix PSI per model, the recent window against the baseline before it.
- `GET .../api/alerts`: alert instances (pending, firing, resolved) and the last day's
  transitions, plus the rules of the workspace.
- `GET .../api/notices`: notes the process attached to the workspace (the demo's "the
  simulated stream has finished"), so the dashboard does not read a finished demo as an outage.

Shapes are in docs/alerts.md; the models below document them in `/openapi.json`.
"""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mmagg.server import queries, trends
from mmagg.server.alerts import AlertEngine, alerts_payload
from mmagg.server.api import (
    AUTH_ERRORS,
    EndTime,
    PrincipalDependency,
    StartTime,
    parse_time,
    time_range,
)
from mmagg.server.db import Database, Principal
from mmagg.server.errors import ApiError
from mmagg.server.responses import documented

MAX_SPAN = 366 * 86400.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrendPoint(_Model):
    t: float
    time: str | None
    mean_confidence: float | None
    median_confidence: float | None
    p10_confidence: float | None
    best_confidence: float | None
    prediction_count: int
    predictions_per_minute: float


class TrendSeries(_Model):
    class_name: str
    points: list[TrendPoint]


class TrendsResponse(_Model):
    """`GET .../api/trends`."""

    workspace: str
    model_id: str
    bucket_seconds: float
    start_time: str | None
    end_time: str | None
    series: list[TrendSeries]


class ClassDrift(_Model):
    class_name: str
    psi: float | None
    js_distance: float | None
    level: str
    recent_count: int
    baseline_count: int
    recent_median: float | None
    baseline_median: float | None
    recent_mean: float | None
    baseline_mean: float | None


class MixDrift(_Model):
    psi: float | None
    level: str


class ModelDrift(_Model):
    model_id: str
    max_psi: float | None
    level: str
    class_mix: MixDrift
    classes: list[ClassDrift]


class DriftResponse(_Model):
    """`GET .../api/drift`."""

    workspace: str
    recent_start: str | None
    recent_end: str | None
    baseline_start: str | None
    baseline_end: str | None
    measure: str
    thresholds: dict[str, float]
    min_count: int
    models: list[ModelDrift]


class AlertInstance(_Model):
    rule: str
    fingerprint: str
    state: str
    labels: dict[str, str]
    value: float | None
    threshold: float | None
    active_since: str | None
    fired_at: str | None
    resolved_at: str | None
    last_evaluated_at: str | None
    notified: str | None


class AlertEvent(_Model):
    rule: str
    fingerprint: str
    status: str
    labels: dict[str, str]
    value: float | None
    threshold: float | None
    at: str | None


class AlertsResponse(_Model):
    """`GET .../api/alerts`."""

    workspace: str
    enabled: bool
    evaluation_interval_seconds: float | None
    rules: list[dict[str, Any]]
    alerts: list[AlertInstance]
    recent: list[AlertEvent]


class Notice(_Model):
    model_id: str | None
    kind: str
    message: str
    at: str | None


class NoticesResponse(_Model):
    """`GET .../api/notices`."""

    workspace: str
    notices: list[Notice]


def add_notice(
    app: Any, workspace: str, kind: str, message: str, model_id: str | None = None
) -> None:
    """Attach a notice to a workspace (the demo marks its stream as finished, not stopped)."""
    notices: dict[str, list[dict[str, Any]]] = getattr(app.state, "notices", None) or {}
    notices.setdefault(workspace, []).append(
        {"model_id": model_id, "kind": kind, "message": message, "at": queries.iso(time.time())}
    )
    app.state.notices = notices


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def build_monitoring_router(principal_dependency: PrincipalDependency) -> APIRouter:
    """The trends, drift and alerts endpoints, authorised by `principal_dependency`."""
    router = APIRouter()
    Auth = Annotated[Principal, Depends(principal_dependency)]
    Seconds = Query(gt=0, le=MAX_SPAN)

    def respond(payload: dict[str, Any], principal: Principal) -> JSONResponse:
        return JSONResponse({"workspace": principal.workspace, **payload})

    @router.get("/trends", responses=documented(TrendsResponse, *AUTH_ERRORS))
    def read_trends(
        request: Request,
        principal: Auth,
        model: Annotated[str, Query(min_length=1)],
        bucket_seconds: Annotated[float, Seconds] = 60.0,
        class_name: str | None = None,
        source_id: str | None = None,
        device_id: str | None = None,
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        buckets = (span.end - span.start) / bucket_seconds
        if buckets > queries.MAX_SERIES_POINTS:
            raise ApiError(
                422,
                f"bucket_seconds: expected at most {queries.MAX_SERIES_POINTS} buckets in the "
                f"range, got {buckets:.0f}; use a wider bucket or a shorter range",
                reason="invalid",
                field="query.bucket_seconds",
            )
        where = trends.Filter(None, class_name, device_id, source_id)
        with _db(request).read() as conn:
            payload = trends.class_trends(
                conn, principal.workspace_id, model, span, bucket_seconds, where
            )
        return respond(payload, principal)

    @router.get("/drift", responses=documented(DriftResponse, *AUTH_ERRORS))
    def read_drift(
        request: Request,
        principal: Auth,
        model: str | None = None,
        window: Annotated[float, Seconds] = 300.0,
        baseline: Annotated[float, Seconds] = 3600.0,
        min_count: Annotated[int, Query(ge=1, le=1_000_000_000)] = trends.MIN_DRIFT_COUNT,
        source_id: str | None = None,
        device_id: str | None = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        parsed = parse_time("endTime", end_time)
        end = parsed.timestamp() if parsed is not None else time.time()
        where = trends.Filter(model, None, device_id, source_id)
        with _db(request).read() as conn:
            payload = trends.drift_report(
                conn, principal.workspace_id, end, window, baseline, where, min_count
            )
        return respond(payload, principal)

    @router.get("/alerts", responses=documented(AlertsResponse, *AUTH_ERRORS))
    def read_alerts(request: Request, principal: Auth) -> JSONResponse:
        engine: AlertEngine | None = getattr(request.app.state, "alerts", None)
        with _db(request).read() as conn:
            payload = alerts_payload(conn, principal.workspace_id, time.time())
        rules = engine.rules.for_workspace(principal.workspace) if engine is not None else []
        return respond(
            {
                "enabled": engine is not None,
                "evaluation_interval_seconds": engine.interval if engine is not None else None,
                "rules": [r.describe() for r in rules],
                **payload,
            },
            principal,
        )

    @router.get("/notices", responses=documented(NoticesResponse, *AUTH_ERRORS))
    def read_notices(request: Request, principal: Auth) -> JSONResponse:
        notices = getattr(request.app.state, "notices", None) or {}
        return respond({"notices": list(notices.get(principal.workspace, []))}, principal)

    return router
