"""Response bodies of the backend, as pydantic models for the OpenAPI document.

Handlers build plain dicts and return them as `JSONResponse` (no validation on the way out,
it would cost more than the query on small answers); these models document the shapes in
`/openapi.json`, and the test suite validates real answers against them with
`extra="forbid"`, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorItem(_Response):
    """One validation problem: where, what was expected, the type of what came."""

    loc: list[str | int]
    field: str
    msg: str
    type: str
    received_type: str | None
    # The offending value, for numbers only (strings are never echoed: a secret may be one).
    received: int | float | str | None = None


class ErrorResponse(_Response):
    """Every 4xx: a message, or for 422 a list of field errors."""

    detail: str | list[ErrorItem]


class WorkspaceResponse(_Response):
    """`GET /`, `POST /dashboard/api/login`, `GET /dashboard/api/me`."""

    workspace: str


class LogoutResponse(_Response):
    """`POST /dashboard/api/logout`."""

    status: str


class HealthResponse(_Response):
    """`GET /healthz`."""

    status: str
    version: str


class IngestResponse(_Response):
    """`POST /{workspace}/inference-stats`; a replay returns the first answer."""

    status: str
    report_id: int
    results: int


class InferenceStatsItem(_Response):
    """One (model, class) of the read endpoint."""

    model_name: str
    predicted_class: str
    num_inferences: int
    prev_num_inferences: int
    num_errors: None
    prev_num_errors: None
    avg_confidence: float
    prev_avg_confidence: float | None
    median_confidence: float | None
    avg_response_time: None
    prev_avg_response_time: None
    class_count: int
    predictions_avg_confidence: float | None


class InferenceStatsResponse(_Response):
    """`GET /{workspace}/inference-stats` (Roboflow's shape plus mmagg's fields)."""

    workspace: str
    start_time: str
    end_time: str
    num_inferences: int
    prev_num_inferences: int
    num_errors: int
    prev_num_errors: int
    avg_confidence: float | None
    prev_avg_confidence: float | None
    avg_response_time: None
    prev_avg_response_time: None
    inference_stats: list[InferenceStatsItem]


class _Ranged(_Response):
    workspace: str
    start_time: str
    end_time: str


class ModelItem(_Response):
    """One model: its activity in the range, its last report and interval over all time."""

    model_id: str
    last_report_at: str | None
    last_report_at_all_time: str | None
    report_count: int
    result_count: int
    prediction_count: int
    class_count: int
    devices: list[str]
    sources: list[str]
    estimated_interval_seconds: float | None
    interval_source: str | None


class ModelsResponse(_Ranged):
    """`GET .../models`."""

    models: list[ModelItem]


class ClassItem(_Response):
    """One class of a model."""

    class_name: str
    result_count: int
    avg_confidence: float
    max_confidence: float
    min_confidence: float
    prediction_count: int
    predictions_avg_confidence: float | None
    last_seen_at: str | None
    results_with_stats: int


class ClassesResponse(_Ranged):
    """`GET .../classes?model=`."""

    model_id: str
    classes: list[ClassItem]


class DeviceSource(_Response):
    """A video source seen on a device."""

    source_id: str | None
    last_report_at: str | None
    report_count: int
    result_count: int


class DeviceItem(_Response):
    """A device and its sources."""

    device_id: str | None
    last_report_at: str | None
    report_count: int
    result_count: int
    sources: list[DeviceSource]


class DevicesResponse(_Ranged):
    """`GET .../devices`."""

    devices: list[DeviceItem]


class SeriesPoint(_Response):
    """One time bucket of one class."""

    t: float
    time: str | None
    max_confidence: float
    avg_confidence: float
    min_confidence: float
    samples: int
    results_with_stats: int
    prediction_count: int
    predictions_avg_confidence: float | None


class Series(_Response):
    """The points of one class."""

    class_name: str
    points: list[SeriesPoint]


class TimeseriesResponse(_Ranged):
    """`GET .../timeseries?model=&bucket_seconds=`."""

    model_id: str
    bucket_seconds: float
    series: list[Series]


class HistogramClass(_Response):
    """Confidence counts of one class in the ten buckets."""

    class_name: str
    counts: list[int]
    total: int
    median_estimate: float | None
    result_count: int
    results_with_stats: int


class HistogramResponse(_Ranged):
    """`GET .../histogram?model=`."""

    model_id: str
    bin_edges: list[float]
    classes: list[HistogramClass]


class Sample(_Response):
    """One stored sampled prediction."""

    time: str | None
    t: float
    model_id: str
    class_name: str
    confidence: float
    inference_id: str | None
    model_type: str | None
    device_id: str | None
    source_id: str | None
    prediction_count: int
    report_id: int


class SamplesResponse(_Response):
    """`GET .../samples`."""

    workspace: str
    samples: list[Sample]


def documented(model: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: `model` on 200 and `ErrorResponse` on each error status."""
    answers: dict[int | str, dict[str, Any]] = {200: {"model": model}}
    for status in errors:
        answers[status] = {"model": ErrorResponse}
    return answers
