"""The report body: exactly the keys of the original (DESIGN §2), extensions on request."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from mmagg._version import __version__
from mmagg.wire import EXTENSION_KEY, SOURCE, SOURCE_INFO, SYSTEM_INFO_KEYS

__all__ = [
    "SOURCE",
    "SOURCE_INFO",
    "SYSTEM_INFO_KEYS",
    "build_payload",
    "device_id",
    "encode_json",
    "inference_server_version",
    "system_info",
]


def _mac_address() -> str:
    return ":".join(re.findall("..", f"{uuid.getnode():012x}"))


_READERS: dict[str, Callable[[], str]] = {
    "platform": platform.system,
    "platform_release": platform.release,
    "platform_version": platform.version,
    "architecture": platform.machine,
    "hostname": socket.gethostname,
    "ip_address": lambda: socket.gethostbyname(socket.gethostname()),
    "mac_address": _mac_address,
    "processor": platform.processor,
}


@functools.cache
def system_info() -> dict[str, str]:
    """The system-info keys, read once per process; a key that cannot be read is omitted.

    Example:
        >>> set(system_info()) <= set(SYSTEM_INFO_KEYS)
        True
    """
    info = {}
    for key in SYSTEM_INFO_KEYS:
        try:
            value = _READERS[key]()
        except Exception:  # each key on its own: one failing lookup must not hide the rest
            continue
        if isinstance(value, str):
            info[key] = value
    return info


@functools.cache
def inference_server_version() -> str:
    """Roboflow ``inference``'s version when installed, else mmagg's."""
    from importlib import metadata

    try:
        return metadata.version("inference")
    except metadata.PackageNotFoundError:
        return __version__


def device_id(explicit: str | None = None) -> str:
    """The argument, else ``DEVICE_ID``, else the host name."""
    return explicit or os.environ.get("DEVICE_ID") or socket.gethostname()


def encode_json(body: Any) -> bytes:
    """The body as sent: compact UTF-8 JSON; NaN and infinities are refused (ValueError),
    as the backend would refuse them.

    Example:
        >>> encode_json({"class_name": "café", "confidence": 0.5})
        b'{"class_name":"caf\\xc3\\xa9","confidence":0.5}'
    """
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def build_payload(
    results: Sequence[Mapping[str, Any]],
    *,
    device: str | None = None,
    timestamp: datetime | None = None,
    extension: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One report body.

    Without ``extension`` the keys are exactly those of the original block: timestamp,
    source, source_info, device_id, inference_server_version, the system-info keys and
    inference_results. ``extension`` adds the ``mmagg`` object of docs/wire-format.md.

    Example:
        >>> body = build_payload([], device="cam-host")
        >>> body["source"], body["source_info"], body["device_id"]
        ('workflow', 'ModelMonitoringInferenceAggregatorBlockV1', 'cam-host')
    """
    when = timestamp or datetime.now(timezone.utc)
    body: dict[str, Any] = {
        "timestamp": when.isoformat(),
        "source": SOURCE,
        "source_info": SOURCE_INFO,
        "device_id": device_id(device),
        "inference_server_version": inference_server_version(),
    }
    body.update(system_info())
    body["inference_results"] = [dict(item) for item in results]
    if extension is not None:
        body[EXTENSION_KEY] = dict(extension)
    return body
