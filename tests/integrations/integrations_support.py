"""Helpers of the integration tests: the backend handle, a video frame, retry policies."""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mmagg.client import RetryPolicy

with warnings.catch_warnings():
    # supervision warns at import when OpenCV is missing; it uses its numpy fallback.
    warnings.simplefilter("ignore")
    import supervision as sv  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SAMPLE = EXAMPLES / "sample_predictions.jsonl"

#: Fast retries: tests should not wait for the production backoff.
QUICK_RETRY = RetryPolicy(deadline=2.0, base_delay=0.01, max_delay=0.05, max_attempts=2)
NO_RETRY = RetryPolicy(deadline=2.0, base_delay=0.01, max_delay=0.05, max_attempts=1)


@dataclass
class Backend:
    """`mmagg serve` running in this process over real HTTP, on SQLite."""

    base_url: str
    db: Any

    def new_workspace(self) -> tuple[str, str]:
        """A fresh workspace and its key (ingest and read: the tests read back what they
        sent), so tests sharing the server stay independent."""
        workspace = f"ws-{uuid.uuid4().hex[:12]}"
        return workspace, self.db.create_key(workspace, {"ingest", "read"})

    def get(self, workspace: str, key: str, endpoint: str, **params: Any) -> Any:
        """GET one of the dashboard JSON endpoints of a workspace."""
        response = httpx.get(
            f"{self.base_url}/{workspace}/api/{endpoint}",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()


@dataclass
class VideoFrame:
    """What `inference`'s VideoFrame offers the sink (read duck-typed)."""

    source_id: int | None
    frame_id: int
    frame_timestamp: Any = None
