"""Seed data and page helpers for the dashboard browser tests (fixtures: conftest.py).

The backend is `mmagg.server.create_app` on a SQLite file, served by uvicorn on a free port in
a thread, and seeded only through its public ingestion API (httpx POSTs of wire-format
reports). Chromium is Debian's `/usr/bin/chromium`, driven by Playwright's sync API; no browser
is ever downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = os.environ.get("MMAGG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

WORKSPACE = "acme"
OTHER_WORKSPACE = "globex"
MODEL = "yard/3"
QUIET_MODEL = "dock/1"
# More classes than the page draws at first (TOP_CLASSES = 8 in dashboard.js).
BUSY_MODEL = "coco/80"
BUSY_CLASSES = [f"class-{k:02d}" for k in range(12)]
OUR_MODELS = {MODEL, QUIET_MODEL, BUSY_MODEL}
OTHER_MODEL = "secret-model/9"
# Rendered as text it is harmless; parsed as HTML it would set window.__pwned.
HTML_CLASS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
# Object.prototype's names: a page keeping classes in a plain {} would mix them up.
PROTO_CLASS = "__proto__"
RECENT_CLASSES = {"car", "person", HTML_CLASS, PROTO_CLASS}
OLD_CLASS = "hardhat"  # only in reports 3 hours old: visible in "24 h", not in "15 min"
OTHER_CLASSES = {"zebra_secret"}
OTHER_DEVICE = "globex-device"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Backend:
    """The running backend: its base URL and one API key per workspace."""

    url: str
    key: str
    other_key: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    app: Any = None


def _histogram(confidences: list[float]) -> list[int]:
    buckets = [0] * 10
    for c in confidences:
        buckets[min(max(int(c * 10), 0), 9)] += 1
    return buckets


def _result(
    model: str,
    class_name: str,
    confidence: float,
    *,
    stats: int,
    source: str | None,
) -> dict[str, Any]:
    """One `inference_results` item; `stats` > 0 adds the extension for that many predictions."""
    item: dict[str, Any] = {
        "class_name": class_name,
        "confidence": confidence,
        "inference_id": uuid.uuid4().hex[:12],
        "model_type": "object-detection",
        "model_id": model,
    }
    if source is not None:
        item["source_id"] = source
    if stats:
        spread = [max(0.0, confidence - 0.04 * k) for k in range(stats)]
        item["stats"] = {
            "count": len(spread),
            "sum": sum(spread),
            "min": min(spread),
            "max": max(spread),
            "histogram": _histogram(spread),
        }
    return item


def _report(
    when: datetime,
    device: str,
    results: list[dict[str, Any]],
    frequency: float | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timestamp": when.isoformat(),
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": device,
        "inference_server_version": "0.1.0",
        "platform": "Linux",
        "hostname": device,
        "inference_results": results,
    }
    if frequency is not None:
        body["mmagg"] = {"frequency": frequency, "aggregator_key": f"{device}-agg"}
    return body


def seed_reports(now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reports for `acme` and for `globex`, timestamps relative to `now`."""
    ours: list[dict[str, Any]] = []
    # yard/3 on edge-01: every 30 s for the last 12 minutes, with stats, two video sources.
    for i in range(24):
        when = now - timedelta(seconds=30 * i + 5)
        wobble = (i % 5) / 50
        results = [
            _result(MODEL, "car", 0.80 + wobble, stats=6 + i % 5, source="cam-1"),
            _result(MODEL, "person", 0.55 + wobble, stats=2 + (3 * i) % 7, source="cam-2"),
        ]
        if i % 3 == 0:
            results.append(_result(MODEL, HTML_CLASS, 0.35 + wobble, stats=2, source="cam-1"))
        if i % 4 == 1:
            results.append(_result(MODEL, PROTO_CLASS, 0.20 + wobble, stats=1, source="cam-1"))
        ours.append(_report(when, "edge-01", results, 30.0))
    # yard/3, three hours ago: a class that only shows in wider ranges, without stats.
    for i in range(6):
        when = now - timedelta(hours=3, seconds=60 * i)
        results = [
            _result(MODEL, OLD_CLASS, 0.62 + i / 100, stats=0, source=None),
            _result(MODEL, "car", 0.70, stats=0, source=None),
        ]
        ours.append(_report(when, "edge-01", results, None))
    # dock/1 on edge-02: reported every minute, then went silent two hours ago (stale).
    for i in range(10):
        when = now - timedelta(hours=2, seconds=60 * i)
        ours.append(
            _report(
                when,
                "edge-02",
                [_result(QUIET_MODEL, "forklift", 0.9 - i / 100, stats=0, source=None)],
                None,
            )
        )
    # coco/80 on edge-03: 12 classes, class-k seen k + 1 times per report (so the 8 busiest are
    # class-04 … class-11).
    for i in range(4):
        when = now - timedelta(seconds=60 * i + 7)
        results = [
            _result(BUSY_MODEL, name, 0.5 + k / 40, stats=k + 1, source=None)
            for k, name in enumerate(BUSY_CLASSES)
        ]
        ours.append(_report(when, "edge-03", results, 60.0))
    theirs = [
        _report(
            now - timedelta(seconds=20 * i + 3),
            OTHER_DEVICE,
            [_result(OTHER_MODEL, "zebra_secret", 0.99, stats=4, source="globex-cam")],
            20.0,
        )
        for i in range(10)
    ]
    return ours, theirs


def post_all(base: str, workspace: str, key: str, bodies: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        for body in bodies:
            response = client.post(
                f"/{workspace}/inference-stats",
                params={"api_key": key},
                json=body,
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert response.status_code == 200, response.text


@dataclass
class DashboardPage:
    """A page of the dashboard with every request it made recorded."""

    page: Any
    backend: Backend
    requests: list[str]
    shots: Path
    responses: list[tuple[int, str]] = field(default_factory=list)

    def goto(self) -> None:
        self.page.goto(self.backend.url + "/dashboard")
        self.page.wait_for_selector("#login-view:not([hidden]), #app-view:not([hidden])")

    def renders(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.renders || 0)"))

    def wait_render(self, before: int) -> None:
        """Wait until a refresh that started after `before` renders has finished."""
        self.page.wait_for_function(
            "n => Number(document.body.dataset.renders) > n"
            " && document.body.dataset.busy === 'false'",
            arg=before,
        )

    def login(self, key: str | None = None) -> None:
        self.goto()
        before = self.renders()
        self.page.fill("#api-key", key or self.backend.key)
        self.page.click("#login-submit")
        self.page.wait_for_selector("#app-view:not([hidden])")
        self.wait_render(before)

    def open_model(self, model: str) -> None:
        before = self.renders()
        self.page.get_by_role("link", name=model, exact=True).click()
        self.page.wait_for_selector("#model-view:not([hidden])")
        self.wait_render(before)

    def select_range(self, value: str) -> None:
        before = self.renders()
        self.page.select_option("#range-select", value)
        self.wait_render(before)

    def legend_classes(self) -> list[str]:
        names: list[str] = self.page.eval_on_selector_all(
            "#legend li", "els => els.map(e => e.getAttribute('data-class'))"
        )
        return names

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        target = os.environ.get("MMAGG_DASHBOARD_SCREENSHOT")
        if target and name == os.environ.get("MMAGG_DASHBOARD_SCREENSHOT_NAME", "range-15min"):
            shutil.copyfile(path, target)
        return path
