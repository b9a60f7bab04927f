"""The Workflows block, with the original's contract (DESIGN §2).

``ModelMonitoringInferenceAggregatorBlockV1`` and its ``BlockManifest`` behave as
``roboflow_core/model_monitoring_inference_aggregator@v1``: same constructor, init
parameters, ``run()`` signature, result dicts, messages and cache keys. The window is
kept on arrival (no per-frame list), shared by every block instance with the same
``unique_aggregator_key`` in the process (or across processes with Redis).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mmagg._secrets import get_logger
from mmagg.aggregator import MISSING_API_KEY_MESSAGE, get_reporter, validate_frequency
from mmagg.cache import Cache
from mmagg.client import RetryPolicy, resolve_api_base_url
from mmagg.predictions import to_batch
from mmagg.reporter import MESSAGE_NOT_IN_RANGE, BackgroundTasksLike, ExecutorLike, Reporter
from mmagg.stores import Store, resolve_store

__all__ = [
    "BLOCK_TYPE",
    "BlockManifest",
    "ModelMonitoringInferenceAggregatorBlockV1",
    "last_report_time_cache_key",
]

BLOCK_TYPE = "roboflow_core/model_monitoring_inference_aggregator@v1"
DISABLED_MESSAGE = "Sink was disabled by parameter `disable_sinks`"
LAST_REPORT_TIME_CACHE_KEY_TEMPLATE = (
    "workflows:steps_cache:" + BLOCK_TYPE + ":{unique_aggregator_key}:last_report_time"
)

logger = get_logger("mmagg.block")

STEP_OUTPUT_SELECTOR = r"^\$steps\.[A-Za-z_0-9\-]+\.([A-Za-z_0-9\-]+|\*)$"
INPUT_SELECTOR = r"^\$inputs\.[A-Za-z_0-9\-]+$"
ANY_SELECTOR = r"^\$(steps\.[A-Za-z_0-9\-]+\.([A-Za-z_0-9\-]+|\*)|inputs\.[A-Za-z_0-9\-]+)$"

Selector = Annotated[str, StringConstraints(pattern=ANY_SELECTOR)]
NonEmptyString = Annotated[str, StringConstraints(min_length=1)]


def last_report_time_cache_key(unique_aggregator_key: str) -> str:
    """The original's cache key of the last report time.

    Example:
        >>> last_report_time_cache_key("k")
        'workflows:steps_cache:roboflow_core/model_monitoring_inference_aggregator@v1:k:last_report_time'
    """
    return LAST_REPORT_TIME_CACHE_KEY_TEMPLATE.format(unique_aggregator_key=unique_aggregator_key)


class BlockManifest(BaseModel):
    """The step definition of the block in a workflow JSON.

    Example:
        >>> BlockManifest.model_validate({
        ...     "name": "monitor", "type": BLOCK_TYPE,
        ...     "predictions": "$steps.object_detection.predictions",
        ...     "model_id": "my_project/3", "frequency": 3,
        ...     "unique_aggregator_key": "session-1v73kdhfse", "fire_and_forget": True,
        ... }).frequency
        3
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "name": "Model Monitoring Inference Aggregator",
            "version": "v1",
            "short_description": (
                "Periodically report an aggregated sample of predictions to Model Monitoring."
            ),
            "block_type": "sink",
        },
    )

    type: Literal["roboflow_core/model_monitoring_inference_aggregator@v1"]
    name: str = Field(description="Enter a unique identifier for this step.")
    predictions: Selector = Field(
        description="Model predictions (object detection, instance segmentation, keypoints, "
        "classification) to aggregate.",
        examples=["$steps.object_detection.predictions"],
    )
    model_id: Selector | NonEmptyString = Field(
        description="Model ID ('project/version') the predictions are reported under.",
        examples=["my_project/3", "$inputs.model_id"],
    )
    frequency: Annotated[int, Field(ge=1)] | Selector = Field(
        default=5,
        description="Reporting frequency in seconds (at least 1).",
        examples=[3, "$inputs.frequency"],
    )
    unique_aggregator_key: str = Field(
        description="Unique key of this aggregation session (tracks the last report time).",
        examples=["session-1v73kdhfse"],
        json_schema_extra={"hidden": True},
    )
    fire_and_forget: bool | Selector = Field(
        default=True,
        description="Report in the background (True) or wait for the result (False).",
        examples=[True, "$inputs.fire_and_forget"],
    )

    @classmethod
    def describe_outputs(cls) -> list[dict[str, Any]]:
        """The step's outputs: ``error_status`` (boolean) and ``message`` (string)."""
        return [
            {"name": "error_status", "kind": ["boolean"]},
            {"name": "message", "kind": ["string"]},
        ]

    @classmethod
    def get_execution_engine_compatibility(cls) -> str | None:
        return ">=1.3.0,<2.0.0"


