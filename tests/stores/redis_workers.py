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
