"""mmagg: the Model Monitoring Inference Aggregator.

Keep the best prediction per class from a live video pipeline and report it to a
Model Monitoring backend every few seconds, without slowing the pipeline.

Example:
    >>> import mmagg
    >>> agg = mmagg.Aggregator("my-project/3", frequency=5, api_key="k",
    ...                        api_base_url="http://127.0.0.1:9")
    >>> agg.collect({"predictions": [{"class": "helmet", "confidence": 0.91}]})["error_status"]
    False
    >>> agg.close(timeout=0)
    False
"""

__version__ = "0.1.0"

from mmagg.aggregator import Aggregator  # noqa: E402
from mmagg.cache import MemoryCache  # noqa: E402
from mmagg.client import ModelMonitoringClient, ReportError, RetryPolicy  # noqa: E402
from mmagg.predictions import PredictionBatch, to_batch  # noqa: E402
from mmagg.reporter import Counters  # noqa: E402
from mmagg.stores import MemoryStore, Store  # noqa: E402
from mmagg.window import Window  # noqa: E402

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
