"""The process-local store: one shared window per aggregator key, in memory."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

from mmagg.stores.base import is_due
from mmagg.window import DEFAULT_MAX_CLASSES, Window

__all__ = ["MemoryStore", "default_store"]


class MemoryStore:
    """Windows and interval clock in this process's memory.

    The clock is ``now`` when the caller passes one (the reporter passes its injected
    clock), else ``clock``.

    Two block instances (two HTTP requests in one inference server) that use the same
    aggregator key collect into the same window.

    Example:
        >>> store = MemoryStore(clock=lambda: 100.0)
        >>> store.window("k") is store.window("k")
        True
        >>> store.claim("k", frequency=5) is None  # the first call starts the interval
        True
    """

    shared = False

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_classes: int = DEFAULT_MAX_CLASSES,
    ) -> None:
        self._clock = clock
        self._max_classes = max_classes
        self._windows: dict[str, Window] = {}
        self._last_report: dict[str, float] = {}
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def window(self, key: str) -> Window:
        window = self._windows.get(key)
        if window is None:
            with self._lock:
                window = self._windows.setdefault(key, Window(max_classes=self._max_classes))
        return window

    def due(self, key: str, frequency: float, now: float | None = None) -> bool:
        last = self._last_report.get(key)
        return last is None or is_due((self._clock() if now is None else now) - last, frequency)

    def claim(self, key: str, frequency: float, now: float | None = None) -> Window | None:
        if now is None:
            now = self._clock()
        with self._lock:
            last = self._last_report.get(key)
            if last is None:
                self._last_report[key] = now
                return None
            if not is_due(now - last, frequency):
                return None
            self._last_report[key] = now
            return self._swap(key)

    def take(self, key: str) -> Window:
        with self._lock:
            return self._swap(key)

    def give_back(self, key: str, window: Window) -> None:
        # Absorbed, not merged: merging would fold the live window under its lock, and
        # the video loop adding to it would wait for the sender.
        self.window(key).absorb(window)

    def close(self) -> None:
        """Nothing to release: windows stay until taken."""

    def _swap(self, key: str) -> Window:
        window = self._windows.get(key)
        if window is None:
            return Window(max_classes=self._max_classes)
        # Drained in place, never replaced: a caller that fetched the window just before
        # the take keeps adding to the live one.
        return window.drain()

    def after_fork_in_child(self) -> None:
        """Forget this process's state in a forked child (called by the fork hook)."""
        # A forked child must not re-send what its parent collected.
        self._windows = {}
        self._last_report = {}
        self._lock = threading.Lock()


_INSTANCES: weakref.WeakSet[MemoryStore] = weakref.WeakSet()
_DEFAULT: MemoryStore | None = None
_DEFAULT_LOCK = threading.Lock()


def default_store() -> MemoryStore:
    """The process-wide memory store (shared by every aggregator and block instance)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = MemoryStore()
    return _DEFAULT


def _after_fork_in_child() -> None:
    # Every instance, not only the default: a store the user passed must not make the
    # child re-send its parent's windows either.
    for store in list(_INSTANCES):
        store.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
