"""Prometheus metrics of one backend app, in a registry of its own.

A per-app `CollectorRegistry` keeps apps independent (tests build many in one process).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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
            # FastAPI >= 0.16x keeps the full template (with router prefixes) on the
            # effective route context; scope["route"].path lacks the prefix there.
            context = scope.get("effective_route_context")
            template = getattr(context, "path_format", None) or getattr(
                scope.get("route"), "path", "unmatched"
            )
            self.metrics.latency.labels(
                method=scope["method"], route=template, status=f"{status // 100}xx"
            ).observe(time.perf_counter() - started)
