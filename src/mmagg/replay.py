"""``mmagg replay``: recorded predictions streamed through an Aggregator to a backend.

A recording is JSON Lines, one frame per line::

    {"timestamp": 1795680000.2, "source_id": "cam-1", "model_id": "yard/3",
     "predictions": [{"class": "car", "confidence": 0.91}], "inference_id": "abc"}

- ``predictions``: any shape :func:`mmagg.to_batch` reads. A list is Roboflow JSON (the line
  itself is the response: ``inference_id`` and ``prediction_type`` may sit beside it); a dict
  holding ``"predictions"`` is a whole nested response; any other dict is multi-label
  classification (``{"class": {"confidence": 0.7}}``); ``null`` is a frame without
  predictions.
- or ``detections``: columns of one frame, ``{"class_name": [...], "confidence": [...]}``,
  optionally ``"inference_id"`` and ``"prediction_type"`` (a string for all rows or a list).
- ``timestamp`` (optional): epoch seconds or ISO-8601 (naive means UTC). Without one a frame
  comes ``1/fps`` after the previous one; a timestamp earlier than the previous frame's is
  treated as equal to it (the clock never runs backwards).
- ``source_id``, ``model_id`` (optional): the video source (with per-source aggregation) and
  the model, else the replay's ``model_id``.

The aggregator runs on a simulated clock that follows the recording, so reports cover the
same windows of recorded time whatever the pace: recorded speed, ``speed`` times faster, or
``fast`` (no waiting at all). Reports are sent synchronously, so none is lost or overtaken;
a failed report's data is carried by the next one, as in a live pipeline.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import numpy as np

from mmagg.client import RetryPolicy, resolve_api_base_url, resolve_api_key
from mmagg.outcomes import MESSAGE_ERROR_PREFIX, Counters
from mmagg.predictions import to_batch

if TYPE_CHECKING:  # loaded when a replay runs: the CLI imports this module at start
    from mmagg.aggregator import Aggregator

try:
    import typer
except ImportError:  # mmagg[cli] not installed: the engine works, the command does not
    typer = None  # type: ignore[assignment]

__all__ = [
    "BadLine",
    "Frame",
    "ReplayResult",
    "SimulatedClock",
    "parse_line",
    "read_frames",
    "replay",
    "missing_key_message",
    "replay_command",
    "where_to_look",
]

DEFAULT_FPS = 30.0


@dataclass(frozen=True, slots=True)
class Frame:
    """One good line of a recording, ready for :meth:`mmagg.Aggregator.collect`."""

    lineno: int
    predictions: Any
    timestamp: float | None = None
    source_id: str | None = None
    model_id: str | None = None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that was skipped, and why.

    Example:
        >>> str(BadLine(7, "not JSON: Expecting value at column 1"))
        'line 7: not JSON: Expecting value at column 1'
    """

    lineno: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.reason}"


@dataclass
class ReplayResult:
    """What a replay did.

    Attributes:
        frames: good lines collected.
        bad_lines: lines skipped, with their line numbers and reasons.
        report_errors: error messages of reports that failed (their data went on with the
            next report unless it was dropped; see ``counters.dropped``).
        counters: the aggregator's counters at the end.
        flushed: the last partial window went out within the flush timeout.
        recorded_seconds: recorded time between the first and the last frame.
        first_time, last_time: epoch seconds of the first and the last frame as sent (after
            ``shift_to_now``): the reports are stamped within this range.

    Example:
        >>> result = ReplayResult(frames=3, bad_lines=[BadLine(2, "not JSON")])
        >>> result.ok, result.exit_code  # bad lines alone do not fail a replay
        (True, 0)
    """

    frames: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    report_errors: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    flushed: bool = True
    recorded_seconds: float = 0.0
    first_time: float | None = None
    last_time: float | None = None

    @property
    def ok(self) -> bool:
        """Every collected prediction reached the backend (no report failed for good)."""
        return self.flushed and self.counters.dropped_total == 0

    @property
    def exit_code(self) -> int:
        """``0`` when :attr:`ok`, else ``1`` (bad lines alone do not fail a replay)."""
        return 0 if self.ok else 1


class SimulatedClock:
    """A wall clock the replay moves to each frame's recorded time.

    Example:
        >>> clock = SimulatedClock(100.0)
        >>> clock.move_to(105.5); clock()
        105.5
        >>> clock.move_to(101.0); clock()  # never backwards
        105.5
    """

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def move_to(self, when: float) -> None:
        if when > self.now:
            self.now = when


