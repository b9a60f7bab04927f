"""How long each kind of stored data is kept: raw rows, and rollups per level (issue 15).

Raw reports and results are kept `raw_days`; the minute rollups (levels 60 s and 300 s),
the hour rollups (3600 s and 21600 s) with the hour median digests, and the day rollups
(86400 s) with the day median digests may each be kept longer (docs/server.md, "Old data";
docs/scale.md, "Retention per level"). Each is kept at least as long as the finer one, so
that whatever a read finds of a time is complete at the coarsest level still kept there:
a read stays exact for what remains (`mmagg.server.rollups` needs no bound to plan it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The rollup levels each setting governs, finest first.
MINUTE_LEVELS = (60, 300)
HOUR_LEVELS = (3600, 21600)
DAY_LEVELS = (86400,)

DAY_SECONDS = 86_400.0


class RetentionError(ValueError):
    """Retention settings that cannot hold together (names the option, expected, got)."""


@dataclass(frozen=True)
class Bounds:
    """The times before which each kind of data goes: `raw` for reports and results,
    `levels[level]` for the rollups of a level (a bucket goes once it ends by its bound),
    `digests[level]` for the median digests of 3600 and 86400 (a digest goes once its bucket
    starts before its bound)."""

    raw: float
    levels: dict[int, float]
    digests: dict[int, float]


@dataclass(frozen=True)
class Retention:
    """Days of data kept: raw rows, then the minute, hour and day rollups (None: as long as
    the finer kind before it; `math.inf`: forever).

    Example:
        >>> r = Retention(7, hour_days=400, day_days=math.inf)
        >>> r.days_of(60), r.days_of(3600), r.days_of(86400)
        (7.0, 400.0, inf)
        >>> try:
        ...     Retention(7, minute_days=3)
        ... except RetentionError as error:
        ...     print(error)
        --keep-minute-rollups: expected at least the raw retention (7 days), got 3
    """

    raw_days: float
    minute_days: float | None = None
    hour_days: float | None = None
    day_days: float | None = None

    def __post_init__(self) -> None:
        finer, finer_name = float(self.raw_days), "the raw retention"
        if not finer >= 0 or math.isinf(finer):
            raise RetentionError(
                f"--retention-days: expected a number of days >= 0, got {self.raw_days}"
            )
        for option, days in (
            ("--keep-minute-rollups", self.minute_days),
            ("--keep-hour-rollups", self.hour_days),
            ("--keep-day-rollups", self.day_days),
        ):
            if days is None:
                continue
            if not float(days) >= finer:  # also refuses NaN
                raise RetentionError(
                    f"{option}: expected at least {finer_name} ({finer:g} days), got {days:g}"
                )
            finer, finer_name = float(days), option

    def days_of(self, level: int) -> float:
        """Days the rollups of `level` are kept (0 for raw rows)."""
        days = float(self.raw_days)
        for levels, setting in (
            (MINUTE_LEVELS, self.minute_days),
            (HOUR_LEVELS, self.hour_days),
            (DAY_LEVELS, self.day_days),
        ):
            if setting is not None:
                days = float(setting)
            if level in levels:
                return days
        if level == 0:
            return float(self.raw_days)
        raise ValueError(f"expected a rollup level or 0, got {level}")

    @property
    def longer(self) -> bool:
        """Whether any rollup outlives the raw rows."""
        return any(
            days is not None and float(days) > float(self.raw_days)
            for days in (self.minute_days, self.hour_days, self.day_days)
        )

    def bounds(self, now: float) -> Bounds:
        """The bounds of a prune at `now`."""

        def before(days: float) -> float:
            return -math.inf if math.isinf(days) else now - days * DAY_SECONDS

        levels = {
            level: before(self.days_of(level))
            for level in (*MINUTE_LEVELS, *HOUR_LEVELS, *DAY_LEVELS)
        }
        digests = {3600: levels[3600], 86400: levels[86400]}
        return Bounds(before(float(self.raw_days)), levels, digests)
