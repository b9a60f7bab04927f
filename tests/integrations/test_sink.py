"""MonitoringSink as on_prediction: shapes, batch mode, errors that never escape."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
import supervision as sv
from integrations_support import QUICK_RETRY, VideoFrame
from pydantic import BaseModel

from mmagg.sinks import MonitoringSink


def _roboflow_json(*items: tuple[str, float], inference_id: str = "inf") -> dict[str, Any]:
    """What InferencePipeline.init hands on_prediction for an object-detection model."""
    return {
        "image": {"width": 640, "height": 480},
        "predictions": [
            {
                "x": 10.0,
                "y": 10.0,
                "width": 5.0,
                "height": 5.0,
                "confidence": conf,
                "class": name,
                "class_id": 0,
                "detection_id": f"d{i}",
            }
            for i, (name, conf) in enumerate(items)
        ],
        "inference_id": inference_id,
        "prediction_type": "object-detection",
    }


def _detections(*items: tuple[str, float], inference_id: str = "inf") -> sv.Detections:
    n = len(items)
    return sv.Detections(
        xyxy=np.tile(np.array([[0.0, 0.0, 10.0, 10.0]]), (n, 1)),
        confidence=np.array([conf for _, conf in items]),
        class_id=np.zeros(n, dtype=int),
        data={
            "class_name": np.array([name for name, _ in items]),
            "inference_id": np.array([inference_id] * n),
            "prediction_type": np.array(["object-detection"] * n),
        },
    )


def _sink(capture_server: Any, **options: Any) -> MonitoringSink:
    options.setdefault("frequency", 60)
    return MonitoringSink.for_model(
        "yard/3",
        api_key="test-key",
        api_base_url=capture_server.url,
        retry=QUICK_RETRY,
        **options,
    )


def _reported(capture_server: Any) -> dict[tuple[str, str], float]:
    """Best confidence per (model_id, class_name) over every report received."""
    best: dict[tuple[str, str], float] = {}
    for post in capture_server.posts:
        for item in post.json()["inference_results"]:
            key = (item["model_id"], item["class_name"])
            best[key] = max(best.get(key, -1.0), item["confidence"])
    return best


def test_single_mode_roboflow_json(capture_server: Any) -> None:
    sink = _sink(capture_server)
    frames = [
        _roboflow_json(("car", 0.4), ("person", 0.7), inference_id="i1"),
        _roboflow_json(("car", 0.9), inference_id="i2"),
        _roboflow_json(inference_id="i3"),  # nothing detected
    ]
    for i, frame in enumerate(frames):
        assert sink(frame, VideoFrame(source_id=0, frame_id=i + 1)) is None
    assert sink.close(timeout=5)
    [post] = capture_server.posts
    results = {r["class_name"]: r for r in post.json()["inference_results"]}
    assert results["car"]["confidence"] == 0.9 and results["car"]["inference_id"] == "i2"
    assert results["person"]["confidence"] == 0.7
    assert results["car"]["model_type"] == "object-detection"
    assert sink.errors == {}
    assert sink.aggregator.counters.collected == 3


@pytest.mark.parametrize("output_name", ["predictions", "model_predictions"])
def test_single_mode_workflow_outputs(capture_server: Any, output_name: str) -> None:
    """init_with_workflow hands a dict of outputs; the predictions are sv.Detections."""
    sink = _sink(capture_server, output_name=output_name)
    sink({output_name: _detections(("car", 0.3), ("dog", 0.8)), "count": 2}, VideoFrame(0, 1))
    sink({output_name: _detections(("car", 0.6))}, VideoFrame(0, 2))
    sink({output_name: None}, VideoFrame(0, 3))  # the step produced nothing
    # Serialised workflow outputs (serialize_results=True) nest a Roboflow JSON dict.
    sink({output_name: _roboflow_json(("dog", 0.95))}, VideoFrame(0, 4))
    assert sink.close(timeout=5)
    assert _reported(capture_server) == {("yard/3", "car"): 0.6, ("yard/3", "dog"): 0.95}
    assert sink.errors == {}


class _Response(BaseModel):
    """Shaped like inference's pydantic responses (the sink reads ``model_dump()``)."""

    predictions: list[dict[str, Any]]
    inference_id: str = "resp"


def test_plain_loop_without_video_frames(capture_server: Any) -> None:
    sink = _sink(capture_server)
    sink(_detections(("car", 0.5)))
    sink(_roboflow_json(("car", 0.7)))
    sink(_Response(predictions=[{"class": "bus", "confidence": 0.3}]))
    assert sink.close(timeout=5)
    assert _reported(capture_server) == {("yard/3", "car"): 0.7, ("yard/3", "bus"): 0.3}
    assert sink.errors == {}
    assert sink.sources() == {}


