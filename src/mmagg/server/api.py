"""The read JSON API, written once and mounted twice.

`/{workspace}/api/...` authorises with an API key (query or Bearer), `/dashboard/api/...`
with the dashboard session cookie. Both mounts share these handlers; only the dependency
that yields the `Principal` differs, so the cookie mount can never read a workspace taken
from the URL.
"""

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from mmagg.server import queries
from mmagg.server.bounds import EARLIEST_READ_TIME, LATEST_READ_TIME, unstorable_reason, utc_aware
from mmagg.server.db import Database, Principal
from mmagg.server.errors import ApiError
from mmagg.server.responses import (
    ClassesResponse,
    DevicesResponse,
    HistogramResponse,
    InferenceStatsResponse,
    ModelsResponse,
    SamplesResponse,
    TimeseriesResponse,
    documented,
)

PrincipalDependency = Callable[..., Principal]

DEFAULT_RANGE = timedelta(hours=24)
AUTH_ERRORS = (401, 403, 422)
MAX_SAMPLES = 1_000


def parse_time(name: str, value: str | None) -> datetime | None:
    """Parse a `startTime`/`endTime` query value; naive values are UTC.

    Accepts Roboflow's `YYYY-MM-DD HH:mm:ss`, any ISO-8601 datetime, or epoch seconds,
    between `EARLIEST_READ_TIME` and `LATEST_READ_TIME` (years 1000 to 9000); anything else
    is a 422 naming the field, the bound and the value.

    Example:
        >>> parse_time("startTime", "-86400").isoformat()
        '1969-12-31T00:00:00+00:00'
    """
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    shown = text[:64].encode("ascii", "backslashreplace").decode("ascii")
    try:
        try:
            parsed = datetime.fromtimestamp(float(text), timezone.utc)
        except ValueError:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        in_utc = utc_aware(parsed)
    except (ValueError, OverflowError, OSError):
        raise ApiError(
            422,
            f"{name}: expected 'YYYY-MM-DD HH:mm:ss', ISO-8601 or epoch seconds between "
            f"{EARLIEST_READ_TIME.isoformat()} and {LATEST_READ_TIME.isoformat()}, "
            f"got {shown!r}",
            reason="invalid",
            field=f"query.{name}",
        ) from None
    if in_utc.tzinfo is None:
        in_utc = in_utc.replace(tzinfo=timezone.utc)
    if not EARLIEST_READ_TIME <= in_utc <= LATEST_READ_TIME:
        raise ApiError(
            422,
            f"{name}: expected a time between {EARLIEST_READ_TIME.isoformat()} and "
            f"{LATEST_READ_TIME.isoformat()}, got {shown!r}",
            reason="invalid",
            field=f"query.{name}",
        )
    return in_utc


def time_range(start_time: str | None, end_time: str | None) -> queries.TimeRange:
    """The requested range; Roboflow's defaults: the 24 hours up to now."""
    end = parse_time("endTime", end_time) or datetime.now(timezone.utc)
    start = parse_time("startTime", start_time) or max(end - DEFAULT_RANGE, EARLIEST_READ_TIME)
    if start >= end:
        raise ApiError(
            422,
            f"startTime: expected a time before endTime ({end.isoformat()}), "
            f"got {start.isoformat()}",
            reason="invalid",
            field="query.startTime",
        )
    return queries.TimeRange(start.timestamp(), end.timestamp())


def reject_unstorable_query(request: Request) -> None:
    """Dependency: 422 for a query parameter no database can compare (NUL, bad Unicode).

    PostgreSQL refuses a NUL even as a query parameter; SQLite answers the same way so
    that the two databases behave alike.
    """
    for name, value in request.query_params.multi_items():
        reason = unstorable_reason(value) or unstorable_reason(name)
        if reason:
            shown = name.encode("ascii", "backslashreplace").decode("ascii")[:64]
            raise ApiError(422, f"{shown}: {reason}", reason="invalid", field=f"query.{shown}")


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


StartTime = Annotated[str | None, Query(alias="startTime")]
EndTime = Annotated[str | None, Query(alias="endTime")]
ClassNames = Annotated[list[str] | None, Query(alias="class_name")]
ModelNames = Annotated[str | None, Query(alias="modelNames")]


