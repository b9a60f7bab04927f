"""The unchanged client side (`mmagg.Aggregator`) reporting to the backend over real HTTP."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import numpy as np
import pytest
from server_support import RunningBackend

import mmagg

with warnings.catch_warnings():
    # Only Detections are built here; the missing-OpenCV notice is irrelevant to them.
    warnings.filterwarnings("ignore", message=".*OpenCV.*", category=UserWarning)
    import supervision as sv


def _detections(names: list[str], confidences: list[float], frame: str) -> Any:
    n = len(names)
    return sv.Detections(
        xyxy=np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (n, 1)),
        confidence=np.array(confidences),
        class_id=np.zeros(n, dtype=int),
        data={
            "class_name": np.array(names),
            "inference_id": np.array([frame] * n),
            "prediction_type": np.array(["object-detection"] * n),
        },
    )


def _range() -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {
        "startTime": (now - timedelta(minutes=5)).isoformat(),
        "endTime": (now + timedelta(minutes=1)).isoformat(),
    }


@pytest.mark.parametrize("extensions", [False, True], ids=["roboflow-dialect", "extensions"])
def test_aggregator_reports_what_it_collected(
    backend: RunningBackend, client: httpx.Client, extensions: bool
) -> None:
    workspace, key = backend.new_workspace()
    frames = [
        (["car", "car", "person"], [0.5, 0.9, 0.3], "f1", "cam-1"),
        (["car", "helmet"], [0.7, 0.6], "f2", "cam-2"),
        (["person", "person"], [0.8, 0.2], "f3", "cam-1"),
    ]
    aggregator = mmagg.Aggregator(
        "site/3",
        frequency=60,
        api_key=key,
        api_base_url=backend.base_url,
        per_source=extensions,
        extensions=extensions,
        device_id="e2e-device",
    )
    for names, confidences, frame, source in frames:
        aggregator.collect(_detections(names, confidences, frame), source_id=source)
    assert aggregator.close(timeout=10)
    assert aggregator.counters.sent == 1 and aggregator.counters.failed == 0

    body = client.get(f"/{workspace}/inference-stats", params={"api_key": key, **_range()}).json()
    got = {s["predicted_class"]: s for s in body["inference_stats"]}
    if extensions:
        # One best sample per (class, source); counts are every prediction.
        expected_best = {"car": [0.9, 0.7], "person": [0.8], "helmet": [0.6]}
        expected_count = {"car": 3, "person": 3, "helmet": 1}
    else:
        expected_best = {"car": [0.9], "person": [0.8], "helmet": [0.6]}
        expected_count = {"car": 1, "person": 1, "helmet": 1}
    assert set(got) == set(expected_best)
    for name, best in expected_best.items():
        assert got[name]["num_inferences"] == len(best)
        assert got[name]["avg_confidence"] == pytest.approx(sum(best) / len(best))
        assert got[name]["class_count"] == expected_count[name]
    samples = client.get(
        f"/{workspace}/api/samples", params={"api_key": key, "model": "site/3", **_range()}
    ).json()["samples"]
    assert {s["device_id"] for s in samples} == {"e2e-device"}
    best_car = max((s for s in samples if s["class_name"] == "car"), key=lambda s: s["confidence"])
    assert best_car["inference_id"] == "f1"
    assert best_car["model_type"] == "object-detection"
    if extensions:
        assert {s["source_id"] for s in samples} == {"cam-1", "cam-2"}


def test_aggregator_with_a_revoked_key_drops_and_counts(
    backend: RunningBackend,
) -> None:
    workspace, key = backend.new_workspace()
    assert backend.db.revoke_key(key[:8])
    aggregator = mmagg.Aggregator(
        "site/3", frequency=60, api_key=key, api_base_url=backend.base_url
    )
    aggregator.collect(_detections(["car"], [0.9], "f1"))
    aggregator.close(timeout=10)
    counters = aggregator.counters
    assert counters.sent == 0
    assert counters.failed >= 1 and counters.dropped_total >= 1, counters
    assert backend.db.count_reports(workspace) == 0


def test_dashboard_page_is_served_when_installed(client: httpx.Client) -> None:
    pytest.importorskip("mmagg.server.dashboard")
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
