"""``Aggregator``: the facade a video loop calls once per frame."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mmagg._secrets import get_logger, redact
from mmagg.cache import Cache, MemoryCache
from mmagg.client import ModelMonitoringClient, RetryPolicy, resolve_api_base_url, resolve_api_key
from mmagg.predictions import to_batch
from mmagg.reporter import (
    MESSAGE_NOT_IN_RANGE,
    BackgroundTasksLike,
    Counters,
    ExecutorLike,
    Reporter,
)
from mmagg.stores import Store, resolve_store

if TYPE_CHECKING:
    import httpx

__all__ = ["MISSING_API_KEY_MESSAGE", "Aggregator", "get_reporter", "validate_frequency"]

MISSING_API_KEY_MESSAGE = (
    "ModelMonitoringInferenceAggregator block cannot run without Roboflow API key. "
    "If you do not know how to get API key - visit "
    "https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key to learn how "
    "to retrieve one."
)

logger = get_logger("mmagg.aggregator")

_PROCESS_CACHE = MemoryCache()
_REPORTERS: dict[tuple[int, str], Reporter] = {}
_REPORTERS_LOCK = threading.Lock()


def validate_frequency(frequency: object) -> int:
    """A whole number of seconds ≥ 1 (a selector may deliver ``"5"``).

    Example:
        >>> validate_frequency("5")
        5
        >>> validate_frequency(0)
        Traceback (most recent call last):
        ...
        ValueError: frequency: expected a whole number of seconds >= 1, got 0
    """
    if type(frequency) is int and frequency >= 1:  # the common case, first
        return frequency
    value: Any = frequency
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isdigit() else text
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"frequency: expected a whole number of seconds >= 1, got {frequency!r}")
    return value


def get_reporter(
    key: str,
    *,
    store: Store,
    api_key: str,
    api_base_url: str | None,
    cache: Cache | None = None,
    device: str | None = None,
    extensions: bool = False,
    request_timeout: float | None = None,
    flush_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Reporter:
    """The process's one reporter for an aggregator key (created on first use)."""
    registry_key = (id(store), key)
    with _REPORTERS_LOCK:
        reporter = _REPORTERS.get(registry_key)
        if reporter is not None and not reporter._closing and reporter._pid == os.getpid():
            return reporter
        # Forget closed reporters: an application that makes (and closes) an aggregator per
        # video file must not keep every reporter and its HTTP client for the process's life.
        for stale in [k for k, r in _REPORTERS.items() if r._closing]:
            del _REPORTERS[stale]
        base_url = resolve_api_base_url(api_base_url)
        workspace_cache = cache if cache is not None else _PROCESS_CACHE

        def make_client(on_retry: Callable[[], None]) -> ModelMonitoringClient:
            return ModelMonitoringClient(
                api_key,
                api_base_url=base_url,
                request_timeout=request_timeout,
                retry=retry,
                cache=workspace_cache,
                transport=transport,
                on_retry=on_retry,
            )

        reporter = Reporter(
            key,
            store=store,
            client_factory=make_client,
            device=device,
            extensions=extensions,
            flush_timeout=flush_timeout,
            clock=clock,
        )
        _REPORTERS[registry_key] = reporter
    reporter.prepare()
    return reporter


def _forget_reporters_in_child() -> None:
    global _REPORTERS_LOCK
    _REPORTERS.clear()
    _REPORTERS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reporters_in_child)


class Aggregator:
    """Collect predictions per frame; every ``frequency`` seconds the best one per class
    is reported to Model Monitoring, in the background by default.

    Args:
        model_id: the model the predictions come from, e.g. ``"my-project/3"``.
        frequency: reporting interval in whole seconds (≥ 1).
        api_key: Roboflow (or ``mmagg serve``) API key; else ``ROBOFLOW_API_KEY`` / ``API_KEY``.
        api_base_url: else ``API_BASE_URL``, else ``https://api.roboflow.com``.
        fire_and_forget: report from a background thread (``True``) or inside ``collect``.
        unique_aggregator_key: aggregators (and blocks) with the same key share one window.
        store: a :class:`~mmagg.stores.Store`, a Redis URL, or ``None`` (``MMAGG_REDIS_URL``,
            else process memory).
        per_source: keep one window per video source (``collect(..., source_id=)``).
        extensions: add mmagg's ``stats``/``source_id``/``mmagg`` keys to reports (for
            ``mmagg serve``; leave off for Roboflow's API).
        clock: wall-clock seconds (inject a simulated one in tests and replays).

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
        self.frequency = validate_frequency(frequency)
        key = resolve_api_key(api_key)
        if not key:
            raise ValueError(MISSING_API_KEY_MESSAGE)
        self.fire_and_forget = fire_and_forget
        self.per_source = per_source
        self.key = unique_aggregator_key or f"aggregator:{model_id}:{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._store = resolve_store(store)
        self._reporter = get_reporter(
            self.key,
            store=self._store,
            api_key=key,
            api_base_url=api_base_url,
            cache=cache,
            device=device_id,
            extensions=extensions,
            request_timeout=request_timeout,
            flush_timeout=flush_timeout,
            retry=retry,
            transport=transport,
            clock=clock,
        )
        self._reporter.frequency = self.frequency
        self._last_report = clock()

    def __repr__(self) -> str:
        return (
            f"Aggregator(model_id={self.model_id!r}, frequency={self.frequency}, key={self.key!r})"
        )

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
            self._reporter.tally.add("rejected")
            raise
        now = self._clock()
        try:
            if batch is not None:
                taken = self._store.window(self.key).add(
                    batch,
                    model_id=model_id or self.model_id,
                    source_id=(source_id or "") if self.per_source else "",
                    seen_at=now,
                )
                self._reporter.tally.add("collected", taken)
            if self._store.shared:
                in_range = self._reporter.should_claim(self.frequency)
            else:
                in_range = int(now - self._last_report) >= self.frequency
            if not in_range:
                return {"error_status": False, "message": MESSAGE_NOT_IN_RANGE}
            self._last_report = now
            if not self._store.shared:
                self._reporter.submit(self._store.take(self.key))
            error, message = self._reporter.dispatch(
                fire_and_forget=self.fire_and_forget,
                frequency=self.frequency,
                background_tasks=background_tasks,
                executor=executor,
            )
        except Exception as exc:  # never into the video loop
            logger.exception("mmagg: collect failed: %s", redact(str(exc)))
            self._reporter.tally.drop("internal_error", len(batch) if batch is not None else 0)
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
