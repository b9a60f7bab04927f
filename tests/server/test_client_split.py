"""The client against the real backend's limits (SQLite and PostgreSQL, over HTTP).

A window with thousands of classes and ``extensions=True`` passes the backend's 1 MiB body
limit: it goes as several reports and every class is stored exactly once with its count.
A confidence outside [0, 1] (the backend refuses a report holding one) is refused by the
client per prediction, so the rest of the report is stored.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
from server_support import RunningBackend

import mmagg
from mmagg.wire import MAX_BODY_BYTES


def _range() -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {
        "startTime": (now - timedelta(minutes=10)).isoformat(),
        "endTime": (now + timedelta(minutes=10)).isoformat(),
    }


def _stats(client: httpx.Client, workspace: str, key: str) -> dict[str, dict[str, float]]:
    response = client.get(f"/{workspace}/inference-stats", params={"api_key": key, **_range()})
    assert response.status_code == 200, response.text
    return {s["predicted_class"]: s for s in response.json()["inference_stats"]}


def test_a_window_over_the_body_limit_arrives_whole(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    classes = [f"part-{i:05d}-".ljust(160, "z") for i in range(4000)]
    copies = {name: 1 + i % 3 for i, name in enumerate(classes)}
    predictions = [
        {"class": name, "confidence": 0.1 + 0.8 * k / copies[name]}
        for name in classes
        for k in range(copies[name])
    ]
    aggregator = mmagg.Aggregator(
        "big/1",
        frequency=3600,
        api_key=key,
        api_base_url=backend.base_url,
        extensions=True,
        request_timeout=30,
    )
    aggregator.collect({"predictions": predictions})
    assert aggregator.close(timeout=60)
    counters = aggregator.counters
    assert counters.failed == 0 and counters.dropped_total == 0, counters
    # More than one report was needed (a body of 4000 results of ~400 bytes is > 1 MiB),
    # and the backend stored each of them.
    assert 4000 * 300 > MAX_BODY_BYTES
    assert counters.sent >= 2
    assert backend.db.count_reports(workspace) == counters.sent
    got = _stats(client, workspace, key)
    assert set(got) == set(classes)
    for name in classes:
        assert got[name]["num_inferences"] == 1, name  # stored exactly once
        assert got[name]["class_count"] == copies[name], name


def test_out_of_range_confidences_cost_one_prediction_not_the_report(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    aggregator = mmagg.Aggregator(
        "range/1",
        frequency=3600,
        api_key=key,
        api_base_url=backend.base_url,
        extensions=True,
    )
    frame = {
        "predictions": [
            {"class": "car", "confidence": 0.75},
            {"class": "car", "confidence": 1.5},  # a score, not a probability
            {"class": "car", "confidence": 75.0},  # a percentage
            {"class": "bus", "confidence": -0.2},
            {"class": "bus", "confidence": 0.25},
            {"class": "bus", "confidence": float("nan")},
            {"class": "van", "confidence": 1.0},
            {"class": "van", "confidence": 0.0},
        ]
    }
    aggregator.collect(frame)
    assert aggregator.close(timeout=10)
    counters = aggregator.counters
    assert counters.rejected == 4
    assert counters.sent == 1 and counters.failed == 0 and counters.dropped_total == 0
    assert counters.collected == 8
    got = _stats(client, workspace, key)
    assert {name: s["class_count"] for name, s in got.items()} == {"car": 1, "bus": 1, "van": 2}
    assert got["car"]["avg_confidence"] == 0.75
    assert got["bus"]["avg_confidence"] == 0.25
    assert got["van"]["avg_confidence"] == 1.0  # the best sample of van
