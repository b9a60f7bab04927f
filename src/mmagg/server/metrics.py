"""Prometheus metrics of one backend app, in a registry of its own.

A per-app `CollectorRegistry` keeps apps independent (tests build many in one process).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The counters and histograms `GET /metrics` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reports_received = Counter(
            "mmagg_reports_received",
            "Reports stored (idempotent replays not counted).",
            registry=self.registry,
        )
        self.results_stored = Counter(
            "mmagg_results_stored",
            "Inference results stored.",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "mmagg_reports_duplicate",
            "Reports answered from an earlier request with the same Idempotency-Key.",
            registry=self.registry,
        )
        self.rejections = Counter(
            "mmagg_rejections",
            "Requests rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.retention_runs = Counter(
            "mmagg_retention_runs",
            "Retention passes this process ran (one process at a time holds the lease).",
            registry=self.registry,
        )
        self.median_digests_built = Counter(
            "mmagg_median_digests_built",
            "Median digests this process built or rebuilt (mmagg.server.medians), by level.",
            ["level"],
            registry=self.registry,
        )
        self.rollup_lag = Gauge(
            "mmagg_rollup_lag_seconds",
            "Seconds between now and the rollup watermark, as of this process's last look "
            "(reads stay exact whatever it is; results newer than it are read from raw rows).",
            registry=self.registry,
        )
        self.rollup_folded = Counter(
            "mmagg_rollup_folded_results",
            "Results this process folded into the rollups (one process at a time holds the "
            "rollup lease).",
            registry=self.registry,
        )
        self.batch_reports = Histogram(
            "mmagg_ingest_batch_reports",
            "Reports stored per transaction by the group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.latency = Histogram(
            "mmagg_request_duration_seconds",
            "Request latency by method, route template and status class.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def reject(self, reason: str) -> None:
        """Count one rejected request."""
        self.rejections.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def route_template(scope: Any) -> str:
    """The route template a request matched, with its router prefix; `unmatched` if none.

    Only matched requests (routing set `endpoint`) get their own label, so a scanner of
    random paths cannot grow the metric's label set. FastAPI keeps only the template's tail
    in `scope["route"]` for a route included through a router (`/models` for both
    `/{workspace}/api/models` and `/dashboard/api/models`): the prefix is rebuilt from the
    path, each segment holding a path parameter's value written as `{name}`.

    Example:
        >>> route_template({"path": "/acme/inference-stats", "endpoint": print,
        ...                 "path_params": {"workspace": "acme"}})
        '/{workspace}/inference-stats'
        >>> route_template({"path": "/x/y"})
        'unmatched'
    """
    if scope.get("endpoint") is None:
        return "unmatched"
    segments = str(scope.get("path", "")).split("/")
    tail = getattr(scope.get("route"), "path", None)
    tail_segments = tail.split("/")[1:] if isinstance(tail, str) and tail.startswith("/") else []
    if tail_segments and len(tail_segments) < len(segments):
        head, rest = segments[: len(segments) - len(tail_segments)], tail_segments
    else:
        head, rest = segments, []
    names = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    head = [f"{{{names[part]}}}" if part in names else part for part in head]
    return "/".join(head + rest) or "/"


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request by its route template.

    Pure ASGI rather than BaseHTTPMiddleware: it adds no task or stream per request, which
    matters on the ingest path.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            template = route_template(scope)
            self.metrics.latency.labels(
                method=scope["method"], route=template, status=f"{status // 100}xx"
            ).observe(time.perf_counter() - started)
