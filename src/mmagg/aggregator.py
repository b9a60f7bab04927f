"""``Aggregator``: the face a video loop calls once per frame.

It validates its input and calls its :class:`~mmagg.reporter.Reporter`, which does the
per-frame step; :func:`mmagg.reporter.open_reporter` (also used by the block) finds or
builds that reporter for the tenant (backend URL + API key) and aggregator key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mmagg._secrets import get_logger, redact
from mmagg.cache import Cache
from mmagg.client import RetryPolicy, resolve_api_key
from mmagg.outcomes import MISSING_API_KEY_MESSAGE
from mmagg.predictions import to_batch
from mmagg.reporter import (
    BackgroundTasksLike,
    Counters,
    ExecutorLike,
    open_reporter,
    validate_frequency,
)
from mmagg.stores import Store, resolve_store

if TYPE_CHECKING:
    import httpx

__all__ = ["MISSING_API_KEY_MESSAGE", "Aggregator", "open_reporter", "validate_frequency"]

logger = get_logger("mmagg.aggregator")


class Aggregator:
    """Collect predictions per frame; every ``frequency`` seconds the best one per class
    is reported to Model Monitoring, in the background by default.

    Args:
        model_id: the model the predictions come from, e.g. ``"my-project/3"``.
        frequency: reporting interval in whole seconds (≥ 1).
        api_key: Roboflow (or ``mmagg serve``) API key; else ``ROBOFLOW_API_KEY`` / ``API_KEY``.
        api_base_url: else ``API_BASE_URL``, else ``https://api.roboflow.com``.
        fire_and_forget: report from a background thread (``True``) or inside ``collect``.
        unique_aggregator_key: aggregators (and blocks) with the same key, backend URL and
            API key share one window and one interval; they must agree on ``frequency``,
            ``extensions``, ``device_id`` and the timeouts (else ``ConfigMismatchError``, a
            ``ValueError``). Another backend or API key never shares data, even with the
            same key.
        store: a :class:`~mmagg.stores.Store`, a Redis URL, or ``None`` (``MMAGG_REDIS_URL``,
            else process memory).
        per_source: keep one window per video source (``collect(..., source_id=)``).
        extensions: add mmagg's ``stats``/``source_id``/``mmagg`` keys to reports (for
            ``mmagg serve``; leave off for Roboflow's API).
        clock: wall-clock seconds (inject a simulated one in tests and replays).

    Raises:
        ValueError: an invalid argument (the message names it), a missing API key, or
            :class:`~mmagg.reporter.ConfigMismatchError`.

    Example:
        >>> import mmagg
        >>> agg = mmagg.Aggregator("demo/1", api_key="k", api_base_url="http://127.0.0.1:9")
        >>> agg.collect({"predictions": [{"class": "cat", "confidence": 0.9}]})["message"]
        'Not in reporting range, skipping report. (Ok)'
        >>> agg.counters.collected
        1
        >>> agg.close(timeout=0)  # nothing listens on port 9: the window is counted as dropped
        False
    """

    def __init__(
        self,
        model_id: str,
        frequency: float = 5,
        api_key: str | None = None,
        api_base_url: str | None = None,
        fire_and_forget: bool = True,
        *,
        unique_aggregator_key: str | None = None,
        store: Store | str | None = None,
        cache: Cache | None = None,
        device_id: str | None = None,
        per_source: bool = False,
        extensions: bool = False,
        request_timeout: float | None = None,
        flush_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
        self.model_id = model_id
        interval = validate_frequency(frequency)
        key = resolve_api_key(api_key)
        if not key:
            raise ValueError(MISSING_API_KEY_MESSAGE)
        self.fire_and_forget = fire_and_forget
        self.per_source = per_source
        self.key = unique_aggregator_key or f"aggregator:{model_id}:{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._reporter = open_reporter(
            self.key,
            store=resolve_store(store),
            api_key=key,
            api_base_url=api_base_url,
            frequency=interval,
            cache=cache,
            device=device_id,
            extensions=extensions,
            request_timeout=request_timeout,
            flush_timeout=flush_timeout,
            retry=retry,
            transport=transport,
            clock=clock,
        )
        self._reporter.start(clock())

    def __repr__(self) -> str:
        return (
            f"Aggregator(model_id={self.model_id!r}, frequency={self.frequency}, key={self.key!r})"
        )

    @property
    def frequency(self) -> int:
        """The reporting interval in seconds (its reporter's, fixed at construction)."""
        return self._reporter.frequency

    @property
    def counters(self) -> Counters:
        """What happened so far (a :class:`~mmagg.Counters` snapshot)."""
        return self._reporter.counters()

    def collect(
        self,
        predictions: object,
        *,
        model_id: str | None = None,
        source_id: str | None = None,
        background_tasks: BackgroundTasksLike | None = None,
        executor: ExecutorLike | None = None,
    ) -> dict[str, Any]:
        """Take one frame's predictions; report when the interval is due.

        Returns the block's result shape, ``{"error_status": bool, "message": str}``.

        Raises:
            TypeError, ValueError: ``predictions`` is not a supported shape (counted as
                rejected). Nothing else ever escapes: a monitoring failure is logged and
                counted, never raised into the video loop.
        """
        try:
            batch = to_batch(predictions)
        except (TypeError, ValueError):
            self._reporter.reject()
            raise
        try:
            error, message = self._reporter.step(
                batch,
                model_id=model_id or self.model_id,
                source_id=(source_id or "") if self.per_source else "",
                now=self._clock(),
                fire_and_forget=self.fire_and_forget,
                background_tasks=background_tasks,
                executor=executor,
            )
        except Exception as exc:  # never into the video loop
            logger.exception("mmagg: collect failed: %s", redact(str(exc)))
            self._reporter.drop("internal_error", len(batch) if batch is not None else 0)
            return {"error_status": True, "message": f"mmagg internal error: {redact(str(exc))}"}
        return {"error_status": error, "message": message}

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything collected so far; ``True`` when done within ``timeout`` seconds."""
        return self._reporter.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Send the last partial window (within ``timeout``, default ``MMAGG_FLUSH_TIMEOUT``)
        and stop. What could not be sent is counted in ``counters.dropped["shutdown"]``."""
        return self._reporter.close(timeout)

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