def test_batch_mode_with_holes_keeps_sources_apart(capture_server: Any) -> None:
    sink = _sink(capture_server, per_source=True, extensions=True, source_names=["gate", "yard"])
    t0 = datetime(2026, 11, 27, 5, 0, tzinfo=timezone.utc)
    # Source 1 missed a frame in the first batch and source 0 in the second.
    sink(
        [_roboflow_json(("car", 0.5)), None, _roboflow_json(("car", 0.2))],
        [VideoFrame(0, 1, t0), None, VideoFrame(2, 1, t0)],
    )
    sink(
        [None, _detections(("car", 0.8), ("car", 0.1))],
        [None, VideoFrame(1, 2, t0)],
    )
    sink(
        [_roboflow_json(("car", 0.6)), _detections(("person", 0.4))],
        [VideoFrame(0, 5, t0), VideoFrame(1, 3, t0)],
    )
    assert sink.close(timeout=5)
    results = {
        (r["source_id"], r["class_name"]): r["confidence"]
        for post in capture_server.posts
        for r in post.json()["inference_results"]
    }
    assert results == {
        ("gate", "car"): 0.6,
        ("yard", "car"): 0.8,
        ("yard", "person"): 0.4,
        ("2", "car"): 0.2,  # no name given for source 2
    }
    sources = sink.sources()
    assert {name: s.frames for name, s in sources.items()} == {"gate": 2, "yard": 2, "2": 1}
    assert sources["gate"].skipped == 3  # frame ids 1 then 5
    assert sources["gate"].last_timestamp == t0.timestamp()
    assert sink.aggregator.counters.collected == 6
    assert sink.errors == {}


class _ExplodingFrame:
    frame_id = 1
    frame_timestamp = None

    @property
    def source_id(self) -> int:
        raise RuntimeError("camera went away")


def test_errors_never_escape_and_are_counted_and_logged_once(
    capture_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _sink(capture_server)
    with caplog.at_level(logging.WARNING, logger="mmagg.sinks"):
        for _ in range(3):
            sink({"predictions": "not a list"}, VideoFrame(0, 1))  # invalid predictions
            sink({"other_output": 1}, VideoFrame(0, 1))  # no predictions output
            sink(["not a dict"], [VideoFrame(0, 1)])  # batch item of a wrong type
            sink([_roboflow_json(("car", 0.5))], VideoFrame(0, 1))  # batch without frame list
            sink([None], [VideoFrame(0, 1), VideoFrame(1, 1)])  # more frames than predictions
            sink(_roboflow_json(("car", 0.5)), _ExplodingFrame())
            sink({"predictions": [{"class": "car", "confidence": "high"}]})
    assert dict(sink.errors) == {
        "invalid_predictions": 6,
        "unsupported_output": 6,
        "batch_length_mismatch": 6,
        "internal_error": 3,
    }
    sink_records = [r for r in caplog.records if r.name == "mmagg.sinks"]
    assert len(sink_records) == 4  # once per kind
    assert "pass output_name=" in caplog.text
    # The batches without a frame list were still collected; invalid inputs were rejected.
    assert sink.aggregator.counters.collected == 3
    assert sink.aggregator.counters.rejected == 6
    assert sink.close(timeout=5)


def test_the_api_key_never_reaches_the_log(
    capture_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sink-secret-key-123"
    sink = MonitoringSink.for_model(
        "yard/3", api_key=secret, api_base_url=capture_server.url, retry=QUICK_RETRY
    )
    with caplog.at_level(logging.WARNING):
        sink({"predictions": [{"class": secret, "confidence": 0.2}], "oops": secret}, 42)
        sink({"nothing": secret})
    assert secret not in caplog.text
    sink.close(timeout=5)


def test_sink_constructor_validates(capture_server: Any) -> None:
    sink = _sink(capture_server)
    with pytest.raises(ValueError, match="output_name"):
        MonitoringSink(sink.aggregator, output_name="")
    with pytest.raises(TypeError, match="source_names"):
        MonitoringSink(sink.aggregator, source_names="cam")
    named = MonitoringSink(sink.aggregator, source_names={0: "north", "rtsp://x": "south"})
    named({"predictions": []}, VideoFrame(0, 1))
    named({"predictions": []}, VideoFrame("rtsp://x", 1))  # type: ignore[arg-type]
    assert set(named.sources()) == {"north", "south"}
    sink.close(timeout=5)
