"""``mmagg.Aggregator``: the facade, counters, close, per-source, and the public surface."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pytest
import supervision as sv

import mmagg
from mmagg import Aggregator, RetryPolicy
from mmagg.payload import SYSTEM_INFO_KEYS
from tests.conftest import CaptureServer, FakeClock, Reply

KEY = "rf_agg_SECRET_555"


def det(classes: list[str], conf: list[float]) -> sv.Detections:
    d = sv.Detections(xyxy=np.zeros((len(classes), 4)), confidence=np.array(conf))
    d.data["class_name"] = np.array(classes)
    return d


def make(server: CaptureServer, clock: FakeClock, **kwargs: object) -> Aggregator:
    return Aggregator(
        "site/1",
        2,
        api_key=KEY,
        api_base_url=server.url,
        clock=clock,
        unique_aggregator_key=f"agg-{uuid.uuid4().hex}",
        **kwargs,  # type: ignore[arg-type]
    )


def test_public_surface_is_pinned() -> None:
    assert mmagg.__all__ == sorted(mmagg.__all__)
    assert set(mmagg.__all__) == {
        "Aggregator",
        "Counters",
        "MemoryCache",
        "MemoryStore",
        "ModelMonitoringClient",
        "PredictionBatch",
        "ReportError",
        "RetryPolicy",
        "Store",
        "Window",
        "__version__",
        "to_batch",
    }


def test_core_import_stays_light() -> None:
    code = (
        "import sys, mmagg; heavy = {'fastapi', 'sqlalchemy', 'redis', 'uvicorn', 'supervision',"
        " 'prometheus_client', 'httpx'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reports_every_interval_and_close_sends_the_last_window(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    agg = make(capture_server, clock, fire_and_forget=False)
    agg.collect(det(["car", "car"], [0.3, 0.8]))
    clock.advance(2)
    assert agg.collect(det(["bus"], [0.5])) == {
        "error_status": False,
        "message": "Data sent successfully",
    }
    agg.collect(det(["truck"], [0.4]))
    assert agg.close(timeout=5) is True
    first, last = capture_server.posts
    assert {r["class_name"]: r["confidence"] for r in first.json()["inference_results"]} == {
        "car": 0.8,
        "bus": 0.5,
    }
    assert [r["class_name"] for r in last.json()["inference_results"]] == ["truck"]
    counters = agg.counters
    assert (counters.collected, counters.sent, counters.failed, counters.dropped_total) == (
        4,
        2,
        0,
        0,
    )


def test_context_manager_flushes_in_background_mode(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    with make(capture_server, clock) as agg:
        agg.collect({"predictions": [{"class": "cat", "confidence": 0.9}]})
    (post,) = capture_server.posts
    assert post.json()["inference_results"][0]["class_name"] == "cat"


def test_windows_that_pile_up_during_a_slow_send_are_merged_not_queued(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    capture_server.replies = [Reply(delay=1.0)]
    agg = make(capture_server, clock)
    agg.collect(det(["c0"], [0.5]))
    clock.advance(2)
    agg.collect(det(["c1"], [0.5]))  # due: the slow report starts
    capture_server.wait_for_posts(1)
    for i in range(2, 6):  # several intervals pass while it is in flight
        clock.advance(2)
        agg.collect(det([f"c{i}"], [0.5]))
    agg.collect(det(["last"], [0.5]))
    assert agg.flush(timeout=5)
    posts = capture_server.posts
    assert len(posts) == 2  # the slow one, then everything that piled up in one report
    classes = [r["class_name"] for p in posts for r in p.json()["inference_results"]]
    assert sorted(classes) == sorted([f"c{i}" for i in range(6)] + ["last"])


def test_4xx_refusal_is_dropped_and_counted(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    capture_server.replies = [Reply(status=422, body={"detail": "bad"})]
    agg = make(capture_server, clock, fire_and_forget=False)
    agg.collect(det(["a", "a", "b"], [0.1, 0.2, 0.3]))
    clock.advance(2)
    result = agg.collect(None)
    assert result["error_status"] is True
    assert dict(agg.counters.dropped) == {"http_422": 3}
    clock.advance(2)
    agg.collect(None)
    assert capture_server.posts[-1].json()["inference_results"] == []


def test_rejected_inputs_are_counted_and_raised(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    agg = make(capture_server, clock)
    with pytest.raises(TypeError):
        agg.collect(["not", "predictions"])
    agg.collect({"predictions": [{"class": "x", "confidence": float("nan")}]})
    clock.advance(2)
    agg.collect(None)
    assert agg.flush(5)
    assert agg.counters.rejected == 2


def test_per_source_windows_and_extensions(capture_server: CaptureServer, clock: FakeClock) -> None:
    agg = make(capture_server, clock, per_source=True, extensions=True, fire_and_forget=False)
    agg.collect(det(["car"], [0.9]), source_id="cam-1")
    agg.collect(det(["car", "car"], [0.4, 0.6]), source_id="cam-2")
    clock.advance(2)
    agg.collect(None)
    body = capture_server.posts[0].json()
    by_source = {r["source_id"]: r for r in body["inference_results"]}
    assert by_source["cam-1"]["confidence"] == 0.9
    assert by_source["cam-2"]["confidence"] == 0.6
    assert by_source["cam-2"]["stats"]["count"] == 2
    assert sum(by_source["cam-2"]["stats"]["histogram"]) == 2
    assert body["mmagg"]["frequency"] == 2


def test_without_extensions_the_payload_keeps_the_original_keys(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    agg = make(capture_server, clock, per_source=True, fire_and_forget=False)
    agg.collect(det(["car"], [0.9]), source_id="cam-1")
    clock.advance(2)
    agg.collect(None)
    body = capture_server.posts[0].json()
    allowed = {
        "timestamp",
        "source",
        "source_info",
        "device_id",
        "inference_server_version",
        "inference_results",
        *SYSTEM_INFO_KEYS,
    }
    assert set(body) <= allowed
    assert set(body["inference_results"][0]) == {
        "class_name",
        "confidence",
        "inference_id",
        "model_type",
        "model_id",
    }


def test_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capture_server: CaptureServer
) -> None:
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    with pytest.raises(ValueError, match="cannot run without Roboflow API key"):
        Aggregator("m/1")
    monkeypatch.setenv("API_KEY", "from-env")
    monkeypatch.setenv("API_BASE_URL", capture_server.url)
    monkeypatch.setenv("DEVICE_ID", "edge-7")
    with Aggregator("m/1", fire_and_forget=False) as agg:
        agg.collect({"predictions": [{"class": "x", "confidence": 0.5}]})
    (post,) = capture_server.posts
    assert post.query["api_key"] == ["from-env"] and post.json()["device_id"] == "edge-7"


def test_repr_never_shows_the_key(capture_server: CaptureServer, clock: FakeClock) -> None:
    agg = make(capture_server, clock)
    assert KEY not in repr(agg) and KEY not in repr(agg._reporter.exporter.client)


def test_a_failed_final_report_is_counted_as_dropped_not_lost(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    capture_server.on_post = lambda req: Reply(status=503)
    agg = make(capture_server, clock, retry=RetryPolicy(deadline=0.5, base_delay=0.05))
    agg.collect(det(["car", "bus", "bus"], [0.2, 0.3, 0.4]))
    assert agg.close(timeout=5) is False
    counters = agg.counters
    assert dict(counters.dropped) == {"shutdown": 3}
    assert (counters.sent, counters.failed, counters.merged_back) == (0, 1, 0)


def test_reports_are_stamped_with_the_injected_clock(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    agg = make(capture_server, clock, fire_and_forget=False)
    clock.advance(2)
    agg.collect(det(["car"], [0.5]))
    from datetime import datetime

    stamp = datetime.fromisoformat(capture_server.posts[0].json()["timestamp"])
    assert stamp.timestamp() == clock()


def test_wait_idle_waits_for_the_send_without_taking_new_data(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    capture_server.replies = [Reply(delay=0.3)]
    agg = make(capture_server, clock)
    agg.collect(det(["car"], [0.5]))
    clock.advance(2)
    assert agg.collect(det(["bus"], [0.5]))["message"].endswith("in the background task")
    agg.collect(det(["late"], [0.5]))  # collected after the report: stays for the next one
    assert agg._reporter.wait_idle(5)
    (post,) = capture_server.posts
    assert {r["class_name"] for r in post.json()["inference_results"]} == {"car", "bus"}
    assert agg.close(5)
    assert [r["class_name"] for r in capture_server.posts[-1].json()["inference_results"]] == [
        "late"
    ]
