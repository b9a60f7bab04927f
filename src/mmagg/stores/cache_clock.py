"""The interval clock of the Workflows block: in the injected cache, as the original keeps it.

The original block stores the time of its last report in its ``cache`` under
``workflows:steps_cache:<block type>:<unique_aggregator_key>:last_report_time``, as a
naive local ISO-8601 string. :class:`CacheClock` is an
:class:`~mmagg.stores.base.IntervalClock` over a :class:`~mmagg.stores.base.Store` that
keeps exactly that key and value. The key carries no tenant (it is the original's
contract): two tenants that name their aggregator alike share this clock, as two
original blocks would; their windows never mix (the store keys are tenant-scoped).

With a shared store (Redis) the store's clock decides, so that every process agrees; the
cache value is still written when a report is claimed.

Example:
    >>> from mmagg.cache import MemoryCache
    >>> from mmagg.stores.memory import MemoryStore
    >>> cache = MemoryCache()
    >>> clock = CacheClock(cache, MemoryStore(), "last-report")
    >>> clock.claim("k", 5, now=0.0) is None  # the first call starts the interval
    True
    >>> cache.get("last-report") is not None, clock.due("k", 5, now=4.9), clock.due("k", 5, now=5.0)
    (True, False, True)
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

from mmagg._secrets import get_logger
from mmagg.cache import Cache
from mmagg.stores.base import Store, is_due
from mmagg.window import Window

__all__ = ["CacheClock"]

logger = get_logger("mmagg.stores")


class CacheClock:
    """The interval of one aggregator key, kept in a Roboflow-style cache.

    Args:
        cache: any object with ``get(key)`` and ``set(key, value, expire=None)``.
        store: where the windows live; :meth:`claim` takes from it.
        cache_key: the original's cache key of this aggregator key.
    """

    def __init__(self, cache: Cache, store: Store, cache_key: str) -> None:
        self.cache = cache
        self.store = store
        self.cache_key = cache_key
        self._lock = threading.Lock()
        # The value last read and its epoch: parsed once per value written.
        self._raw: object = None
        self._epoch = 0.0

    @property
    def shared(self) -> bool:
        return self.store.shared

    def due(self, key: str, frequency: float, now: float | None = None) -> bool:
        if self.store.shared:
            return self.store.due(key, frequency, now)
        last = self._last()
        return last is None or is_due(_now(now) - last, frequency)

    def claim(self, key: str, frequency: float, now: float | None = None) -> Window | None:
        when = _now(now)
        if self.store.shared:
            window = self.store.claim(key, frequency, now)
            if window is not None:
                self._write(when)
            return window
        with self._lock:
            last = self._last()
            if last is None:
                self._write(when)
                return None
            if not is_due(when - last, frequency):
                return None
            self._write(when)
            return self.store.take(key)

    def _last(self) -> float | None:
        raw = self.cache.get(self.cache_key)
        if raw is None:
            return None
        if raw != self._raw:
            parsed = _parse_time(raw)
            if parsed is None:
                return None
            self._raw, self._epoch = raw, parsed.timestamp()
        return self._epoch

    def _write(self, when: float) -> None:
        self.cache.set(self.cache_key, datetime.fromtimestamp(when).isoformat())


def _now(now: float | None) -> float:
    return time.time() if now is None else now


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
