"""The wire format client and backend share (docs/wire-format.md): keys, buckets, limits.

Both sides import these names, so a change here changes both; the module imports
nothing, so ``mmagg serve`` loads no client code through it.

Example:
    >>> SOURCE, SOURCE_INFO, HISTOGRAM_BUCKETS
    ('workflow', 'ModelMonitoringInferenceAggregatorBlockV1', 10)
    >>> RESULT_KEYS
    ('class_name', 'confidence', 'inference_id', 'model_type', 'model_id')
"""

from __future__ import annotations

__all__ = [
    "CONFIDENCE_MAX",
    "CONFIDENCE_MIN",
    "EXTENSION_KEY",
    "EXTENSION_RESULT_KEYS",
    "HISTOGRAM_BUCKETS",
    "MAX_BODY_BYTES",
    "MAX_RESULTS",
    "MAX_STRING",
    "RESULT_KEYS",
    "SOURCE",
    "SOURCE_INFO",
    "SYSTEM_INFO_KEYS",
    "TOP_LEVEL_KEYS",
]

#: ``source`` and ``source_info`` of every report (the original block's values).
SOURCE = "workflow"
SOURCE_INFO = "ModelMonitoringInferenceAggregatorBlockV1"
#: System-info keys of a report; each is omitted when it cannot be read.
SYSTEM_INFO_KEYS = (
    "platform",
    "platform_release",
    "platform_version",
    "architecture",
    "hostname",
    "ip_address",
    "mac_address",
    "processor",
)
#: The other top-level keys of the original's body.
TOP_LEVEL_KEYS = (
    "timestamp",
    "source",
    "source_info",
    "device_id",
    "inference_server_version",
    "inference_results",
)
#: Keys of one item of ``inference_results`` (the original's).
RESULT_KEYS = ("class_name", "confidence", "inference_id", "model_type", "model_id")
#: Opt-in keys of an item (``extensions=True``) and of the top level.
EXTENSION_RESULT_KEYS = ("source_id", "stats")
EXTENSION_KEY = "mmagg"
#: Bounds of a confidence (both included): the client refuses a prediction outside them at
#: collect time (counted as rejected), the backend refuses a report holding one (422).
CONFIDENCE_MIN = 0.0
CONFIDENCE_MAX = 1.0
#: Buckets of the per-class confidence histogram: bucket ``i`` holds ``i/10 <= c < (i+1)/10``.
HISTOGRAM_BUCKETS = 10
#: Limits the backend enforces: body size (413), results per report and string length (422).
MAX_BODY_BYTES = 1 << 20
MAX_RESULTS = 10_000
MAX_STRING = 1_024
