"""``MeteredStore``: a Store wrapper that keeps running per-class totals (for Prometheus).

It lives with the stores (it is one, and passes the same contract tests); the Prometheus
side (:mod:`mmagg.metrics`) only reads :meth:`MeteredStore.totals`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from mmagg.stores import resolve_store
from mmagg.stores.base import Store
from mmagg.window import ClassStats, Key, Window

__all__ = ["MeteredStore"]


class MeteredStore:
    """A :class:`~mmagg.stores.Store` that keeps running per-class totals for Prometheus.

    Every call is passed to ``inner``; ``take``/``claim`` add the taken window's statistics
    to the totals and ``give_back`` subtracts them again (the window is counted when it is
    taken the next time). The caller thread's ``window(key)`` stays a dictionary look-up.

    With a shared (Redis) store each process counts the windows it reports; summed over
    processes the totals are exact, but a window given back after a failed report may make
    a series dip until it is reported again.

    Example:
        >>> from mmagg.predictions import to_batch
        >>> store = MeteredStore()
        >>> _ = store.window("k").add(to_batch({"predictions": [{"class": "cat",
        ...     "confidence": 0.4}]}), model_id="m/1")
        >>> store.totals()[("m/1", "cat", "")].count
        1
    """

    def __init__(self, inner: Store | str | None = None) -> None:
        self.inner = resolve_store(inner)
        self.shared = self.inner.shared
        self._lock = threading.Lock()
        self._reported: dict[Key, ClassStats] = {}
        self._keys: dict[str, None] = {}
        _METERED.add(self)

    def __repr__(self) -> str:
        return f"MeteredStore({self.inner!r})"

    def after_fork_in_child(self) -> None:
        """Forget this process's state in a forked child (called by the fork hook)."""
        # A forked child starts with empty windows (the stores reset theirs): its totals
        # must not repeat what the parent collected.
        self._lock = threading.Lock()
        self._reported = {}
        self._keys = {}

    # -- the Store protocol -------------------------------------------------------------------

    def window(self, key: str) -> Window:
        if key not in self._keys:
            self._keys[key] = None
        return self.inner.window(key)

    def due(self, key: str, frequency: float, now: float | None = None) -> bool:
        return self.inner.due(key, frequency, now)

    def claim(self, key: str, frequency: float, now: float | None = None) -> Window | None:
        return self._counted(lambda: self.inner.claim(key, frequency, now))

    def take(self, key: str) -> Window:
        window = self._counted(lambda: self.inner.take(key))
        assert window is not None
        return window

    def give_back(self, key: str, window: Window) -> None:
        stats = window.stats()
        if self.shared:  # I/O: never under the lock a scrape waits on
            self.inner.give_back(key, window)
            with self._lock:
                self._add(stats, -1)
            return
        with self._lock:  # atomic for a scrape: the data moves from the totals to the window
            self.inner.give_back(key, window)
            self._add(stats, -1)

    def close(self) -> None:
        self.inner.close()

    # -- reading ------------------------------------------------------------------------------

    def totals(self) -> dict[Key, ClassStats]:
        """Statistics of every prediction collected so far (reported or still in a window)."""
        with self._lock:
            merged = {key: stats.copy() for key, stats in self._reported.items()}
            for key in list(self._keys):
                for entry, stats in self.inner.window(key).stats().items():
                    mine = merged.get(entry)
                    if mine is None:
                        merged[entry] = stats
                    else:
                        mine.merge_in(stats)
        return merged

    def _counted(self, take: Callable[[], Window | None]) -> Window | None:
        if self.shared:
            window: Window | None = take()
            if window is not None:
                stats = window.stats()
                with self._lock:
                    self._add(stats, 1)
            return window
        with self._lock:  # atomic for a scrape: the data moves from the window to the totals
            window = take()
            if window is not None:
                self._add(window.stats(), 1)
        return window

    def _add(self, stats: dict[Key, ClassStats], sign: int) -> None:
        for key, item in stats.items():
            mine = self._reported.get(key)
            if mine is None:
                mine = self._reported[key] = ClassStats()
            mine.count += sign * item.count
            mine.total += sign * item.total
            mine.histogram = [
                a + sign * b for a, b in zip(mine.histogram, item.histogram, strict=True)
            ]


_METERED: weakref.WeakSet[MeteredStore] = weakref.WeakSet()


def _reset_metered_after_fork() -> None:
    for store in list(_METERED):
        store.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_metered_after_fork)
