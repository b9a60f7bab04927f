"""The bounds every accepted report keeps, and where a report lands on the time axis.

The rule is *accepted ⇒ readable*: a report the ingest endpoint answers 2xx must leave every
read endpoint answering 2xx with correct numbers, on SQLite and on PostgreSQL. So every
bound here is chosen from what the storage and the read queries can hold, and a value past
one is refused with a 422 naming the field, the bound and the value (docs/reliability.md,
"Bounds of an accepted report", has the table).

Example:
    >>> check_text("car")
    'car'
    >>> unstorable_reason("a\\x00b")
    'expected text without NUL characters, got one'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mmagg.wire import CONFIDENCE_MAX as CONFIDENCE_MAX
from mmagg.wire import CONFIDENCE_MIN as CONFIDENCE_MIN

# Confidences are probabilities; the histogram buckets and every mean assume [0, 1]
# (CONFIDENCE_MIN/MAX, from mmagg.wire: the client refuses the same values per prediction).

#: Predictions one report may stand for, over all its results (`sum(stats.count)`). A
#: 64-bit SUM (SQLite's integer, PostgreSQL's bigint) holds 9.2e18: 9.2e9 reports at this
#: bound, 290 years at 1,000 reports a second, far past any retention. One result's count is
#: below it too, so it fits the 32-bit `stats_count` and `hist_*` columns (2,147,483,647).
MAX_REPORT_PREDICTIONS = 1_000_000_000

#: `mmagg.frequency` (the reporting interval, seconds): positive, at most a year.
MAX_FREQUENCY_SECONDS = 366 * 86400.0

#: Every string field: at most this many characters and this many UTF-8 bytes (a model id is
#: part of a PostgreSQL B-tree index key, whose entries must stay under ~2,700 bytes).
MAX_STRING_CHARS = 1_024
MAX_STRING_BYTES = 2_048

#: A timezone-aware report timestamp ahead of the server's receive time by more than this is
#: clamped to the receive time (client clocks drift; a report cannot come from the future).
FUTURE_TOLERANCE_SECONDS = 60.0

#: Report timestamps before this (1970-01-01T00:00:00Z) are refused, retention or not.
EARLIEST_REPORT_TIME = 0.0

#: Read ranges (`startTime`, `endTime`) must lie within these years: every bucket start,
#: the period before the range, and their ISO-8601 forms stay inside what datetime holds.
EARLIEST_READ_TIME = datetime(1000, 1, 1, tzinfo=timezone.utc)
LATEST_READ_TIME = datetime(9000, 1, 1, tzinfo=timezone.utc)

# How a report's time was placed (stored in `reports.time_rule`).
RULE_CLIENT = "client"
RULE_NAIVE = "received_naive"
RULE_FUTURE = "clamped_future"


def check_text(value: str) -> str:
    """Return `value` if both databases can store it; raise ValueError naming the problem.

    NUL is refused (PostgreSQL's text types cannot hold it, so SQLite refuses it too: the
    two must answer alike); lone surrogates are not valid Unicode (no UTF-8 encoding); the
    length is bounded in characters and in UTF-8 bytes.
    """
    position = value.find("\x00")
    if position >= 0:
        raise ValueError(
            "expected text without NUL characters (PostgreSQL cannot store them), "
            f"got one at position {position}"
        )
    if len(value) > MAX_STRING_CHARS:
        raise ValueError(f"expected at most {MAX_STRING_CHARS} characters, got {len(value)}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise ValueError(
            f"expected valid Unicode, got a lone surrogate at position {error.start}"
        ) from None
    if size > MAX_STRING_BYTES:
        raise ValueError(f"expected at most {MAX_STRING_BYTES} bytes as UTF-8, got {size}")
    return value


def unstorable_reason(value: str) -> str | None:
    """Why `value` cannot be stored or compared by both databases, or None if it can.

    Used for read filters, which are never stored but are sent to the database as
    parameters: PostgreSQL refuses a NUL there too.

    Example:
        >>> unstorable_reason("cam-1") is None
        True
    """
    if "\x00" in value:
        return "expected text without NUL characters, got one"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "expected valid Unicode, got a lone surrogate"
    return None


def utc_aware(value: datetime) -> datetime:
    """`value` in UTC if it carries a timezone, unchanged if naive.

    Raises ValueError (not OverflowError) when the conversion leaves datetime's range,
    e.g. `0001-01-01T00:00:00+14:00`.
    """
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(
            "expected a time between 0001-01-01 and 9999-12-31 in UTC, "
            f"got {value.isoformat()}, which is outside once converted"
        ) from None


class TimestampError(ValueError):
    """A report timestamp outside the window the server keeps."""


@dataclass(frozen=True)
class Placement:
    """Where a report lands on the time axis, and why.

    `ts` is what every read uses; `client_timestamp` is the client's value as it came
    (ISO-8601, naive if it was); `rule` is one of `client`, `received_naive`,
    `clamped_future`.
    """

    ts: float
    received_at: float
    client_timestamp: str
    rule: str


def place(
    timestamp: datetime, received_at: float, retention_seconds: float | None = None
) -> Placement:
    """The time a report is filed under (docs/reliability.md, "Client clocks").

    - naive timestamp (no offset): the client's local time zone is unknown, so the report
      is filed at the server's receive time;
    - timezone-aware, more than `FUTURE_TOLERANCE_SECONDS` ahead of the receive time:
      clamped to the receive time;
    - timezone-aware, in the past: kept (replays, devices catching up after an outage), if
      it is not older than the retention period (nor before 1970); older ones raise
      `TimestampError`, since the next prune would delete them anyway.

    Example:
        >>> from datetime import datetime, timezone
        >>> place(datetime(2026, 1, 1, 9, 0), received_at=1000.0).rule
        'received_naive'
        >>> future = datetime(2100, 1, 1, tzinfo=timezone.utc)
        >>> place(future, received_at=1000.0).ts
        1000.0
    """
    sent = timestamp.isoformat()
    if timestamp.tzinfo is None:
        return Placement(received_at, received_at, sent, RULE_NAIVE)
    ts = timestamp.timestamp()
    if ts > received_at + FUTURE_TOLERANCE_SECONDS:
        return Placement(received_at, received_at, sent, RULE_FUTURE)
    earliest = EARLIEST_REPORT_TIME
    what = "1970-01-01T00:00:00+00:00"
    if retention_seconds is not None and received_at - retention_seconds > earliest:
        earliest = received_at - retention_seconds
        what = (
            f"{datetime.fromtimestamp(earliest, timezone.utc).isoformat()} "
            f"(the retention period, {retention_seconds / 86400:g} days)"
        )
    if ts < earliest:
        raise TimestampError(f"expected a time not before {what}, got {sent}")
    return Placement(ts, received_at, sent, RULE_CLIENT)