def build_api_router(principal_dependency: PrincipalDependency) -> APIRouter:
    """The JSON read endpoints, authorised by `principal_dependency`."""
    router = APIRouter(dependencies=[Depends(reject_unstorable_query)])
    Auth = Annotated[Principal, Depends(principal_dependency)]

    def respond(payload: dict[str, Any], principal: Principal) -> JSONResponse:
        payload = {"workspace": principal.workspace, **payload}
        return JSONResponse(payload)

    @router.get("/inference-stats", responses=documented(InferenceStatsResponse, *AUTH_ERRORS))
    def read_inference_stats(
        request: Request,
        principal: Auth,
        start_time: StartTime = None,
        end_time: EndTime = None,
        model_names: ModelNames = None,
    ) -> JSONResponse:
        return inference_stats_response(request, principal, start_time, end_time, model_names)

    @router.get("/models", responses=documented(ModelsResponse, *AUTH_ERRORS))
    def read_models(
        request: Request,
        principal: Auth,
        device_id: str | None = None,
        source_id: str | None = None,
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        with _db(request).read() as conn:
            payload = queries.models(conn, principal.workspace_id, span, device_id, source_id)
        return respond(payload, principal)

    @router.get("/classes", responses=documented(ClassesResponse, *AUTH_ERRORS))
    def read_classes(
        request: Request,
        principal: Auth,
        model: Annotated[str, Query(min_length=1)],
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        with _db(request).read() as conn:
            return respond(queries.classes(conn, principal.workspace_id, model, span), principal)

    @router.get("/devices", responses=documented(DevicesResponse, *AUTH_ERRORS))
    def read_devices(
        request: Request,
        principal: Auth,
        model: str | None = None,
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        with _db(request).read() as conn:
            return respond(queries.devices(conn, principal.workspace_id, span, model), principal)

    @router.get("/timeseries", responses=documented(TimeseriesResponse, *AUTH_ERRORS))
    def read_timeseries(
        request: Request,
        principal: Auth,
        model: Annotated[str, Query(min_length=1)],
        bucket_seconds: Annotated[float, Query(gt=0, le=366 * 86400)] = 60.0,
        class_names: ClassNames = None,
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
        with _db(request).read() as conn:
            payload = queries.timeseries(
                conn,
                principal.workspace_id,
                model,
                span,
                bucket_seconds,
                class_names or (),
                source_id,
                device_id,
            )
        return respond(payload, principal)

    @router.get("/histogram", responses=documented(HistogramResponse, *AUTH_ERRORS))
    def read_histogram(
        request: Request,
        principal: Auth,
        model: Annotated[str, Query(min_length=1)],
        class_names: ClassNames = None,
        source_id: str | None = None,
        device_id: str | None = None,
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        with _db(request).read() as conn:
            payload = queries.histogram(
                conn, principal.workspace_id, model, span, class_names or (), source_id, device_id
            )
        return respond(payload, principal)

    @router.get("/samples", responses=documented(SamplesResponse, *AUTH_ERRORS))
    def read_samples(
        request: Request,
        principal: Auth,
        model: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 50,
        class_names: ClassNames = None,
        source_id: str | None = None,
        device_id: str | None = None,
        start_time: StartTime = None,
        end_time: EndTime = None,
    ) -> JSONResponse:
        span = time_range(start_time, end_time)
        with _db(request).read() as conn:
            payload = queries.samples(
                conn,
                principal.workspace_id,
                span,
                limit,
                model,
                class_names or (),
                source_id,
                device_id,
            )
        return respond(payload, principal)

    return router


def inference_stats_response(
    request: Request,
    principal: Principal,
    start_time: str | None,
    end_time: str | None,
    model_names: str | None,
) -> JSONResponse:
    """Body of the Roboflow-compatible read endpoint, shared by every mount."""
    span = time_range(start_time, end_time)
    names = [n.strip() for n in (model_names or "").split(",") if n.strip()]
    with _db(request).read() as conn:
        payload = queries.inference_stats(conn, principal.workspace_id, span, names)
    return JSONResponse({"workspace": principal.workspace, **payload})