class ModelMonitoringInferenceAggregatorBlockV1:
    """Aggregate predictions and report the most confident one per class every
    ``frequency`` seconds.

    Args:
        cache: any object with ``get(key)`` and ``set(key, value, expire=None)``; holds the
            interval clock and the workspace lookup (see :class:`mmagg.MemoryCache`).
        api_key: Roboflow API key (required unless ``disable_sinks``).
        background_tasks: FastAPI ``BackgroundTasks`` (one task per report), or ``None``.
        thread_pool_executor: a ``concurrent.futures`` executor, or ``None``; with neither,
            mmagg's own background sender reports.
        disable_sinks: send nothing.
        api_base_url: else ``API_BASE_URL``, else ``https://api.roboflow.com``.
        store: where windows live (default ``MMAGG_REDIS_URL``, else process memory).
        retry: backoff and overall deadline of one report (default 30 s).

    Example:
        >>> from mmagg import MemoryCache
        >>> block = ModelMonitoringInferenceAggregatorBlockV1(
        ...     cache=MemoryCache(), api_key="k", background_tasks=None,
        ...     thread_pool_executor=None, api_base_url="http://127.0.0.1:9")
        >>> block.run(fire_and_forget=True, predictions=None, frequency=5,
        ...           unique_aggregator_key="doc-example", model_id="demo/1")
        {'error_status': False, 'message': 'Not in reporting range, skipping report. (Ok)'}
    """

    def __init__(
        self,
        cache: Cache,
        api_key: str | None,
        background_tasks: BackgroundTasksLike | None,
        thread_pool_executor: ExecutorLike | None,
        disable_sinks: bool = False,
        *,
        api_base_url: str | None = None,
        store: Store | str | None = None,
        device_id: str | None = None,
        extensions: bool = False,
        request_timeout: float | None = None,
        flush_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not disable_sinks and not api_key:
            raise ValueError(MISSING_API_KEY_MESSAGE)
        self._cache = cache
        self._api_key = api_key or ""
        self._background_tasks = background_tasks
        self._thread_pool_executor = thread_pool_executor
        self._disable_sinks = disable_sinks
        self._api_base_url = resolve_api_base_url(api_base_url)
        self._store = resolve_store(store)
        self._device_id = device_id
        self._extensions = extensions
        self._request_timeout = request_timeout
        self._flush_timeout = flush_timeout
        self._retry = retry
        self._clock = clock
        self._reporters: dict[str, Reporter] = {}
        self._last_raw: dict[str, object] = {}
        self._last_epoch: dict[str, float] = {}

    def __repr__(self) -> str:  # never show the key
        return f"ModelMonitoringInferenceAggregatorBlockV1(api_base_url={self._api_base_url!r})"

    @classmethod
    def get_init_parameters(cls) -> list[str]:
        return ["api_key", "cache", "background_tasks", "thread_pool_executor", "disable_sinks"]

    @classmethod
    def get_manifest(cls) -> type[BlockManifest]:
        return BlockManifest

    def reporter(self, unique_aggregator_key: str) -> Reporter:
        """The (process-shared) reporter of an aggregator key: counters, flush, close."""
        reporter = self._reporters.get(unique_aggregator_key)
        if reporter is None or reporter._closing:
            reporter = get_reporter(
                unique_aggregator_key,
                store=self._store,
                api_key=self._api_key,
                api_base_url=self._api_base_url,
                cache=self._cache,
                device=self._device_id,
                extensions=self._extensions,
                request_timeout=self._request_timeout,
                flush_timeout=self._flush_timeout,
                retry=self._retry,
                clock=self._clock,
            )
            self._reporters[unique_aggregator_key] = reporter
        return reporter

    def run(
        self,
        fire_and_forget: bool,
        predictions: Any,
        frequency: int,
        unique_aggregator_key: str,
        model_id: str,
    ) -> dict[str, bool | str]:
        """Collect ``predictions``; report if ``frequency`` seconds passed since the last report.

        Returns ``{"error_status": bool, "message": str}`` with the original's messages.
        """
        if self._disable_sinks:
            return {"error_status": False, "message": DISABLED_MESSAGE}
        interval = validate_frequency(frequency)
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
        reporter = self.reporter(unique_aggregator_key)
        reporter.frequency = interval
        try:
            batch = to_batch(predictions)
        except (TypeError, ValueError):
            reporter.tally.add("rejected")
            raise
        now = self._clock()
        try:
            if batch is not None:
                taken = self._store.window(unique_aggregator_key).add(
                    batch, model_id=model_id, seen_at=now
                )
                reporter.tally.add("collected", taken)
            if self._store.shared:
                # One interval for all processes: the store's clock decides (no I/O here).
                in_range = reporter.should_claim(interval)
            else:
                in_range = self._is_in_reporting_range(unique_aggregator_key, interval, now)
            if not in_range:
                return {"error_status": False, "message": MESSAGE_NOT_IN_RANGE}
            if not self._store.shared:
                reporter.submit(self._store.take(unique_aggregator_key))
            error_status, message = reporter.dispatch(
                fire_and_forget=bool(fire_and_forget),
                frequency=interval,
                background_tasks=self._background_tasks,
                executor=self._thread_pool_executor,
            )
            self._cache.set(
                last_report_time_cache_key(unique_aggregator_key),
                datetime.fromtimestamp(self._clock()).isoformat(),
            )
        except Exception as exc:  # never into the workflow: log, count, say so
            logger.exception("mmagg: block run failed")
            reporter.tally.drop("internal_error", len(batch) if batch is not None else 0)
            return {
                "error_status": True,
                "message": f"Error while uploading inference data. Error type: "
                f"{type(exc).__name__}. Details: internal error (see logs)",
            }
        return {"error_status": error_status, "message": message}

    def _is_in_reporting_range(self, key: str, frequency: int, now: float) -> bool:
        cache_key = last_report_time_cache_key(key)
        raw = self._cache.get(cache_key)
        if raw is None or raw != self._last_raw.get(cache_key):
            parsed = _parse_time(raw)
            if parsed is None:
                self._cache.set(cache_key, datetime.fromtimestamp(now).isoformat())
                return False
            # Parsed once per value written; elapsed time is then a float subtraction.
            self._last_raw[cache_key] = raw
            self._last_epoch[cache_key] = parsed.timestamp()
        return int(now - self._last_epoch[cache_key]) >= frequency


def _parse_time(raw: object) -> datetime | None:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        logger.warning("mmagg: unreadable last report time in the cache, restarting the interval")
        return None
    if parsed.tzinfo is not None:  # compare in local naive time, as the original stores it
        parsed = parsed.astimezone().replace(tzinfo=None)
    return parsed
