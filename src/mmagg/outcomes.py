"""What a report step returns and what the counters say: the original's messages, ``Counters``.

Light (no client code): the CLI and ``mmagg replay`` read these without loading the reporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmagg.window import Window

__all__ = [
    "MESSAGE_BACKGROUND",
    "MESSAGE_ERROR_PREFIX",
    "MESSAGE_NOT_IN_RANGE",
    "MESSAGE_SENT",
    "MISSING_API_KEY_MESSAGE",
    "Counters",
    "ExportResult",
    "predictions_text",
]

MESSAGE_NOT_IN_RANGE = "Not in reporting range, skipping report. (Ok)"
MESSAGE_SENT = "Data sent successfully"
MESSAGE_BACKGROUND = "Reporting happens in the background task"
MESSAGE_ERROR_PREFIX = "Error while uploading inference data"


#: The original block's error when it has no API key (its text, verbatim).
MISSING_API_KEY_MESSAGE = (
    "ModelMonitoringInferenceAggregator block cannot run without Roboflow API key. "
    "If you do not know how to get API key - visit "
    "https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key to learn how "
    "to retrieve one."
)


def predictions_text(n: int) -> str:
    """``"1 prediction"``, ``"2 predictions"``.

    Example:
        >>> predictions_text(1), predictions_text(0), predictions_text(900)
        ('1 prediction', '0 predictions', '900 predictions')
    """
    return f"{n} prediction" + ("" if n == 1 else "s")


@dataclass(frozen=True, slots=True)
class Counters:
    """What happened so far, readable at any time (a snapshot).

    Attributes:
        collected: predictions taken into a window.
        rejected: predictions refused (confidence NaN, infinite or outside [0, 1]) plus
            inputs refused as invalid.
        sent: reports the backend accepted.
        failed: reports that did not go through (each failure once).
        retried: HTTP retries inside reports.
        merged_back: failed windows merged back so that the next report carries them.
        dropped: predictions given up, by reason (``http_<status>`` when the backend
            refused them, ``shutdown`` when the flush deadline passed, ``max_classes``,
            ``too_large`` when one class's result alone exceeds the backend's body limit).
    """

    collected: int = 0
    rejected: int = 0
    sent: int = 0
    failed: int = 0
    retried: int = 0
    merged_back: int = 0
    dropped: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def __repr__(self) -> str:
        """Readable: ``dropped`` as a plain dict.

        Example:
            >>> c = Counters(sent=3, dropped=MappingProxyType({"shutdown": 1}))
            >>> "dropped={'shutdown': 1})" in repr(c), "mappingproxy" in repr(c)
            (True, False)
        """
        return (
            f"Counters(collected={self.collected}, rejected={self.rejected}, sent={self.sent}, "
            f"failed={self.failed}, retried={self.retried}, merged_back={self.merged_back}, "
            f"dropped={dict(self.dropped)!r})"
        )


@dataclass(slots=True)
class ExportResult:
    """What one export of a window did, when it took more than one report.

    A window whose body is over the backend's limit goes as several reports; some may
    be delivered and others not. ``export`` returns this (``None`` means: one report, all
    delivered) so that the reporter counts each part once and keeps only what is left.

    Attributes:
        reports: reports the backend accepted.
        delivered: predictions in them.
        dropped: predictions given up, by reason (``too_large``, ``http_<status>``).
        undelivered: the part of the window still to send (a failure a later report may
            cure); ``None`` when nothing is left.
        error: the failure behind ``undelivered`` or the last refusal, if any.

    Example:
        >>> r = ExportResult(reports=2, delivered=30)
        >>> r.complete
        True
    """

    reports: int = 0
    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    undelivered: Window | None = None
    error: Exception | None = None

    @property
    def complete(self) -> bool:
        """Everything was delivered: nothing left, nothing dropped, no failure."""
        return self.undelivered is None and not self.dropped and self.error is None
