"""Report bodies as the client sends them (docs/wire-format.md)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

SYSTEM_INFO = {
    "platform": "Linux",
    "platform_release": "6.1.0",
    "platform_version": "#1 SMP",
    "architecture": "x86_64",
    "hostname": "edge-01",
    "ip_address": "10.0.0.5",
    "mac_address": "00:11:22:33:44:55",
    "processor": "x86_64",
}


def result(
    class_name: str,
    confidence: float,
    model_id: str = "yard/3",
    **extra: Any,
) -> dict[str, Any]:
    """One item of `inference_results`."""
    item: dict[str, Any] = {
        "class_name": class_name,
        "confidence": confidence,
        "inference_id": str(uuid.uuid4()),
        "model_type": "object-detection",
        "model_id": model_id,
    }
    item.update(extra)
    return item


def report(
    results: list[dict[str, Any]],
    *,
    timestamp: datetime | None = None,
    device_id: str = "edge-01",
    **extra: Any,
) -> dict[str, Any]:
    """A full report body."""
    when = timestamp or datetime.now(timezone.utc) - timedelta(seconds=1)
    body: dict[str, Any] = {
        "timestamp": when.isoformat(),
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": device_id,
        "inference_server_version": "0.1.0",
        **SYSTEM_INFO,
        "inference_results": results,
    }
    body.update(extra)
    return body


def stats(confidences: list[float]) -> dict[str, Any]:
    """The `stats` extension for a list of prediction confidences."""
    histogram = [0] * 10
    for value in confidences:
        histogram[min(max(int(value * 10), 0), 9)] += 1
    return {
        "count": len(confidences),
        "sum": sum(confidences),
        "min": min(confidences),
        "max": max(confidences),
        "histogram": histogram,
    }