@dataclass(slots=True)
class _DetectionColumns:
    """The columns of a ``detections`` line, shaped like ``sv.Detections`` for ``to_batch``."""

    xyxy: np.ndarray[Any, Any]
    confidence: np.ndarray[Any, Any]
    data: dict[str, Any]


def parse_line(text: str, lineno: int) -> Frame | None:
    """Read one line of a recording; ``None`` for a blank line.

    Raises:
        ValueError: the line is not a frame; the message says what is wrong.

    Example:
        >>> frame = parse_line('{"predictions": [{"class": "car", "confidence": 0.9}], '
        ...                    '"timestamp": "2026-11-27T05:00:00Z", "source_id": 2}', 1)
        >>> frame.timestamp, frame.source_id
        (1795755600.0, '2')
        >>> parse_line('{"detections": {"class_name": ["car"], "confidence": []}}', 2)
        Traceback (most recent call last):
        ...
        ValueError: detections.confidence: expected 1 values (one per class_name), got 0
    """
    if not text.strip():
        return None
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(line, dict):
        raise ValueError(f"expected a JSON object per line, got {type(line).__name__}")
    has_predictions, has_detections = "predictions" in line, "detections" in line
    if has_predictions == has_detections:
        raise ValueError("expected exactly one of 'predictions' or 'detections'")
    predictions = _predictions(line["predictions"], line) if has_predictions else _detections(line)
    if predictions is not None:
        try:
            batch = to_batch(predictions)  # reject it here, with the line number
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
        if batch is not None:
            nested = has_predictions and predictions is not line
            _check_values(
                batch, predictions, "predictions.predictions" if nested else "predictions"
            )
    return Frame(
        lineno=lineno,
        predictions=predictions,
        timestamp=_timestamp(line.get("timestamp")),
        source_id=_optional_name(line, "source_id"),
        model_id=_optional_name(line, "model_id", allow_int=False),
    )


def _row_names(predictions: Any, prefix: str, index: int) -> tuple[str, str]:
    """How the format names row `index`'s class and confidence, for an error message."""
    if isinstance(predictions, _DetectionColumns):
        return f"detections.class_name[{index}]", f"detections.confidence[{index}]"
    rows = predictions.get("predictions")
    if isinstance(rows, Mapping):
        name = list(rows)[index]
        return f"{prefix}[{name!r}]", f"{prefix}[{name!r}].confidence"
    return f"{prefix}[{index}].class", f"{prefix}[{index}].confidence"


def _check_values(batch: Any, predictions: Any, prefix: str) -> None:
    """A recording is data someone will read: a confidence outside [0, 1] or a prediction
    without a class is a mistake in it, not something to store."""
    confidences = batch.confidences
    outside = np.flatnonzero(~((confidences >= 0.0) & (confidences <= 1.0)))
    if outside.size:
        index = int(outside[0])
        value = float(confidences[index])
        name = _row_names(predictions, prefix, index)[1]
        raise ValueError(f"{name}: expected a number in [0, 1], got {value:g}")
    unnamed = np.flatnonzero(np.char.str_len(batch.class_names) == 0)
    if unnamed.size:
        name = _row_names(predictions, prefix, int(unnamed[0]))[0]
        raise ValueError(f"{name}: expected a class name, got none")


