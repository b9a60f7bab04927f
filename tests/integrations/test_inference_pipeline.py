"""Opt-in (``pytest -m inference``): MonitoringSink inside a real ``InferencePipeline``.

Two small video files go through ``InferencePipeline.init_with_custom_logic`` (no model, no
download): a custom ``on_video_frame`` returns Roboflow JSON per frame, and the sink gets
what the pipeline really hands ``on_prediction`` (batch mode with two sources, single mode
with one).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from integrations_support import QUICK_RETRY

from mmagg.sinks import MonitoringSink

pytestmark = pytest.mark.inference

CLASSES = ("car", "person", "truck")


def _video(path: Path, frames: int) -> str:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i % 255, dtype=np.uint8))
    writer.release()
    return str(path)


def _run(videos: list[str], capture_server: Any) -> tuple[MonitoringSink, dict[Any, float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inference's own deprecations are not ours
        from inference import InferencePipeline

    produced: dict[tuple[str, str], float] = {}  # best confidence per (source, class) made
    lock = threading.Lock()

    def on_video_frame(frames: list[Any]) -> list[dict[str, Any]]:
        outputs = []
        for frame in frames:
            name = CLASSES[frame.frame_id % 3]
            conf = round(((frame.frame_id * 37 + frame.source_id * 11) % 97) / 100, 2)
            with lock:
                key = (f"cam-{frame.source_id}", name)
                produced[key] = max(produced.get(key, -1.0), conf)
            outputs.append(
                {"predictions": [{"class": name, "confidence": conf}], "inference_id": "x"}
            )
        return outputs

    sink = MonitoringSink.for_model(
        "yard/3",
        per_source=True,
        extensions=True,
        frequency=60,
        source_names=[f"cam-{i}" for i in range(len(videos))],
        api_key="k",
        api_base_url=capture_server.url,
        retry=QUICK_RETRY,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = InferencePipeline.init_with_custom_logic(
            video_reference=videos if len(videos) > 1 else videos[0],
            on_video_frame=on_video_frame,
            on_prediction=sink,
        )
        pipeline.start()
        pipeline.join()
    assert sink.close(timeout=10)
    return sink, produced


def _reported(capture_server: Any) -> dict[tuple[str, str], float]:
    return {
        (r["source_id"], r["class_name"]): r["confidence"]
        for post in capture_server.posts
        for r in post.json()["inference_results"]
    }


def test_two_sources_in_batch_mode(capture_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("inference")
    pytest.importorskip("cv2")
    videos = [_video(tmp_path / "a.mp4", 40), _video(tmp_path / "b.mp4", 25)]
    sink, produced = _run(videos, capture_server)
    assert sink.errors == {}
    assert _reported(capture_server) == produced
    sources = sink.sources()
    assert set(sources) == {"cam-0", "cam-1"}
    assert sources["cam-0"].frames + sources["cam-0"].skipped == 40
    assert sources["cam-1"].frames + sources["cam-1"].skipped == 25
    assert all(s.last_timestamp is not None for s in sources.values())


def test_one_source_in_single_mode(capture_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("inference")
    pytest.importorskip("cv2")
    sink, produced = _run([_video(tmp_path / "a.mp4", 30)], capture_server)
    assert sink.errors == {}
    assert _reported(capture_server) == produced
    assert sink.aggregator.counters.collected == sink.sources()["cam-0"].frames
