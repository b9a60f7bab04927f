"""Per-source aggregation end to end: the real backend tells sources apart; Roboflow's payload
keeps exactly the keys of DESIGN §2 when extensions are off."""

from __future__ import annotations

from typing import Any

from integrations_support import QUICK_RETRY, Backend, VideoFrame

from mmagg.sinks import MonitoringSink

#: DESIGN §2: the top-level keys of a report (system-info keys may each be missing).
REQUIRED_KEYS = {
    "timestamp",
    "source",
    "source_info",
    "device_id",
    "inference_server_version",
    "inference_results",
}
SYSTEM_INFO_KEYS = {
    "platform",
    "platform_release",
    "platform_version",
    "architecture",
    "hostname",
    "ip_address",
    "mac_address",
    "processor",
}
RESULT_KEYS = {"class_name", "confidence", "inference_id", "model_type", "model_id"}

# (source index, class, confidence, inference id) per frame, two cameras, overlapping classes.
FRAMES = [
    (0, "car", 0.61, "a1"),
    (1, "car", 0.92, "b1"),
    (0, "person", 0.33, "a2"),
    (1, "person", 0.48, "b2"),
    (0, "car", 0.87, "a3"),
    (1, "car", 0.15, "b3"),
    (0, "person", 0.71, "a4"),
    (1, "truck", 0.55, "b4"),
]
EXPECTED_BEST = {
    ("cam-north", "car"): (0.87, "a3"),
    ("cam-north", "person"): (0.71, "a4"),
    ("cam-south", "car"): (0.92, "b1"),
    ("cam-south", "person"): (0.48, "b2"),
    ("cam-south", "truck"): (0.55, "b4"),
}
NAMES = ["cam-north", "cam-south"]


def _feed(sink: MonitoringSink) -> None:
    for frame_id, (source, name, conf, inference_id) in enumerate(FRAMES, start=1):
        sink(
            {
                "predictions": [{"class": name, "confidence": conf}],
                "inference_id": inference_id,
                "prediction_type": "object-detection",
            },
            VideoFrame(source_id=source, frame_id=frame_id),
        )


def test_backend_stores_one_window_per_source(backend: Backend) -> None:
    workspace, key = backend.new_workspace()
    sink = MonitoringSink.for_model(
        "yard/3",
        per_source=True,
        extensions=True,
        source_names=NAMES,
        frequency=60,
        api_key=key,
        api_base_url=backend.base_url,
        device_id="edge-7",
        retry=QUICK_RETRY,
    )
    _feed(sink)
    assert sink.close(timeout=10)
    assert sink.aggregator.counters.sent == 1
    samples = backend.get(workspace, key, "samples", limit=100)["samples"]
    stored = {
        (s["source_id"], s["class_name"]): (s["confidence"], s["inference_id"]) for s in samples
    }
    assert stored == EXPECTED_BEST
    assert {s["device_id"] for s in samples} == {"edge-7"}
    counts = {(s["source_id"], s["class_name"]): s["prediction_count"] for s in samples}
    assert counts[("cam-north", "car")] == 2 and counts[("cam-south", "truck")] == 1
    devices = backend.get(workspace, key, "devices")["devices"]
    assert [d["device_id"] for d in devices] == ["edge-7"]
    assert sorted(s["source_id"] for s in devices[0]["sources"]) == NAMES
    # Filtering by source works on what the aggregator sent.
    south = backend.get(workspace, key, "samples", source_id="cam-south")["samples"]
    assert {s["class_name"] for s in south} == {"car", "person", "truck"}


def test_without_per_source_the_backend_sees_one_window(backend: Backend) -> None:
    workspace, key = backend.new_workspace()
    sink = MonitoringSink.for_model(
        "yard/3",
        per_source=False,
        extensions=True,
        source_names=NAMES,
        frequency=60,
        api_key=key,
        api_base_url=backend.base_url,
        retry=QUICK_RETRY,
    )
    _feed(sink)
    assert sink.close(timeout=10)
    samples = backend.get(workspace, key, "samples", limit=100)["samples"]
    stored = {s["class_name"]: (s["confidence"], s["source_id"]) for s in samples}
    assert stored == {"car": (0.92, None), "person": (0.71, None), "truck": (0.55, None)}


def test_roboflow_payload_keeps_exactly_the_original_keys(capture_server: Any) -> None:
    sink = MonitoringSink.for_model(
        "yard/3",
        per_source=True,
        extensions=False,
        source_names=NAMES,
        frequency=60,
        api_key="test-key",
        api_base_url=capture_server.url,
        retry=QUICK_RETRY,
    )
    _feed(sink)
    assert sink.close(timeout=10)
    [post] = capture_server.posts
    body = post.json()
    assert REQUIRED_KEYS <= set(body) <= REQUIRED_KEYS | SYSTEM_INFO_KEYS
    assert body["source"] == "workflow"
    assert body["source_info"] == "ModelMonitoringInferenceAggregatorBlockV1"
    results = body["inference_results"]
    assert all(set(item) == RESULT_KEYS for item in results)
    # Sources stay separate windows, but nothing names them on Roboflow's wire.
    got = sorted((r["class_name"], r["confidence"], r["inference_id"]) for r in results)
    assert got == sorted((name, conf, iid) for (_, name), (conf, iid) in EXPECTED_BEST.items())


def test_extensions_name_the_source_on_the_wire(capture_server: Any) -> None:
    sink = MonitoringSink.for_model(
        "yard/3",
        per_source=True,
        extensions=True,
        source_names=NAMES,
        frequency=60,
        api_key="test-key",
        api_base_url=capture_server.url,
        retry=QUICK_RETRY,
    )
    _feed(sink)
    assert sink.close(timeout=10)
    [post] = capture_server.posts
    results = post.json()["inference_results"]
    got = {(r["source_id"], r["class_name"]): (r["confidence"], r["inference_id"]) for r in results}
    assert got == EXPECTED_BEST
    assert all(sum(r["stats"]["histogram"]) == r["stats"]["count"] for r in results)