def _predictions(value: Any, line: dict[str, Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping) and "predictions" in value:
        return value  # a whole response, nested
    return line  # the line is the response: list (Roboflow JSON) or mapping (multi-label)


def _detections(line: dict[str, Any]) -> _DetectionColumns | None:
    columns = line["detections"]
    if columns is None:
        return None
    if not isinstance(columns, dict):
        raise ValueError(f"detections: expected an object of columns, got {type(columns).__name__}")
    names = columns.get("class_name")
    if not isinstance(names, list):
        raise ValueError("detections.class_name: expected a list of class names")
    n = len(names)
    if n == 0:
        return None
    confidences = columns.get("confidence")
    if not isinstance(confidences, list) or len(confidences) != n:
        got = len(confidences) if isinstance(confidences, list) else type(confidences).__name__
        raise ValueError(
            f"detections.confidence: expected {n} values (one per class_name), got {got}"
        )
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in confidences):
        raise ValueError("detections.confidence: expected numbers")
    if not all(isinstance(name, str) for name in names):
        raise ValueError("detections.class_name: expected strings")
    data: dict[str, Any] = {"class_name": np.array(names, dtype=np.str_)}
    for column in ("inference_id", "prediction_type"):
        value = columns.get(column)
        if value is None:
            continue
        if isinstance(value, str):
            data[column] = np.full(n, value)
        elif isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
            data[column] = np.array(value, dtype=np.str_)
        else:
            raise ValueError(f"detections.{column}: expected a string or {n} strings")
    return _DetectionColumns(
        xyxy=np.zeros((n, 4)), confidence=np.array(confidences, dtype=np.float64), data=data
    )


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("timestamp: expected epoch seconds or an ISO-8601 string, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"timestamp: expected a finite number, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp: not an ISO-8601 datetime: {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    raise ValueError(
        f"timestamp: expected epoch seconds or an ISO-8601 string, got {type(value).__name__}"
    )


def _optional_name(line: dict[str, Any], key: str, allow_int: bool = True) -> str | None:
    value = line.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key}: expected a non-empty string, got {json.dumps(value)[:40]}")


def read_frames(lines: Iterable[str]) -> Iterator[Frame | BadLine]:
    """Good frames and bad lines of a recording, in order (blank lines are skipped).

    Example:
        >>> [type(item).__name__ for item in read_frames(['{"predictions": null}', "", "{"])]
        ['Frame', 'BadLine']
    """
    for lineno, text in enumerate(lines, start=1):
        try:
            frame = parse_line(text, lineno)
        except ValueError as error:
            yield BadLine(lineno, str(error))
            continue
        if frame is not None:
            yield frame


def replay(
    recording: str | Path | Iterable[str],
    *,
    model_id: str = "replay",
    api_key: str | None = None,
    api_base_url: str | None = None,
    frequency: int = 5,
    speed: float = 1.0,
    fast: bool = False,
    fps: float = DEFAULT_FPS,
    per_source: bool = True,
    extensions: bool = False,
    device_id: str | None = None,
    unique_aggregator_key: str | None = None,
    request_timeout: float | None = None,
    flush_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    shift_to_now: bool = False,
    on_line: Callable[[Frame | BadLine], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> ReplayResult:
    """Stream a recording (a path, or lines) through an :class:`~mmagg.Aggregator`.

    Args:
        speed: play ``speed`` times faster than recorded (ignored with ``fast``).
        fast: do not wait between frames at all.
        fps: spacing of frames that carry no timestamp.
        per_source: keep one window per ``source_id``.
        shift_to_now: move every timestamp by one offset so that the last frame is at the
            time the replay starts (spacing kept): a recording from another day then lands in
            the dashboard's "last hour" instead of out of sight.
        wall_clock: the time ``shift_to_now`` and frames without timestamps start from.
        extensions: add mmagg's ``stats``/``source_id`` keys (for ``mmagg serve``).
        on_line: called after each line (a progress bar's hook).

    Returns:
        A :class:`ReplayResult`; ``result.exit_code`` is non-zero when a report failed for
        good (refused by the backend, or still failing at the end).

    Example:
        >>> lines = ['{"predictions": [{"class": "car", "confidence": 0.9}], "timestamp": 0}',
        ...          'not json',
        ...          '{"predictions": [{"class": "car", "confidence": 0.5}], "timestamp": 7}']
        >>> result = replay(lines, api_key="k", api_base_url="http://127.0.0.1:9", fast=True,
        ...                 retry=RetryPolicy(max_attempts=1), flush_timeout=0.5)
        >>> result.frames, [str(bad) for bad in result.bad_lines]
        (2, ['line 2: not JSON: Expecting value at column 1'])
        >>> result.exit_code  # nothing listens on port 9: the reports failed
        1
    """
    if not (speed > 0 and math.isfinite(speed)):
        raise ValueError(f"speed: expected a finite number > 0, got {speed!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps: expected a finite number > 0, got {fps!r}")
    result = ReplayResult()
    from mmagg.aggregator import Aggregator

    aggregator: Aggregator | None = None
    clock = SimulatedClock(0.0)
    first: float | None = None
    wall_start = 0.0
    started = wall_clock()
    if shift_to_now:
        recording, end = _recorded_end(recording, fps, started)
        offset = 0.0 if end is None else started - end
    else:
        offset = 0.0
    with _open_lines(recording) as lines:
        for item in read_frames(lines):
            if isinstance(item, BadLine):
                result.bad_lines.append(item)
            else:
                if item.timestamp is not None:
                    when = item.timestamp + offset
                elif first is None:
                    when = started + offset
                else:
                    when = clock() + 1.0 / fps
                if first is None:
                    first, wall_start = when, monotonic()
                    clock = SimulatedClock(when)
                    aggregator = Aggregator(
                        model_id,
                        frequency,
                        api_key,
                        api_base_url,
                        fire_and_forget=False,
                        unique_aggregator_key=unique_aggregator_key,
                        device_id=device_id,
                        per_source=per_source,
                        extensions=extensions,
                        request_timeout=request_timeout,
                        flush_timeout=flush_timeout,
                        retry=retry,
                        clock=clock,
                    )
                clock.move_to(when)
                if not fast:
                    wait = wall_start + (clock() - first) / speed - monotonic()
                    if wait > 0:
                        sleep(wait)
                assert aggregator is not None
                outcome = aggregator.collect(
                    item.predictions, model_id=item.model_id, source_id=item.source_id
                )
                result.frames += 1
                if outcome["error_status"] and str(outcome["message"]).startswith(
                    MESSAGE_ERROR_PREFIX
                ):
                    result.report_errors.append(str(outcome["message"]))
            if on_line is not None:
                on_line(item)
    if aggregator is not None:
        before = aggregator.counters
        closed = aggregator.close(flush_timeout)
        result.counters = aggregator.counters
        # A failed final send is merged back into a window nobody will send again: the last
        # attempt decides whether the tail of the recording reached the backend.
        result.flushed = closed and result.counters.failed == before.failed
        result.recorded_seconds = clock() - (first or clock())
        result.first_time, result.last_time = first, clock()
    return result


def _recorded_end(
    recording: str | Path | Iterable[str], fps: float, start: float
) -> tuple[str | Path | Iterable[str], float | None]:
    """When the recording's last frame is (by the replay's own rules), and the recording to
    stream afterwards: a file is read twice, other input is kept in memory."""
    if not (isinstance(recording, (str, Path)) and str(recording) != "-"):
        with _open_lines(recording) as lines:
            recording = list(lines)
    end: float | None = None
    with _open_lines(recording) as lines:
        for item in read_frames(lines):
            if isinstance(item, Frame):
                if item.timestamp is not None:
                    when = item.timestamp
                elif end is None:
                    when = start
                else:
                    when = end + 1.0 / fps
                end = when if end is None else max(end, when)
    return recording, end


class _open_lines:
    """A context manager over the lines of a path, ``-`` (stdin) or an iterable."""

    def __init__(self, recording: str | Path | Iterable[str]) -> None:
        self._recording = recording
        self._file: Any = None

    def __enter__(self) -> Iterable[str]:
        recording = self._recording
        if isinstance(recording, (str, Path)):
            if str(recording) == "-":
                return sys.stdin
            self._file = open(recording, encoding="utf-8", errors="replace")  # noqa: SIM115
            return self._file  # type: ignore[no-any-return]
        return recording

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()


def _count_lines(path: Path) -> int | None:
    if str(path) == "-":
        return None
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def replay_command(
    file: Annotated[
        Path,
        typer.Argument(help="JSON Lines recording, one frame per line ('-' reads stdin)."),
    ],
    model_id: Annotated[
        str, typer.Option(help="Model id for lines that carry no 'model_id'.")
    ] = "replay",
    api_key: Annotated[
        str | None,
        typer.Option(help="API key (else ROBOFLOW_API_KEY, else API_KEY).", show_default=False),
    ] = None,
    api_base_url: Annotated[
        str | None,
        typer.Option(help="Backend URL (else API_BASE_URL, else https://api.roboflow.com)."),
    ] = None,
    frequency: Annotated[int, typer.Option(min=1, help="Reporting interval, seconds.")] = 5,
    speed: Annotated[float, typer.Option(help="Play N times faster than recorded (> 0).")] = 1.0,
    fast: Annotated[
        bool, typer.Option("--fast", help="No waiting: as fast as possible, simulated clock.")
    ] = False,
    fps: Annotated[
        float, typer.Option(help="Frame rate of lines without a timestamp (> 0).")
    ] = DEFAULT_FPS,
    per_source: Annotated[bool, typer.Option(help="One window per source_id.")] = True,
    extensions: Annotated[
        bool,
        typer.Option(help="Send mmagg's stats/source_id keys (for mmagg serve, not Roboflow)."),
    ] = False,
    device_id: Annotated[
        str | None, typer.Option(help="device_id of the reports (else DEVICE_ID).")
    ] = None,
    aggregator_key: Annotated[
        str | None, typer.Option(help="unique_aggregator_key (default: a fresh one).")
    ] = None,
    shift_to_now: Annotated[
        bool,
        typer.Option(
            "--shift-to-now",
            help="Move all timestamps so the recording ends now (spacing kept): it then shows "
            "in the dashboard's last hour.",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay recorded predictions through the aggregator to a backend.

    Bad lines are reported with their line number and skipped.
    Exit status: 0 all predictions reached the backend, 1 a report failed for good, 2 usage.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True, soft_wrap=True)
    if str(file) != "-" and not file.is_file():
        console.print(f"[red]error:[/red] no such file: {file}")
        raise typer.Exit(2)
    base_url = resolve_api_base_url(api_base_url)
    if resolve_api_key(api_key) is None:
        console.print(f"[red]error:[/red] {escape(missing_key_message(base_url))}")
        raise typer.Exit(2)
    bar = Progress(
        TextColumn("[bold]replay[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lines"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )

    with bar:
        task = bar.add_task("replay", total=_count_lines(file))

        def on_line(item: Frame | BadLine) -> None:
            if isinstance(item, BadLine):
                bar.console.print(f"[yellow]skipped[/yellow] {escape(str(item))}", highlight=False)
            bar.advance(task)

        try:
            result = replay(
                file,
                model_id=model_id,
                api_key=api_key,
                api_base_url=api_base_url,
                frequency=frequency,
                speed=speed,
                fast=fast,
                fps=fps,
                per_source=per_source,
                extensions=extensions,
                device_id=device_id,
                unique_aggregator_key=aggregator_key,
                shift_to_now=shift_to_now,
                on_line=on_line,
            )
        except ValueError as error:  # e.g. no API key
            console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from None
    counters = result.counters
    console.print(
        f"{result.frames} frames over {result.recorded_seconds:.1f} s recorded, "
        f"{len(result.bad_lines)} bad lines skipped; reports: {counters.sent} sent, "
        f"{counters.failed} failed, {counters.retried} retries; "
        f"predictions: {counters.collected} collected, {counters.dropped_total} dropped"
        + (f" {dict(counters.dropped)}" if counters.dropped else "")
    )
    if result.first_time is not None and result.last_time is not None and counters.sent:
        for line in where_to_look(result.first_time, result.last_time, base_url):
            console.print(line, highlight=False, markup=False)
    if not result.ok:
        console.print("[red]some predictions did not reach the backend[/red]")
    raise typer.Exit(result.exit_code)


def _is_roboflow(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host == "roboflow.com" or host.endswith(".roboflow.com")


def missing_key_message(base_url: str) -> str:
    """What to do when no API key was given, for the backend being used.

    Example:
        >>> missing_key_message("http://127.0.0.1:9090")  # doctest: +ELLIPSIS
        'no API key for http://127.0.0.1:9090: create one with `mmagg keys create ...'
    """
    if _is_roboflow(base_url):
        return (
            f"no API key for {base_url}: pass --api-key or set ROBOFLOW_API_KEY; a Roboflow key "
            "is in your workspace settings "
            "(https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key)"
        )
    return (
        f"no API key for {base_url}: create one with `mmagg keys create --workspace NAME` "
        "(with the --database-url of that mmagg serve), then pass it with --api-key or "
        "ROBOFLOW_API_KEY"
    )


def _utc(epoch: float, pattern: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime(pattern)


def where_to_look(
    first_time: float, last_time: float, base_url: str, now: float | None = None
) -> list[str]:
    """Lines saying which time range the reports were stored under, and where to see it.

    Example:
        >>> for line in where_to_look(1795680000.0, 1795680029.8, "http://127.0.0.1:9090",
        ...                           now=1795680100.0):
        ...     print(line)
        Stored time range: 2026-11-26 08:00:00 to 2026-11-26 08:00:29 UTC
        Dashboard for it: http://127.0.0.1:9090/dashboard?from=2026-11-26T08:00:00Z&to=2026-11-26T08:00:31Z
    """  # noqa: E501
    first, last = math.floor(first_time), math.ceil(last_time) + 1
    readable = "%Y-%m-%d %H:%M:%S"
    lines = [f"Stored time range: {_utc(first_time, readable)} to {_utc(last_time, readable)} UTC"]
    if not _is_roboflow(base_url):
        lines.append(f"Dashboard for it: {base_url}/dashboard?from={_utc(first)}&to={_utc(last)}")
    age = (time.time() if now is None else now) - last_time
    if age > 3600:
        lines.append(
            f"The recording ends {_age(age)} ago, before the dashboard's default last hour: "
            "open the link above, or replay with --shift-to-now to make it end now."
        )
    return lines


def _age(seconds: float) -> str:
    for size, unit in ((86400, "days"), (3600, "hours")):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 60:.0f} minutes"
