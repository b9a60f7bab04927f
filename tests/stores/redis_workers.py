"""Functions the Redis tests run in spawned processes (importable by the children)."""

from __future__ import annotations

import time
from typing import Any

from mmagg.predictions import to_batch
from mmagg.stores.redis import RedisStore


def claim_once(url: str, key: str, index: int, barrier: Any, results: Any) -> None:
    """Start the interval, wait until it is due, then claim together with the others."""
    store = RedisStore(url)
    try:
        batch = to_batch({"predictions": [{"class": "cat", "confidence": index / 10}]})
        store.window(key).add(batch, model_id="m")
        store.claim(key, 1)
        barrier.wait()
        time.sleep(1.1)
        barrier.wait()
        results.put(store.claim(key, 1) is not None)
    finally:
        store.close()


def claim_in_loop(url: str, key: str, duration: float, ready: Any, go: Any, results: Any) -> None:
    """Poll ``claim`` as fast as possible for ``duration`` s once ``go`` is set.

    Puts ``(win times, end time)`` on ``results``.
    """
    store = RedisStore(url)
    wins: list[float] = []
    try:
        store.window(key)
        ready.put(True)
        go.wait(30)
        end = time.time() + duration
        while time.time() < end:
            if store.claim(key, 1) is not None:
                wins.append(time.time())
            time.sleep(0.001)
        results.put((wins, end))
    finally:
        store.close()


def stream_through_block(
    redis_url: str,
    api_base_url: str,
    key: str,
    index: int,
    duration: float,
    log_path: str,
    ready: Any,
    go: Any,
    champions: dict[str, float],
) -> None:
    """One "replica": streams its own predictions through the block for ``duration`` s.

    Writes one JSON line per prediction it handed to ``run()`` (``at``, class, confidence,
    inference id), then one line with the outcome of the loop and the store's counters.
    ``champions`` maps a class to the time offset at which this process sends that class's
    best prediction of the whole run (confidence 0.999).
    """
    import json
    import random

    from mmagg import MemoryCache
    from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1
    from mmagg.stores import resolve_store

    rng = random.Random(index)
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key="test-key",
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=api_base_url,
        store=redis_url,
    )
    classes = ["car", "person", "dog", f"only-{index}"]
    errors: list[str] = []
    messages: dict[str, int] = {}
    pending = dict(champions)
    # Warm up (imports, connections, reporter) so that every process streams from "go".
    block.run(True, None, 1, key, "yard/1")
    with open(log_path, "w", encoding="utf-8") as log:
        ready.put(index)
        go.wait(60)
        started = time.time()
        frame = 0
        while time.time() - started < duration:
            frame += 1
            inference_id = f"p{index}-f{frame}"
            items = [
                {"class": rng.choice(classes), "confidence": round(rng.uniform(0.05, 0.95), 4)}
                for _ in range(rng.randint(1, 3))
            ]
            for name, offset in list(pending.items()):
                if time.time() - started >= offset:
                    items.append({"class": name, "confidence": 0.999})
                    del pending[name]
            at = time.time()
            try:
                result = block.run(
                    fire_and_forget=True,
                    predictions={
                        "inference_id": inference_id,
                        "prediction_type": "object-detection",
                        "predictions": items,
                    },
                    frequency=1,
                    unique_aggregator_key=key,
                    model_id="yard/1",
                )
            except Exception as exc:  # the test fails on any
                errors.append(repr(exc))
                continue
            if result["error_status"]:
                errors.append(str(result["message"]))
            messages[str(result["message"])] = messages.get(str(result["message"]), 0) + 1
            for item in items:
                record = {"at": at, "class_name": item["class"], "confidence": item["confidence"]}
                record["inference_id"] = inference_id
                log.write(json.dumps(record) + "\n")
            time.sleep(0.03)
        stopped = time.time()
        block.reporter(key).close()  # the last partial window: whoever closes first sends it
        store = resolve_store(redis_url)  # the process-wide store the block uses
        log.write(
            json.dumps(
                {
                    "done": True,
                    "started": started,
                    "stopped": stopped,
                    "errors": errors,
                    "messages": messages,
                    "counters": store.counters() if hasattr(store, "counters") else {},
                    "healthy": getattr(store, "healthy", True),
                }
            )
            + "\n"
        )


def stream_one_tenant(
    redis_url: str, api_base_url: str, api_key: str, key: str, class_name: str, frames: int
) -> None:
    """One tenant's replica: ``frames`` frames of ``class_name`` through the block, then close."""
    from mmagg import MemoryCache
    from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=api_key,
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=api_base_url,
        store=redis_url,
        extensions=True,
    )
    for frame in range(frames):
        result = block.run(
            fire_and_forget=False,
            predictions={"predictions": [{"class": class_name, "confidence": 0.5 + frame / 1e4}]},
            frequency=1,
            unique_aggregator_key=key,
            model_id="yard/1",
        )
        assert result["error_status"] is False, result
        time.sleep(0.02)
    assert block.reporter(key).close(timeout=10)
