"""The drift marks, trend charts and alerts panel in real headless Chromium.

The backend runs an `AlertEngine` on the real clock with one rule that the seeded data (helmet
confidence dropped for the last 8 minutes) sets firing. Set MMAGG_ALERTS_SCREENSHOT=docs/alerts.png
to refresh the screenshot of docs/alerts.md.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from dashboard_support import WORKSPACE, Backend, DashboardPage, free_port

MODEL = "site-safety/3"
DEMO_MODEL = "demo-cam/1"
HIGH = [0.81, 0.83, 0.85, 0.86, 0.88, 0.9, 0.92, 0.84, 0.87, 0.89]
LOW = [0.31, 0.35, 0.38, 0.4, 0.42, 0.45, 0.47, 0.5, 0.36, 0.44]
PERSON = [0.7, 0.75, 0.8, 0.72, 0.78]


def _hist(values: list[float]) -> list[int]:
    out = [0] * 10
    for v in values:
        out[min(int(v * 10), 9)] += 1
    return out


def _item(model: str, name: str, values: list[float]) -> dict[str, Any]:
    return {
        "class_name": name,
        "confidence": max(values),
        "inference_id": uuid.uuid4().hex[:12],
        "model_type": "object-detection",
        "model_id": model,
        "stats": {
            "count": len(values),
            "sum": sum(values),
            "min": min(values),
            "max": max(values),
            "histogram": _hist(values),
        },
    }


def _report(ts: float, device: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "timestamp": datetime.fromtimestamp(ts, timezone.utc).isoformat(),
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": device,
        "inference_server_version": "0.1.0",
        "platform": "Linux",
        "inference_results": items,
        "mmagg": {"frequency": 10.0, "aggregator_key": f"{device}-agg"},
    }


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A backend with alert rules, seeded through the ingest API (overrides conftest's)."""
    uvicorn = pytest.importorskip("uvicorn")
    from mmagg.server import create_app
    from mmagg.server.alert_rules import parse_rules
    from mmagg.server.alerts import AlertEngine
    from mmagg.server.db import Database
    from mmagg.server.monitoring_api import add_notice

    db = Database(f"sqlite:///{tmp_path_factory.mktemp('alerts-db') / 'mmagg.db'}")
    rules = parse_rules(
        {
            "rules": [
                {
                    "name": "helmet-confidence-low",
                    "workspace": WORKSPACE,
                    "model": MODEL,
                    "class": "helmet",
                    "metric": "median_confidence",
                    "below": 0.6,
                    "window": "5m",
                },
                {
                    "name": "camera-silent",
                    "workspace": WORKSPACE,
                    "metric": "silence",
                    "after": "2h",
                },
            ]
        }
    )
    engine = AlertEngine(db, rules, interval=0.2)
    app = create_app(db=db, alerts=engine)
    key = db.create_key(WORKSPACE, {"ingest", "read"})
    other_key = db.create_key("globex", {"ingest", "read"})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="alerts-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    now = time.time()
    bodies = []
    for i in range(240):  # 40 minutes, every 10 s; helmet drops for the last 8 minutes
        ts = now - 2400 + 10 * i + 5
        helmet = LOW if ts > now - 480 else HIGH
        bodies.append(
            _report(
                ts, "site-host", [_item(MODEL, "helmet", helmet), _item(MODEL, "person", PERSON)]
            )
        )
    for i in range(12):  # a demo that ran 20 minutes ago and finished
        bodies.append(_report(now - 1500 + 10 * i, "demo-host", [_item(DEMO_MODEL, "car", PERSON)]))
    with httpx.Client(base_url=base, timeout=10) as client:
        for item in bodies:
            answer = client.post(
                f"/{WORKSPACE}/inference-stats", params={"api_key": key}, json=item
            )
            assert answer.status_code == 200, answer.text
    add_notice(
        app,
        WORKSPACE,
        "demo_finished",
        "This was a demo: the simulated stream has finished.",
        model_id=DEMO_MODEL,
    )
    assert engine.wait_ticks(2)
    try:
        yield Backend(url=base, key=key, other_key=other_key, reports=bodies, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        db.close()


def test_alerts_panel_and_drift_marks_on_the_overview(dashboard: DashboardPage) -> None:
    dashboard.login()
    page = dashboard.page
    firing = page.locator('#alerts-body tr[data-state="firing"]')
    assert firing.count() == 1
    cells = firing.locator("td").all_text_contents()
    assert cells[1] == "helmet-confidence-low"
    assert cells[2] == f"{MODEL} / helmet"
    assert 0.3 < float(cells[3]) < 0.6 and cells[4] == "0.600"
    assert page.text_content("#alerts-count") == "1 firing"
    events = page.eval_on_selector_all(
        "#alerts-recent li", "els => els.map(e => e.getAttribute('data-status'))"
    )
    assert events == ["firing"]
    # The model's drift mark: helmet moved, significantly, in the last quarter of the hour.
    mark = page.locator(f'#models-body tr[data-model-id="{MODEL}"] .drift')
    assert mark.get_attribute("data-level") == "significant"
    assert "helmet" in page.locator(f'#models-body tr[data-model-id="{MODEL}"]').text_content()
    # A finished demo reads as one, not as an outage.
    demo = page.locator(f'#models-body tr[data-model-id="{DEMO_MODEL}"] .health')
    assert demo.text_content() == "\u25a0 Demo finished"
    assert "Stopped reporting" not in page.text_content("#models-body")
    assert page.is_visible("#notice-banner")
    path = dashboard.screenshot("alerts-overview")
    target = os.environ.get("MMAGG_ALERTS_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)


def test_model_view_draws_confidence_statistics_rates_and_drift(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page
    levels = dict(
        page.eval_on_selector_all(
            "#drift-body tr", "rows => rows.map(r => [r.dataset.class, r.dataset.level])"
        )
    )
    assert levels == {"helmet": "significant", "person": "none"}
    assert page.text_content("#confidence-caption") == "Median confidence per class over time"
    assert int(page.get_attribute("#confidence-chart", "data-points") or 0) > 0
    assert int(page.get_attribute("#counts-chart", "data-points") or 0) > 0
    before = dashboard.renders()
    page.select_option("#stat-select", "p10_confidence")
    dashboard.wait_render(before)
    assert (
        page.text_content("#confidence-caption") == "10th-percentile confidence per class over time"
    )
    calls = [u for u in dashboard.requests if urlsplit(u).path == "/dashboard/api/trends"]
    assert calls, "the charts read the trends endpoint"


def test_five_minute_range_shows_seconds_and_buckets_no_shorter_than_the_interval(
    dashboard: DashboardPage,
) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    dashboard.select_range("300")
    page = dashboard.page
    chart = "#confidence-chart"
    assert page.get_attribute(chart, "data-time-format") == "hh:mm:ss"
    # 300 s / 120 would be 2.5 s buckets; the model reports every 10 s.
    assert page.get_attribute(chart, "data-bucket-seconds") == "10"
    last = [u for u in dashboard.requests if urlsplit(u).path == "/dashboard/api/trends"][-1]
    assert parse_qs(urlsplit(last).query)["bucket_seconds"] == ["10"]
    points = int(page.get_attribute(chart, "data-points") or 0)
    assert 10 <= points <= 2 * 31  # two classes, at most one point per 10 s bucket
    dashboard.select_range("86400")
    assert page.get_attribute(chart, "data-time-format") == "hh:mm"
