"""The Workflows plugin: its interface without inference, and (opt-in, ``pytest -m inference``)
a real workflow JSON through inference's execution engine."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from typing import Any

import numpy as np
import pytest
import supervision as sv
from integrations_support import EXAMPLES

import mmagg.workflows_plugin as plugin

HAS_INFERENCE = importlib.util.find_spec("inference") is not None


def test_initializers_cover_what_the_engine_does_not_inject(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    init = plugin.REGISTERED_INITIALIZERS
    assert set(init) == {
        "api_key",
        "cache",
        "background_tasks",
        "thread_pool_executor",
        "disable_sinks",
    }
    assert init["background_tasks"] is None and init["thread_pool_executor"] is None
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    monkeypatch.setenv("API_KEY", "from-api-key")
    assert init["api_key"]() == "from-api-key"
    monkeypatch.setenv("ROBOFLOW_API_KEY", "from-roboflow")
    assert init["api_key"]() == "from-roboflow"
    monkeypatch.delenv("ROBOFLOW_API_KEY")
    monkeypatch.delenv("API_KEY")
    assert init["api_key"]() is None  # the block then refuses to start, as the original
    cache = init["cache"]()
    cache.set("k", "v", expire=5)
    assert cache.get("k") == "v"
    assert init["disable_sinks"]() is False
    monkeypatch.setenv("MMAGG_DISABLE_SINKS", "true")
    assert init["disable_sinks"]() is True
    assert plugin.load_kinds() == []


@pytest.mark.skipif(HAS_INFERENCE, reason="inference is installed here")
def test_load_blocks_without_inference_says_what_is_missing() -> None:
    with pytest.raises(ImportError, match="install `inference`"):
        plugin.load_blocks()


def test_example_workflow_uses_the_plugin_block() -> None:
    spec = json.loads((EXAMPLES / "workflow_model_monitoring.json").read_text())
    [step] = [s for s in spec["steps"] if s["type"] == plugin.PLUGIN_BLOCK_TYPE]
    assert step["predictions"].startswith("$steps.")
    # The same step under the core type id validates against mmagg's own manifest.
    from mmagg.block import BLOCK_TYPE, BlockManifest

    BlockManifest.model_validate({**step, "type": BLOCK_TYPE})


def _detections(*items: tuple[str, float]) -> sv.Detections:
    n = len(items)
    return sv.Detections(
        xyxy=np.tile(np.array([[0.0, 0.0, 10.0, 10.0]]), (n, 1)),
        confidence=np.array([c for _, c in items]),
        class_id=np.zeros(n, dtype=int),
        data={
            "class_name": np.array([name for name, _ in items]),
            "inference_id": np.array(["inf-1"] * n),
            "prediction_type": np.array(["object-detection"] * n),
        },
    )


WORKFLOW = {
    "version": "1.3.0",
    "inputs": [
        {
            "type": "WorkflowBatchInput",
            "name": "predictions",
            "kind": ["object_detection_prediction"],
        },
        {
            "type": "WorkflowParameter",
            "name": "model_id",
            "kind": ["roboflow_model_id"],
            "default_value": "yard/3",
        },
    ],
    "steps": [
        {
            "type": "mmagg/model_monitoring_inference_aggregator@v1",
            "name": "monitor",
            "predictions": "$inputs.predictions",
            "model_id": "$inputs.model_id",
            "frequency": 1,
            "unique_aggregator_key": "plugin-test",
            "fire_and_forget": False,
        }
    ],
    "outputs": [
        {"type": "JsonField", "name": "error_status", "selector": "$steps.monitor.error_status"},
        {"type": "JsonField", "name": "message", "selector": "$steps.monitor.message"},
    ],
}


@pytest.mark.inference
def test_a_workflow_runs_the_plugin_block_in_inference(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("inference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inference's own deprecations are not ours
        from inference.core.workflows.execution_engine.core import ExecutionEngine

    monkeypatch.setenv("WORKFLOWS_PLUGINS", "mmagg.workflows_plugin")
    monkeypatch.setenv("ROBOFLOW_API_KEY", "plugin-test-key")
    monkeypatch.setenv("API_BASE_URL", capture_server.url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ExecutionEngine.init(workflow_definition=WORKFLOW, init_parameters={})
        first = engine.run(runtime_parameters={"predictions": [_detections(("car", 0.4))]})
        assert first == [
            {"error_status": False, "message": "Not in reporting range, skipping report. (Ok)"}
        ]
        time.sleep(1.05)  # the original's interval: whole seconds on the wall clock
        second = engine.run(
            runtime_parameters={"predictions": [_detections(("car", 0.9), ("person", 0.3))]}
        )
    assert second == [{"error_status": False, "message": "Data sent successfully"}]
    [post] = capture_server.posts
    assert post.query["api_key"] == ["plugin-test-key"]
    results = {r["class_name"]: r for r in post.json()["inference_results"]}
    assert {name: r["confidence"] for name, r in results.items()} == {"car": 0.9, "person": 0.3}
    assert results["car"]["model_id"] == "yard/3"
    assert results["car"]["model_type"] == "object-detection"
