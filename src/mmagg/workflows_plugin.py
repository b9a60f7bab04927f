"""mmagg's block as a Roboflow Workflows plugin: ``WORKFLOWS_PLUGINS=mmagg.workflows_plugin``.

Inference loads a plugin by importing this module and calling :func:`load_blocks` (blocks),
:func:`load_kinds` (none here) and reading :data:`REGISTERED_INITIALIZERS` (the block's
constructor arguments). The block is mmagg's ``ModelMonitoringInferenceAggregatorBlockV1``
under its own type id, ``mmagg/model_monitoring_inference_aggregator@v1`` (a plugin may not
reuse a core block's), so a workflow can run it beside or instead of Roboflow's.

Inference checks that a plugin's blocks subclass its ``WorkflowBlock`` and reads the
manifest's selectors from its own types, so the block and manifest classes are built on
first use, only where ``inference`` is installed; importing this module never needs it.

Inference resolves a plugin block's constructor arguments from
``init_parameters["mmagg.workflows_plugin.<name>"]`` first, then from
:data:`REGISTERED_INITIALIZERS`, and only then from an unprefixed ``init_parameters[<name>]``.
The ``workflows_core.*`` values that ``InferencePipeline`` passes (api key, executor) do not
reach plugins, hence the initializers:

- ``api_key``: ``ROBOFLOW_API_KEY``, else ``API_KEY`` (read when the workflow compiles);
- ``cache``: inference's process cache (``inference.core.cache.cache``), else mmagg's;
- ``background_tasks``, ``thread_pool_executor``: ``None`` (mmagg's own background sender);
- ``disable_sinks``: ``MMAGG_DISABLE_SINKS`` (``1``/``true``), else ``False``.

The block also reads ``API_BASE_URL`` (e.g. a local ``mmagg serve``), ``DEVICE_ID`` and
``MMAGG_REDIS_URL`` from the environment, as mmagg's block does everywhere.

Example:
    >>> import mmagg.workflows_plugin as plugin
    >>> sorted(plugin.REGISTERED_INITIALIZERS)
    ['api_key', 'background_tasks', 'cache', 'disable_sinks', 'thread_pool_executor']
    >>> plugin.PLUGIN_BLOCK_TYPE
    'mmagg/model_monitoring_inference_aggregator@v1'
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mmagg.aggregator import validate_frequency
from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1
from mmagg.cache import Cache, MemoryCache
from mmagg.client import resolve_api_key

__all__ = [
    "PLUGIN_BLOCK_TYPE",
    "REGISTERED_INITIALIZERS",
    "load_blocks",
    "load_kinds",
]

PLUGIN_BLOCK_TYPE = "mmagg/model_monitoring_inference_aggregator@v1"
DISABLE_SINKS_ENV = "MMAGG_DISABLE_SINKS"

_FALLBACK_CACHE = MemoryCache()


def _api_key() -> str | None:
    return resolve_api_key(None) or None


def _cache() -> Cache:
    try:
        from inference.core.cache import cache  # type: ignore[import-not-found]
    except ImportError:
        return _FALLBACK_CACHE
    return cache  # type: ignore[no-any-return]  # the server's cache (memory or Redis)


def _disable_sinks() -> bool:
    return os.environ.get(DISABLE_SINKS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


#: Constructor arguments the execution engine does not hand to plugin blocks.
REGISTERED_INITIALIZERS: dict[str, Any] = {
    "api_key": _api_key,
    "cache": _cache,
    "background_tasks": None,
    "thread_pool_executor": None,
    "disable_sinks": _disable_sinks,
}


def load_kinds() -> list[Any]:
    """The plugin defines no kinds of its own."""
    return []


def load_blocks() -> list[type[Any]]:
    """The plugin's blocks: mmagg's aggregator block under ``PLUGIN_BLOCK_TYPE``.

    Raises:
        ImportError: ``inference`` is not installed (inference reports it as a plugin
            loading error naming this module).
    """
    return [_plugin_block()]


@functools.cache
def _plugin_block() -> type[Any]:
    try:
        from inference.core.workflows.execution_engine.entities.base import (  # type: ignore[import-not-found]
            OutputDefinition,
        )
        from inference.core.workflows.execution_engine.entities.types import (  # type: ignore[import-not-found]
            BOOLEAN_KIND,
            CLASSIFICATION_PREDICTION_KIND,
            INSTANCE_SEGMENTATION_PREDICTION_KIND,
            INTEGER_KIND,
            KEYPOINT_DETECTION_PREDICTION_KIND,
            OBJECT_DETECTION_PREDICTION_KIND,
            ROBOFLOW_MODEL_ID_KIND,
            STRING_KIND,
            Selector,
        )
        from inference.core.workflows.prototypes.block import (  # type: ignore[import-not-found]
            WorkflowBlock,
            WorkflowBlockManifest,
        )
    except ImportError as error:
        raise ImportError(
            "mmagg.workflows_plugin runs inside Roboflow inference: install `inference` "
            "(or `inference-core`) in this environment to load its blocks"
        ) from error
    from typing import Literal, Union

    from pydantic import ConfigDict, Field, field_validator

    prediction_kinds = [
        OBJECT_DETECTION_PREDICTION_KIND,
        INSTANCE_SEGMENTATION_PREDICTION_KIND,
        KEYPOINT_DETECTION_PREDICTION_KIND,
        CLASSIFICATION_PREDICTION_KIND,
    ]

    class MmaggBlockManifest(WorkflowBlockManifest):  # type: ignore[misc,valid-type]
        """mmagg's Model Monitoring aggregator, as a plugin step."""

        model_config = ConfigDict(
            json_schema_extra={
                "name": "Model Monitoring Inference Aggregator (mmagg)",
                "version": "v1",
                "short_description": "Report the most confident prediction per class to Model "
                "Monitoring every few seconds, aggregated on arrival.",
                "long_description": "mmagg's re-implementation of "
                "roboflow_core/model_monitoring_inference_aggregator@v1: same inputs, outputs "
                "and messages; keeps O(classes) state, retries, never loses a failed window, "
                "and can share state across processes with MMAGG_REDIS_URL.",
                "license": "Apache-2.0",
                "block_type": "sink",
            }
        )
        type: Literal["mmagg/model_monitoring_inference_aggregator@v1"]  # type: ignore[assignment]
        predictions: Selector(kind=prediction_kinds) = Field(  # type: ignore[valid-type]
            description="Model predictions to aggregate.",
            examples=["$steps.object_detection.predictions"],
        )
        model_id: Union[str, Selector(kind=[ROBOFLOW_MODEL_ID_KIND])] = Field(  # type: ignore[valid-type]  # noqa: UP007
            description="Model id ('project/version') the predictions are reported under.",
            examples=["my_project/3", "$inputs.model_id"],
        )
        frequency: Union[int, Selector(kind=[INTEGER_KIND, STRING_KIND])] = Field(  # type: ignore[valid-type]  # noqa: UP007
            default=5, description="Reporting interval in seconds (at least 1).", examples=[5]
        )
        unique_aggregator_key: str = Field(
            description="Unique key of this aggregation session.",
            examples=["session-1v73kdhfse"],
            json_schema_extra={"hidden": True},
        )
        fire_and_forget: Union[bool, Selector(kind=[BOOLEAN_KIND])] = Field(  # type: ignore[valid-type]  # noqa: UP007
            default=True,
            description="Report in the background (True) or wait for the result (False).",
            examples=[True],
        )

        @field_validator("frequency")
        @classmethod
        def _frequency_at_least_one(cls, value: Any) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                validate_frequency(value)
            return value

        @field_validator("model_id")
        @classmethod
        def _model_id_not_empty(cls, value: Any) -> Any:
            if value == "":
                raise ValueError("model_id: expected a non-empty string")
            return value

        @classmethod
        def describe_outputs(cls) -> list[Any]:
            return [
                OutputDefinition(name="error_status", kind=[BOOLEAN_KIND]),
                OutputDefinition(name="message", kind=[STRING_KIND]),
            ]

        @classmethod
        def get_execution_engine_compatibility(cls) -> str | None:
            return ">=1.3.0,<2.0.0"

    class MmaggModelMonitoringInferenceAggregatorBlockV1(
        ModelMonitoringInferenceAggregatorBlockV1,
        WorkflowBlock,  # type: ignore[misc,valid-type]
    ):
        """mmagg's block for inference's execution engine (see :mod:`mmagg.workflows_plugin`)."""

        @classmethod
        def get_manifest(cls) -> type[Any]:  # type: ignore[override]
            return MmaggBlockManifest

    return MmaggModelMonitoringInferenceAggregatorBlockV1
