"""The report payload the backend accepts (docs/wire-format.md), as pydantic v2 models.

Extra keys are ignored rather than rejected so that a newer client never breaks an older
backend; every known key is type-checked strictly enough that a 422 names the field.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from mmagg.wire import HISTOGRAM_BUCKETS, MAX_RESULTS, MAX_STRING, SYSTEM_INFO_KEYS

# The client and the backend speak one wire format: the same lists on both sides.
SYSTEM_INFO_FIELDS = SYSTEM_INFO_KEYS

ShortStr = Annotated[str, Field(max_length=MAX_STRING)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ResultStats(_Model):
    """Per-class statistics of every prediction in the window (extension)."""

    count: Annotated[int, Field(ge=0)]
    sum: FiniteFloat
    min: FiniteFloat
    max: FiniteFloat
    histogram: Annotated[
        list[Annotated[int, Field(ge=0)]],
        Field(min_length=HISTOGRAM_BUCKETS, max_length=HISTOGRAM_BUCKETS),
    ]

    @field_validator("histogram")
    @classmethod
    def _histogram_sums_to_count(cls, value: list[int], info: Any) -> list[int]:
        count = info.data.get("count")
        if count is not None and sum(value) != count:
            raise ValueError(f"expected the buckets to sum to count={count}, got {sum(value)}")
        return value


class InferenceResult(_Model):
    """One sampled prediction: the most confident one of its class in the window."""

    class_name: ShortStr = ""
    confidence: FiniteFloat = 0.0
    inference_id: ShortStr | None = None
    model_type: ShortStr | None = None
    model_id: ShortStr
    source_id: ShortStr | None = None
    stats: ResultStats | None = None


class MmaggExtension(_Model):
    """Top-level `mmagg` extension object."""

    frequency: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    aggregator_key: ShortStr | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None


class Report(_Model):
    """One POST to `/{workspace}/inference-stats`."""

    timestamp: datetime
    source: ShortStr | None = None
    source_info: ShortStr | None = None
    device_id: ShortStr | None = None
    inference_server_version: ShortStr | None = None
    platform: ShortStr | None = None
    platform_release: ShortStr | None = None
    platform_version: ShortStr | None = None
    architecture: ShortStr | None = None
    hostname: ShortStr | None = None
    ip_address: ShortStr | None = None
    mac_address: ShortStr | None = None
    processor: ShortStr | None = None
    inference_results: Annotated[list[InferenceResult], Field(max_length=MAX_RESULTS)]
    mmagg: MmaggExtension | None = None

    @field_validator("timestamp")
    @classmethod
    def _naive_is_utc(cls, value: datetime) -> datetime:
        # The original client sends datetime.now().isoformat(): naive, read as UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def system_info(self) -> dict[str, str]:
        """The system-info keys the client could read, as sent."""
        return {k: v for k in SYSTEM_INFO_FIELDS if (v := getattr(self, k)) is not None}


REPORT_ADAPTER: TypeAdapter[Report] = TypeAdapter(Report)


class LoginRequest(_Model):
    """Body of `POST /dashboard/api/login`."""

    api_key: Annotated[str, Field(min_length=1, max_length=MAX_STRING)]


def error_details(errors: list[Any], secret: str | None = None) -> list[dict[str, Any]]:
    """Pydantic errors as JSON-safe dicts: field path, message, type; never the input.

    The received value is summarised by its type only, so a misplaced secret in the body is
    never echoed back.
    """
    details: list[dict[str, Any]] = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        field = ".".join(str(part) for part in loc) or "body"
        message = str(error.get("msg", "invalid value"))
        if secret:
            message = message.replace(secret, "***")
        received = type(error.get("input")).__name__ if "input" in error else None
        details.append(
            {
                "loc": loc,
                "field": field,
                "msg": message,
                "type": error.get("type", "value_error"),
                "received_type": received,
            }
        )
    return details
