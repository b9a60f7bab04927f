"""mmagg: the Model Monitoring Inference Aggregator.

Keep the best prediction per class from a live video pipeline and report it to a
Model Monitoring backend every few seconds, without slowing the pipeline.

``import mmagg`` is light: the names below load their module on first use, so the
backend (``mmagg.server``), ``mmagg.payload`` and the CLI never load the client side
(aggregator, reporter, block) unless they use it.

Example:
    >>> import mmagg
    >>> agg = mmagg.Aggregator("my-project/3", frequency=5, api_key="k",
    ...                        api_base_url="http://127.0.0.1:9")
    >>> agg.collect({"predictions": [{"class": "helmet", "confidence": 0.91}]})["error_status"]
    False
    >>> agg.close(timeout=0)
    False
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmagg._version import __version__

if TYPE_CHECKING:
    from mmagg.aggregator import Aggregator
    from mmagg.cache import MemoryCache
    from mmagg.client import ModelMonitoringClient, ReportError, RetryPolicy
    from mmagg.outcomes import Counters
    from mmagg.predictions import PredictionBatch, to_batch
    from mmagg.stores import MemoryStore, Store
    from mmagg.window import Window

_LAZY = {
    "Aggregator": "mmagg.aggregator",
    "Counters": "mmagg.outcomes",
    "MemoryCache": "mmagg.cache",
    "MemoryStore": "mmagg.stores",
    "ModelMonitoringClient": "mmagg.client",
    "PredictionBatch": "mmagg.predictions",
    "ReportError": "mmagg.client",
    "RetryPolicy": "mmagg.client",
    "Store": "mmagg.stores",
    "Window": "mmagg.window",
    "to_batch": "mmagg.predictions",
}

__all__ = [
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
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmagg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
