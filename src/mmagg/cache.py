"""A small thread-safe in-memory cache with the ``get``/``set(expire=)`` shape of Roboflow's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Cache", "MemoryCache"]


@runtime_checkable
class Cache(Protocol):
    """What the block needs from an injected cache (Roboflow's ``BaseCache`` fits)."""

    def get(self, key: str) -> Any: ...

    def set(self, key: str, value: Any, expire: float | None = None) -> Any: ...


class MemoryCache:
    """Process-local cache; ``expire`` is in seconds.

    Example:
        >>> cache = MemoryCache()
        >>> cache.set("k", "v", expire=60)
        >>> cache.get("k"), cache.get("missing")
        ('v', None)
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[Any, float | None]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            value, deadline = item
            if deadline is not None and self._clock() >= deadline:
                del self._items[key]
                return None
            return value

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        deadline = None if expire is None else self._clock() + expire
        with self._lock:
            self._items[key] = (value, deadline)
