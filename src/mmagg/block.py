"""The Workflows block, with the original's contract (DESIGN §2).

``ModelMonitoringInferenceAggregatorBlockV1`` and its ``BlockManifest`` behave as
``roboflow_core/model_monitoring_inference_aggregator@v1``: same constructor, init
parameters, ``run()`` signature, result dicts, messages and cache keys. The window is
kept on arrival (no per-frame list), shared by every block instance with the same
``unique_aggregator_key``, backend URL and API key in the process (or across processes
with Redis); another backend or API key never shares it. The interval clock stays in the
injected cache under the original's key (:class:`~mmagg.stores.cache_clock.CacheClock`),
which carries no tenant: two tenants naming their aggregator alike share that clock, as
two original blocks would, never their data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mmagg._secrets import get_logger
from mmagg.cache import Cache
from mmagg.client import RetryPolicy, resolve_api_base_url
from mmagg.outcomes import MISSING_API_KEY_MESSAGE
from mmagg.predictions import to_batch
from mmagg.reporter import (
    BackgroundTasksLike,
    ExecutorLike,
    Reporter,
    open_reporter,
    validate_frequency,
)
from mmagg.stores import Store, resolve_store
from mmagg.stores.cache_clock import CacheClock

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


def _hold_pool(block: object, api_base_url: str, api_key: str) -> None:
    """The one-off set-up, in the constructor rather than on the first ``run()``: httpx, the
    TLS context, the system info and this tenant's connection pool, held while the block
    lives so that the reporters its runs open (one per aggregator key) find it built."""
    import weakref

    from mmagg._http import lease
    from mmagg.tenant import Tenant

    held = lease(Tenant.of(api_base_url, api_key))
    # Not at exit: the reporters' final flush (after finalizers) may still need it.
    weakref.finalize(block, held.release).atexit = False


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
        self._clocks: dict[str, CacheClock] = {}
        if not disable_sinks:
            _hold_pool(self, self._api_base_url, self._api_key)

    def __repr__(self) -> str:  # never show the key
        return f"ModelMonitoringInferenceAggregatorBlockV1(api_base_url={self._api_base_url!r})"

    @classmethod
    def get_init_parameters(cls) -> list[str]:
        return ["api_key", "cache", "background_tasks", "thread_pool_executor", "disable_sinks"]

    @classmethod
    def get_manifest(cls) -> type[BlockManifest]:
        return BlockManifest

    def reporter(self, unique_aggregator_key: str, frequency: int | None = None) -> Reporter:
        """The (process-shared) reporter of an aggregator key: counters, flush, close.

        ``frequency``: the interval it must have (default: the one it has, else 5).

        Raises:
            ConfigMismatchError: the key's open reporter (same backend and API key) has
                another frequency or other settings.
        """
        reporter = self._reporters.get(unique_aggregator_key)
        if (
            reporter is None
            or reporter.closed
            or (frequency is not None and frequency != reporter.frequency)
        ):
            if frequency is None:
                frequency = reporter.frequency if reporter is not None else 5
            reporter = open_reporter(
                unique_aggregator_key,
                store=self._store,
                api_key=self._api_key,
                api_base_url=self._api_base_url,
                frequency=frequency,
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

    def _interval_clock(self, unique_aggregator_key: str) -> CacheClock:
        clock = self._clocks.get(unique_aggregator_key)
        if clock is None:
            clock = self._clocks[unique_aggregator_key] = CacheClock(
                self._cache, self._store, last_report_time_cache_key(unique_aggregator_key)
            )
        return clock

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

        Raises:
            ValueError: ``frequency`` or ``model_id`` is invalid, ``predictions`` has an
                unsupported shape, or (:class:`~mmagg.reporter.ConfigMismatchError`) the
                key is already reporting to this backend with this API key at another
                frequency or with other settings.
        """
        if self._disable_sinks:
            return {"error_status": False, "message": DISABLED_MESSAGE}
        interval = validate_frequency(frequency)
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
        reporter = self.reporter(unique_aggregator_key, interval)
        try:
            batch = to_batch(predictions)
        except (TypeError, ValueError):
            reporter.reject()
            raise
        try:
            error_status, message = reporter.step(
                batch,
                model_id=model_id,
                now=self._clock(),
                fire_and_forget=bool(fire_and_forget),
                interval=self._interval_clock(unique_aggregator_key),
                background_tasks=self._background_tasks,
                executor=self._thread_pool_executor,
            )
        except Exception as exc:  # never into the workflow: log, count, say so
            logger.exception("mmagg: block run failed")
            reporter.drop("internal_error", len(batch) if batch is not None else 0)
            return {
                "error_status": True,
                "message": f"Error while uploading inference data. Error type: "
                f"{type(exc).__name__}. Details: internal error (see logs)",
            }
        return {"error_status": error_status, "message": message}
