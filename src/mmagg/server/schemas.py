"""The report payload the backend accepts (docs/wire-format.md), as pydantic v2 models.

Extra keys are ignored rather than rejected so that a newer client never breaks an older
backend; every known key is type-checked strictly enough that a 422 names the field.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Annotated, Any

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from mmagg.server.bounds import (
    CONFIDENCE_MAX,
    CONFIDENCE_MIN,
    MAX_FREQUENCY_SECONDS,
    MAX_REPORT_PREDICTIONS,
    MAX_STRING_CHARS,
    check_text,
    utc_aware,
)
from mmagg.wire import HISTOGRAM_BUCKETS, MAX_RESULTS, MAX_STRING, SYSTEM_INFO_KEYS

assert MAX_STRING == MAX_STRING_CHARS  # one bound, named on both sides of the wire

# The client and the backend speak one wire format: the same lists on both sides.
SYSTEM_INFO_FIELDS = SYSTEM_INFO_KEYS

ShortStr = Annotated[str, Field(max_length=MAX_STRING), AfterValidator(check_text)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Confidence = Annotated[float, Field(ge=CONFIDENCE_MIN, le=CONFIDENCE_MAX, allow_inf_nan=False)]
# Relative slack for comparing a float sum with count * min / count * max.
_SUM_SLACK = 1e-9


def _bucket(confidence: float) -> int:
    # The bucket rule of docs/wire-format.md, computed as the client computes it.
    return min(max(int(confidence * HISTOGRAM_BUCKETS), 0), HISTOGRAM_BUCKETS - 1)


def _first_nonzero(histogram: list[int]) -> int | None:
    # Plain loops: these checks run for every result of every report (ingest's hot path).
    for i, n in enumerate(histogram):
        if n:
            return i
    return None


def _last_nonzero(histogram: list[int]) -> int | None:
    for i in range(len(histogram) - 1, -1, -1):
        if histogram[i]:
            return i
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ResultStats(_Model):
    """Per-class statistics of every prediction in the window (extension)."""

    # At least the sampled prediction itself: a count of 0 would divide by zero in reads.
    # Fields are validated in this order, so each check sees the fields it depends on.
    count: Annotated[int, Field(ge=1, le=MAX_REPORT_PREDICTIONS, strict=True)]
    histogram: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_REPORT_PREDICTIONS, strict=True)]],
        Field(min_length=HISTOGRAM_BUCKETS, max_length=HISTOGRAM_BUCKETS),
    ]
    min: Confidence
    max: Confidence
    sum: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("histogram")
    @classmethod
    def _histogram_sums_to_count(cls, value: list[int], info: ValidationInfo) -> list[int]:
        count = info.data.get("count")
        if count is not None and sum(value) != count:
            raise ValueError(f"expected the buckets to sum to count={count}, got {sum(value)}")
        return value

    @field_validator("min")
    @classmethod
    def _min_in_first_bucket(cls, value: float, info: ValidationInfo) -> float:
        histogram = info.data.get("histogram")
        first = _first_nonzero(histogram) if histogram else None
        if first is not None:
            if _bucket(value) != first:
                raise ValueError(
                    f"expected a value in the first non-empty histogram bucket, [{first / 10:g}, "
                    f"{(first + 1) / 10:g}), got {value!r}"
                )
        return value

    @field_validator("max")
    @classmethod
    def _max_in_last_bucket(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min")
        if low is not None and value < low:
            raise ValueError(f"expected at least min={low!r}, got {value!r}")
        histogram = info.data.get("histogram")
        last = _last_nonzero(histogram) if histogram else None
        if last is not None:
            if _bucket(value) != last:
                upper = ")" if last < HISTOGRAM_BUCKETS - 1 else "]"
                raise ValueError(
                    f"expected a value in the last non-empty histogram bucket, [{last / 10:g}, "
                    f"{(last + 1) / 10:g}{upper}, got {value!r}"
                )
        return value

    @field_validator("sum")
    @classmethod
    def _sum_within_extremes(cls, value: float, info: ValidationInfo) -> float:
        data = info.data
        count, low, high = data.get("count"), data.get("min"), data.get("max")
        if count is None or low is None or high is None:
            return value
        if not (
            count * low * (1 - _SUM_SLACK) - _SUM_SLACK
            <= value
            <= count * high * (1 + _SUM_SLACK) + _SUM_SLACK
        ):
            raise ValueError(
                f"expected count * min <= sum <= count * max, i.e. within "
                f"[{count * low!r}, {count * high!r}], got {value!r}"
            )
        return value


class InferenceResult(_Model):
    """One sampled prediction: the most confident one of its class in the window."""

    class_name: ShortStr = ""
    # `stats` is validated before `confidence`, which must lie within its [min, max].
    stats: ResultStats | None = None
    confidence: Confidence = 0.0
    inference_id: ShortStr | None = None
    model_type: ShortStr | None = None
    # Non-empty: the per-model reads take the model id as a required, non-empty parameter.
    model_id: Annotated[ShortStr, Field(min_length=1)]
    source_id: ShortStr | None = None

    @field_validator("confidence")
    @classmethod
    def _sample_within_stats(cls, value: float, info: ValidationInfo) -> float:
        # The sample is one of the predictions the stats describe.
        stats = info.data.get("stats")
        if stats is not None and not stats.min <= value <= stats.max:
            raise ValueError(
                f"expected a value within stats [min, max] = [{stats.min!r}, {stats.max!r}], "
                f"got {value!r}"
            )
        return value


class MmaggExtension(_Model):
    """Top-level `mmagg` extension object."""

    frequency: (
        Annotated[float, Field(gt=0, le=MAX_FREQUENCY_SECONDS, allow_inf_nan=False)] | None
    ) = None
    aggregator_key: ShortStr | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None

    @field_validator("window_start", "window_end")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        return None if value is None else utc_aware(value)


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
    def _aware_in_utc(cls, value: datetime) -> datetime:
        # A naive value stays naive: the original client sends datetime.now().isoformat(),
        # local time of an unknown zone, and `bounds.place` files it at the receive time.
        return utc_aware(value)

    @field_validator("inference_results")
    @classmethod
    def _predictions_bounded(cls, value: list[InferenceResult]) -> list[InferenceResult]:
        total = sum(r.stats.count if r.stats is not None else 1 for r in value)
        if total > MAX_REPORT_PREDICTIONS:
            raise ValueError(
                f"expected at most {MAX_REPORT_PREDICTIONS} predictions in one report "
                f"(the sum of stats.count), got {total}"
            )
        return value

    def system_info(self) -> dict[str, str]:
        """The system-info keys the client could read, as sent."""
        return {k: v for k in SYSTEM_INFO_FIELDS if (v := getattr(self, k)) is not None}


REPORT_ADAPTER: TypeAdapter[Report] = TypeAdapter(Report)

# The same models for a body that is ASCII without any `\u` escape, whose strings
# `check_text` always accepts: no NUL (JSON strings hold no raw control characters), no
# lone surrogate (those need a `\u` escape), as many UTF-8 bytes as characters (and
# `max_length` bounds those). Validating such a body without the per-string Python call
# is the same validation, about a third cheaper; `parse_report` picks it.
_PlainStr = Annotated[str, Field(max_length=MAX_STRING)]


class _PlainResultStats(ResultStats):
    """`ResultStats` without its four Python field checks (the plain classmethods below
    replace the validators): `_stats_hold` makes the same checks in one loop per report,
    and a report that fails them is validated again by the full models for their errors."""

    @classmethod
    def _histogram_sums_to_count(cls, value: Any, info: Any = None) -> Any:
        return value

    @classmethod
    def _min_in_first_bucket(cls, value: Any, info: Any = None) -> Any:
        return value

    @classmethod
    def _max_in_last_bucket(cls, value: Any, info: Any = None) -> Any:
        return value

    @classmethod
    def _sum_within_extremes(cls, value: Any, info: Any = None) -> Any:
        return value


class _PlainInferenceResult(InferenceResult):
    stats: _PlainResultStats | None = None
    class_name: _PlainStr = ""
    inference_id: _PlainStr | None = None
    model_type: _PlainStr | None = None
    model_id: Annotated[_PlainStr, Field(min_length=1)]
    source_id: _PlainStr | None = None

    @classmethod
    def _sample_within_stats(cls, value: Any, info: Any = None) -> Any:
        return value  # checked by `_stats_hold`


def _stats_hold(report: Report) -> bool:
    """The checks of `ResultStats` and `InferenceResult._sample_within_stats`, for a report
    whose fields all validated: True when the full models would accept it too.

    One loop instead of five validator calls per result (each a Python call from pydantic's
    compiled code with its `info.data` dict): a fifth of validating an 8-result report.
    """
    slack = _SUM_SLACK
    for item in report.inference_results:
        stats = item.stats
        if stats is None:
            continue
        histogram, count, low, high = stats.histogram, stats.count, stats.min, stats.max
        if sum(histogram) != count:
            return False
        first = _first_nonzero(histogram)
        if first is not None and _bucket(low) != first:
            return False
        if high < low:
            return False
        last = _last_nonzero(histogram)
        if last is not None and _bucket(high) != last:
            return False
        if not (
            count * low * (1 - slack) - slack <= stats.sum <= count * high * (1 + slack) + slack
        ):
            return False
        if not low <= item.confidence <= high:
            return False
    return True


class _PlainMmaggExtension(MmaggExtension):
    aggregator_key: _PlainStr | None = None


class _PlainReport(Report):
    source: _PlainStr | None = None
    source_info: _PlainStr | None = None
    device_id: _PlainStr | None = None
    inference_server_version: _PlainStr | None = None
    platform: _PlainStr | None = None
    platform_release: _PlainStr | None = None
    platform_version: _PlainStr | None = None
    architecture: _PlainStr | None = None
    hostname: _PlainStr | None = None
    ip_address: _PlainStr | None = None
    mac_address: _PlainStr | None = None
    processor: _PlainStr | None = None
    inference_results: Annotated[  # type: ignore[assignment]  # a list of the subclass
        list[_PlainInferenceResult], Field(max_length=MAX_RESULTS)
    ]
    mmagg: _PlainMmaggExtension | None = None


_PLAIN_ADAPTER: TypeAdapter[_PlainReport] = TypeAdapter(_PlainReport)


def _plain_text(body: bytes) -> bool:
    """True when every string of JSON `body` is one `check_text` accepts, unread."""
    return body.isascii() and b"\\u" not in body


_RESULTS_ADAPTER: TypeAdapter[list[InferenceResult]] = TypeAdapter(list[InferenceResult])

#: Results validated per slice by `parse_report`; between slices the thread yields the GIL.
RESULTS_PER_SLICE = 250


class ReportInvalidError(ValueError):
    """A report body that failed validation; `errors` as pydantic lists them."""

    def __init__(self, errors: list[Any]) -> None:
        super().__init__(f"{len(errors)} validation errors")
        self.errors = errors


def parse_report(body: bytes, sliced_above: int = 32 * 1024) -> Report:
    """Validate a report body, in slices of `RESULTS_PER_SLICE` results when it is large.

    Validating 10,000 results takes a few hundred milliseconds of pydantic's compiled code,
    which holds the GIL throughout: run in a worker thread, it would still stall the event
    loop (and every other request) that long. Sliced, the thread hands the GIL over between
    slices (`time.sleep(0)`). The outcome and the errors (with their full `loc`) are those
    of `REPORT_ADAPTER.validate_json`. Raises `ReportInvalidError`.

    Example:
        >>> parse_report(b'{"timestamp": "2026-01-01T00:00:00Z", "inference_results": []}').mmagg
    """
    if len(body) <= sliced_above:
        if _plain_text(body):
            try:
                plain = _PLAIN_ADAPTER.validate_json(body)
            except ValidationError:
                pass  # the errors as the full models word them, below
            else:
                if _stats_hold(plain):
                    return plain
        try:
            return REPORT_ADAPTER.validate_json(body)
        except ValidationError as error:
            raise ReportInvalidError(error.errors(include_url=False)) from None
    try:
        raw = pydantic_core.from_json(body)
    except ValueError as error:
        # The same message validate_json gives, from the same parser.
        try:
            REPORT_ADAPTER.validate_json(body)
        except ValidationError as invalid:
            raise ReportInvalidError(invalid.errors(include_url=False)) from None
        raise ReportInvalidError(
            [{"loc": (), "msg": f"Invalid JSON: {error}", "type": "json_invalid"}]
        ) from None
    items = raw.get("inference_results") if isinstance(raw, dict) else None
    if not isinstance(items, list) or len(items) > MAX_RESULTS:
        # Wrong shape or too many: the whole-body validation says so, quickly.
        return _validate_whole(raw)
    errors: list[Any] = []
    try:
        head = REPORT_ADAPTER.validate_python({**raw, "inference_results": []})
    except ValidationError as error:
        head = None
        errors.extend(error.errors(include_url=False))
    validated: list[InferenceResult] = []
    for start in range(0, len(items), RESULTS_PER_SLICE):
        time.sleep(0)  # let the event loop run
        try:
            validated.extend(
                _RESULTS_ADAPTER.validate_python(items[start : start + RESULTS_PER_SLICE])
            )
        except ValidationError as error:
            for item in error.errors(include_url=False):
                loc = list(item.get("loc", ()))
                if loc and isinstance(loc[0], int):
                    loc[0] += start
                errors.append({**item, "loc": ("inference_results", *loc)})
    if not errors:
        try:
            Report._predictions_bounded(validated)
        except ValueError as error:
            errors.append(
                {
                    "loc": ("inference_results",),
                    "msg": f"Value error, {error}",
                    "type": "value_error",
                }
            )
    if errors or head is None:
        raise ReportInvalidError(errors)
    return head.model_copy(update={"inference_results": validated})


def _validate_whole(raw: Any) -> Report:
    try:
        return REPORT_ADAPTER.validate_python(raw)
    except ValidationError as error:
        raise ReportInvalidError(error.errors(include_url=False)) from None


class LoginRequest(_Model):
    """Body of `POST /dashboard/api/login`."""

    api_key: Annotated[str, Field(min_length=1, max_length=MAX_STRING), AfterValidator(check_text)]


def error_details(errors: list[Any], secret: str | None = None) -> list[dict[str, Any]]:
    """Pydantic errors as JSON-safe dicts: field path, message, type; never the input.

    A received string is summarised by its type only, so a misplaced secret in the body is
    never echoed back; a received number is named (`received`), since it carries no secret.
    """
    details: list[dict[str, Any]] = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        field = ".".join(str(part) for part in loc) or "body"
        message = str(error.get("msg", "invalid value"))
        if secret:
            message = message.replace(secret, "***")
        value = error.get("input")
        received = type(value).__name__ if "input" in error else None
        detail: dict[str, Any] = {
            "loc": loc,
            "field": field,
            "msg": message,
            "type": error.get("type", "value_error"),
            "received_type": received,
        }
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Numbers carry no secret: name the value that broke the bound.
            detail["received"] = value if math.isfinite(value) else str(value)
            detail["msg"] = f"{message}, got {value!r}"
        details.append(detail)
    return details
