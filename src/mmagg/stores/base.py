"""The ``Store`` protocol: what the reporter needs from wherever windows live."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mmagg.window import Window

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """Holds one window per aggregator key and, when ``shared``, the interval clock.

    The caller thread only ever calls :meth:`window` and adds to what it returns; every
    other method may do I/O and is called from the reporter's background thread (or
    from a synchronous report, where the caller waits anyway).
    """

    @property
    def shared(self) -> bool:
        """``True`` when several processes see the same state (the interval clock then
        lives in the store, not in the per-process cache). Read-only: a class attribute
        ``shared = False`` satisfies it."""
        ...

    def window(self, key: str) -> Window:
        """The window this process collects into for ``key``.

        All users of ``key`` in a process get the same object until it is taken.
        """
        ...

    def due(self, key: str, frequency: float) -> bool:
        """Without I/O (safe on the caller thread): may a :meth:`claim` now win?

        ``False`` only when ``key``'s interval cannot be due yet; ``True`` when it is or
        may be due (unknown included; the first claim starts the interval). With a shared
        store use this, not a per-process clock, to decide when to claim: a process whose
        own clock says "due" a little before the shared interval ends would miss it.
        """
        ...

    def claim(self, key: str, frequency: float) -> Window | None:
        """Atomically decide whether ``key``'s interval is due and, if so, take its window.

        The first call for a key starts the interval and returns ``None``. When whole
        seconds elapsed since the last report are ``>= frequency``, exactly one caller
        (across processes, for a shared store) gets the merged window, and the interval
        restarts; every other caller gets ``None``.
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
