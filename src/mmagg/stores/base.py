"""The ``Store`` protocol, the ``IntervalClock`` it includes, and the one due rule.

A store holds the windows of every (tenant-scoped) aggregator key and the interval clock
that says when a key's window is due. The reporter asks the clock; it never computes
"is it time?" itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mmagg.window import Window

__all__ = ["IntervalClock", "Store", "is_due"]


def is_due(elapsed: float, frequency: float) -> bool:
    """The original's rule: a report is due when whole elapsed seconds reach ``frequency``.

    Written once in Python (and once in the Redis Lua script); every clock uses it.

    Example:
        >>> is_due(2.9, 3), is_due(3.0, 3), is_due(-0.5, 1)
        (False, True, False)
    """
    return int(elapsed) >= frequency


@runtime_checkable
class IntervalClock(Protocol):
    """Decides when a key's window is due and hands it over then.

    ``now`` is the caller's wall clock in seconds: clocks that live in this process (memory,
    an injected cache) use it; a shared clock (Redis ``TIME``) ignores it so that every
    process agrees.
    """

    @property
    def shared(self) -> bool:
        """``True`` when :meth:`claim` may do I/O (run it off the caller's thread)."""
        ...

    def due(self, key: str, frequency: float, now: float | None = None) -> bool:
        """Without I/O (safe on the caller thread): may a :meth:`claim` now win?

        ``False`` only when ``key``'s interval cannot be due yet; ``True`` when it is or
        may be due (unknown included; the first claim starts the interval).
        """
        ...

    def claim(self, key: str, frequency: float, now: float | None = None) -> Window | None:
        """Atomically decide whether ``key``'s interval is due and, if so, take its window.

        The first call for a key starts the interval and returns ``None``. When whole
        seconds elapsed since the last report are ``>= frequency`` (:func:`is_due`),
        exactly one caller (across processes, for a shared store) gets the merged window
        and the interval restarts; every other caller gets ``None``.
        """
        ...


@runtime_checkable
class Store(IntervalClock, Protocol):
    """Holds one window per key and the interval clock of each key.

    Keys are opaque strings; the reporter passes tenant-scoped keys
    (:meth:`mmagg.tenant.Tenant.scoped`), so two tenants never share a window. The caller
    thread only ever calls :meth:`window` and :meth:`due`; every other method may do I/O
    and is called from the reporter's background thread (or from a synchronous report,
    where the caller waits anyway).
    """

    def window(self, key: str) -> Window:
        """The window this process collects into for ``key``.

        All users of ``key`` in a process get the same object until it is taken.
        """
        ...

    def take(self, key: str) -> Window:
        """Take everything collected for ``key`` now (flush / close), without the clock."""
        ...

    def give_back(self, key: str, window: Window) -> None:
        """Merge a window whose report failed back into ``key``'s state."""
        ...

    def close(self) -> None:
        """Release connections and threads; what is pending stays for :meth:`take`."""
        ...
