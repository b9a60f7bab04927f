"""The Workflows block: the original's contract, end to end over loopback HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import numpy as np
import pytest
import supervision as sv
from fastapi import BackgroundTasks
from pydantic import ValidationError

from mmagg import MemoryCache, RetryPolicy
from mmagg.block import (
    BlockManifest,
    ModelMonitoringInferenceAggregatorBlockV1,
    last_report_time_cache_key,
)
from mmagg.payload import SYSTEM_INFO_KEYS
from tests.conftest import CaptureServer, FakeClock, Reply

KEY = "rf_block_SECRET_987"
SEED_EXAMPLE: dict[str, Any] = {
    "name": "<your_step_name_here>",
    "type": "roboflow_core/model_monitoring_inference_aggregator@v1",
    "predictions": "$steps.object_detection.predictions",
    "model_id": "my_project/3",
    "frequency": 3,
    "unique_aggregator_key": "session-1v73kdhfse",
    "fire_and_forget": True,
}
ORIGINAL_KEYS = {
    "timestamp",
    "source",
    "source_info",
    "device_id",
    "inference_server_version",
    "inference_results",
}
RESULT_KEYS = {"class_name", "confidence", "inference_id", "model_type", "model_id"}


def make_block(server: CaptureServer, clock: FakeClock, **kwargs: Any) -> Any:
    kwargs.setdefault("background_tasks", None)
    kwargs.setdefault("thread_pool_executor", None)
    return ModelMonitoringInferenceAggregatorBlockV1(
        cache=kwargs.pop("cache", MemoryCache()),
        api_key=kwargs.pop("api_key", KEY),
        api_base_url=server.url,
        clock=clock,
        **kwargs,
    )


def detections(classes: list[str], confidences: list[float], kind: str) -> sv.Detections:
    n = len(classes)
    det = sv.Detections(
        xyxy=np.tile([0.0, 0.0, 10.0, 10.0], (n, 1)),
        confidence=np.array(confidences, dtype=np.float32),
        class_id=np.arange(n),
        mask=np.zeros((n, 32, 32), dtype=bool) if kind == "instance-segmentation" else None,
    )
    det.data["class_name"] = np.array(classes)
    det.data["inference_id"] = np.array([f"inf-{kind}"] * n)
    det.data["prediction_type"] = np.array([kind] * n)
    return det


def frames(kind: str) -> list[Any]:
    if kind in ("object-detection", "instance-segmentation", "keypoint-detection"):
        return [
            detections(["car", "person", "car"], [0.4, 0.7, 0.9], kind),
            detections(["person", "bus"], [0.6, 0.3], kind),
        ]
    if kind == "classification":
        return [
            {
                "inference_id": "c1",
                "prediction_type": "classification",
                "predictions": [
                    {"class": "car", "confidence": 0.9},
                    {"class": "person", "confidence": 0.7},
                ],
            },
            {
                "inference_id": "c2",
                "prediction_type": "classification",
                "predictions": [
                    {"class": "bus", "confidence": 0.3},
                    {"class": "person", "confidence": 0.6},
                ],
            },
        ]
    return [
        {
            "inference_id": "m1",
            "prediction_type": "classification",
            "predictions": {"car": {"confidence": 0.9}, "person": {"confidence": 0.7}},
        },
        {
            "inference_id": "m2",
            "prediction_type": "classification",
            "predictions": {"bus": {"confidence": 0.3}, "person": {"confidence": 0.6}},
        },
    ]


@pytest.mark.parametrize(
    "kind",
    [
        "object-detection",
        "instance-segmentation",
        "keypoint-detection",
        "classification",
        "multi-label",
    ],
)
def test_every_prediction_type_end_to_end(
    capture_server: CaptureServer, clock: FakeClock, kind: str
) -> None:
    block = make_block(capture_server, clock)
    key = f"e2e-{kind}-{uuid.uuid4().hex}"
    first, second = frames(kind)
    result = block.run(False, first, 5, key, "proj/2")
    assert result == {
        "error_status": False,
        "message": "Not in reporting range, skipping report. (Ok)",
    }
    clock.advance(5)
    result = block.run(False, second, 5, key, "proj/2")
    assert result == {"error_status": False, "message": "Data sent successfully"}
    (post,) = capture_server.posts
    body = post.json()
    assert ORIGINAL_KEYS <= set(body) <= ORIGINAL_KEYS | set(SYSTEM_INFO_KEYS)
    assert body["source"] == "workflow"
    assert body["source_info"] == "ModelMonitoringInferenceAggregatorBlockV1"
    datetime.fromisoformat(body["timestamp"])
    got = {r["class_name"]: r for r in body["inference_results"]}
    assert all(set(r) == RESULT_KEYS for r in got.values())
    assert {k: round(v["confidence"], 5) for k, v in got.items()} == {
        "car": 0.9,
        "person": 0.7,
        "bus": 0.3,
    }
    assert {r["model_id"] for r in got.values()} == {"proj/2"}
    if kind != "multi-label" and kind != "classification":
        assert got["car"]["model_type"] == kind
        assert got["car"]["inference_id"] == f"inf-{kind}"


def test_interval_clock_lives_in_the_cache_as_the_original(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    cache = MemoryCache()
    block = make_block(capture_server, clock, cache=cache)
    cache_key = last_report_time_cache_key("clock-test")
    assert cache_key == (
        "workflows:steps_cache:roboflow_core/model_monitoring_inference_aggregator@v1:"
        "clock-test:last_report_time"
    )
    block.run(False, None, 3, "clock-test", "m/1")
    stored = cache.get(cache_key)
    assert datetime.fromisoformat(stored) == datetime.fromtimestamp(clock())
    clock.advance(2.9)  # int(2.9) < 3
    assert block.run(False, None, 3, "clock-test", "m/1")["message"].startswith("Not in")
    clock.advance(0.2)
    assert block.run(False, None, 3, "clock-test", "m/1")["message"] == "Data sent successfully"
    assert datetime.fromisoformat(cache.get(cache_key)) == datetime.fromtimestamp(clock())
    # The workspace lookup is cached under the md5 key of the original.
    assert (
        cache.get(
            "workflows:api_key_to_workspace:" + __import__("hashlib").md5(KEY.encode()).hexdigest()
        )
        == "test-ws"
    )


def test_fastapi_background_tasks_get_exactly_one_task_per_report(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    tasks = BackgroundTasks()
    block = make_block(capture_server, clock, background_tasks=tasks)
    block.run(True, frames("classification")[0], 1, "bg-tasks", "m/1")
    assert len(tasks.tasks) == 0
    clock.advance(1)
    result = block.run(True, frames("classification")[1], 1, "bg-tasks", "m/1")
    assert result == {"error_status": False, "message": "Reporting happens in the background task"}
    assert len(tasks.tasks) == 1
    assert capture_server.posts == []
    asyncio.run(tasks())
    (post,) = capture_server.posts
    assert {r["class_name"] for r in post.json()["inference_results"]} == {"car", "person", "bus"}


def test_thread_pool_executor(capture_server: CaptureServer, clock: FakeClock) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        block = make_block(capture_server, clock, thread_pool_executor=pool)
        block.run(True, frames("multi-label")[0], 1, "pool", "m/1")
        clock.advance(1)
        result = block.run(True, frames("multi-label")[1], 1, "pool", "m/1")
        assert result["message"] == "Reporting happens in the background task"
    (post,) = capture_server.wait_for_posts(1)
    assert len(post.json()["inference_results"]) == 3


def test_own_background_sender(capture_server: CaptureServer, clock: FakeClock) -> None:
    block = make_block(capture_server, clock)
    block.run(True, frames("object-detection")[0], 1, "own-sender", "m/1")
    clock.advance(1)
    result = block.run(True, frames("object-detection")[1], 1, "own-sender", "m/1")
    assert result["message"] == "Reporting happens in the background task"
    capture_server.wait_for_posts(1)


class ThreadRecordingCache(MemoryCache):
    """A memory cache that also records which thread set which key."""

    def __init__(self) -> None:
        super().__init__()
        self.set_by: list[tuple[str, str]] = []

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        self.set_by.append((key, threading.current_thread().name))
        super().set(key, value, expire)


def test_steady_state_report_is_claimed_by_the_sender_at_the_frames_time(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    """After the first report the sender polls and claims the next interval itself: the
    report call only leaves the request, the cache gets the report frame's time (not the
    time the sender ran), wait_idle covers the claim, and a frame that arrives before the
    sender takes the window is in this report or the next, never lost."""
    cache = ThreadRecordingCache()
    block = make_block(capture_server, clock, cache=cache)
    key = f"steady-{uuid.uuid4().hex[:8]}"
    cache_key = last_report_time_cache_key(key)
    block.run(True, frames("object-detection")[0], 1, key, "m/1")
    clock.advance(1)
    first = block.run(True, frames("object-detection")[1], 1, key, "m/1")
    assert first["message"] == "Reporting happens in the background task"
    reporter = block.reporter(key)
    assert reporter.wait_idle(5)
    assert len(capture_server.posts) == 1
    clock.advance(1)
    report_time = clock()
    second = block.run(True, frames("object-detection")[0], 1, key, "m/1")
    assert second["message"] == "Reporting happens in the background task"
    clock.advance(0.5)  # the sender claims later, but at the report frame's time
    late = detections(["late"], [0.5], "object-detection")
    assert block.run(True, late, 1, key, "m/1")["message"].startswith("Not in reporting range")
    assert reporter.wait_idle(5)
    assert len(capture_server.posts) == 2  # wait_idle waited for the claim and the send
    assert datetime.fromisoformat(cache.get(cache_key)) == datetime.fromtimestamp(report_time)
    # Who wrote the interval clock: the caller at the start and at the first report (the
    # sender was not polling yet), the sender at the second.
    writes = [thread for key_, thread in cache.set_by if key_ == cache_key]
    assert writes[:2] == ["MainThread", "MainThread"]
    assert writes[2].startswith("mmagg-sender-") and len(writes) == 3
    assert reporter.close(5)
    names = [
        {r["class_name"] for r in post.json()["inference_results"]} for post in capture_server.posts
    ]
    assert names[1] >= {"car", "person"}
    assert any("late" in n for n in names[1:])
    counters = reporter.counters()
    assert (counters.failed, counters.dropped_total) == (0, 0)


def test_failure_message_has_no_key_and_the_window_arrives_next_time(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    block = make_block(capture_server, clock)
    capture_server.replies = [Reply(status=500, body={"detail": KEY})]
    block.run(False, frames("classification")[0], 1, "carry", "m/1")
    clock.advance(1)
    failed = block.run(False, None, 1, "carry", "m/1")
    assert failed["error_status"] is True
    assert failed["message"].startswith("Error while uploading inference data")
    assert "500" in failed["message"] and KEY not in failed["message"]
    clock.advance(1)
    ok = block.run(False, frames("classification")[1], 1, "carry", "m/1")
    assert ok == {"error_status": False, "message": "Data sent successfully"}
    last = capture_server.posts[-1].json()["inference_results"]
    # "car" was only in the failed window: the next report carries it.
    assert {r["class_name"]: r["confidence"] for r in last} == {
        "car": 0.9,
        "person": 0.7,
        "bus": 0.3,
    }
    counters = block.reporter("carry").counters()
    assert (counters.sent, counters.failed, counters.merged_back) == (1, 1, 1)


def test_connection_refused_in_sync_mode_is_reported_not_raised(clock: FakeClock) -> None:
    block = ModelMonitoringInferenceAggregatorBlockV1(
        MemoryCache(),
        KEY,
        None,
        None,
        api_base_url="http://127.0.0.1:9",
        clock=clock,
        request_timeout=0.5,
        retry=RetryPolicy(deadline=1.0, base_delay=0.05),
    )
    started = time.monotonic()
    block.run(False, None, 1, "refused", "m/1")
    clock.advance(1)
    result = block.run(False, frames("classification")[0], 1, "refused", "m/1")
    assert time.monotonic() - started < 3.0  # retried within the report's deadline only
    assert result["error_status"] is True and KEY not in result["message"]
    assert "connection refused at 127.0.0.1:9" in result["message"]
    reporter = block.reporter("refused")
    reporter.close(timeout=0)  # the merged-back window is given up, and counted
    assert reporter.counters().dropped == {"shutdown": 2}


def test_a_hung_backend_never_blocks_fire_and_forget(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    capture_server.on_post = lambda req: Reply(action="hang")
    block = make_block(capture_server, clock, request_timeout=5)
    key = "hung"
    worst = 0.0
    for i in range(300):
        clock.advance(1 / 30)
        started = time.perf_counter()
        block.run(True, frames("object-detection")[i % 2], 1, key, "m/1")
        worst = max(worst, time.perf_counter() - started)
    capture_server.wait_for_posts(1)
    # The send hangs for 5 s per attempt; the loop never waited on it. (Per-call cost is
    # measured in benchmarks/hot_path.py; this bound only has to tell "waited" apart.)
    assert worst < 1.0
    reporter = block.reporter(key)
    assert reporter.counters().sent == 0
    assert reporter.close(timeout=0) is False  # what it gave up is counted
    assert reporter.counters().dropped["shutdown"] > 0


def test_disable_sinks_sends_nothing_and_says_so(capture_server: CaptureServer) -> None:
    block = ModelMonitoringInferenceAggregatorBlockV1(
        MemoryCache(), None, None, None, disable_sinks=True, api_base_url=capture_server.url
    )
    result = block.run(False, frames("classification")[0], 1, "off", "m/1")
    assert result["error_status"] is False and "disable" in result["message"]
    assert capture_server.requests == []


@pytest.mark.parametrize("api_key", [None, ""])
def test_no_api_key_is_refused_with_a_pointer(api_key: str | None) -> None:
    with pytest.raises(ValueError) as info:
        ModelMonitoringInferenceAggregatorBlockV1(MemoryCache(), api_key, None, None)
    message = str(info.value)
    assert "cannot run without Roboflow API key" in message
    assert "https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key" in message


def test_init_parameters_and_manifest() -> None:
    block_cls = ModelMonitoringInferenceAggregatorBlockV1
    assert block_cls.get_init_parameters() == [
        "api_key",
        "cache",
        "background_tasks",
        "thread_pool_executor",
        "disable_sinks",
    ]
    assert block_cls.get_manifest() is BlockManifest
    assert [o["name"] for o in BlockManifest.describe_outputs()] == ["error_status", "message"]


def seed_example() -> dict[str, Any]:
    """The "Example JSON definition" on the original block's documentation page (Roboflow's
    Workflows docs, "Model Monitoring Inference Aggregator", v1), copied here so the test
    needs nothing beside the checkout."""
    return dict(SEED_EXAMPLE)


def test_the_seed_example_validates() -> None:
    manifest = BlockManifest.model_validate(seed_example())
    assert manifest.type == "roboflow_core/model_monitoring_inference_aggregator@v1"
    assert (manifest.frequency, manifest.model_id, manifest.fire_and_forget) == (
        3,
        "my_project/3",
        True,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency", 0),
        ("frequency", -5),
        ("frequency", "often"),
        ("model_id", ""),
        ("predictions", "steps.x.predictions"),
        ("type", "roboflow_core/other@v1"),
        ("fire_and_forget", "maybe"),
    ],
)
def test_bad_manifest_fields_are_named(field: str, value: Any) -> None:
    definition = seed_example() | {field: value}
    with pytest.raises(ValidationError) as info:
        BlockManifest.model_validate(definition)
    assert field in str(info.value)


def test_selectors_are_accepted() -> None:
    definition = seed_example() | {
        "frequency": "$inputs.frequency",
        "model_id": "$inputs.model",
        "fire_and_forget": "$inputs.faf",
        "predictions": "$steps.model.*",
    }
    assert BlockManifest.model_validate(definition).frequency == "$inputs.frequency"


@pytest.mark.parametrize("frequency", ["5", 5, 5.0])
def test_frequency_from_a_selector_may_be_a_string(
    capture_server: CaptureServer, clock: FakeClock, frequency: Any
) -> None:
    block = make_block(capture_server, clock)
    assert block.run(False, None, frequency, f"f-{frequency!r}", "m")["error_status"] is False


@pytest.mark.parametrize("frequency", ["abc", "0", 0, 1.5, True, None, "-1"])
def test_bad_frequency_is_a_clear_error(
    capture_server: CaptureServer, clock: FakeClock, frequency: Any
) -> None:
    block = make_block(capture_server, clock)
    with pytest.raises(ValueError, match="frequency: expected a whole number of seconds >= 1"):
        block.run(False, None, frequency, "bad-f", "m")


def test_two_block_instances_with_one_key_share_one_window(
    capture_server: CaptureServer, clock: FakeClock
) -> None:
    cache = MemoryCache()
    first = make_block(capture_server, clock, cache=cache)
    second = make_block(capture_server, clock, cache=cache)
    first.run(False, frames("classification")[0], 1, "shared-key", "m/1")
    clock.advance(1)
    second.run(False, frames("classification")[1], 1, "shared-key", "m/1")
    (post,) = capture_server.posts
    assert {r["class_name"] for r in post.json()["inference_results"]} == {"car", "person", "bus"}
