"""Keep CPython's cyclic garbage collector from stalling the server on large reports.

A 10,000-result report makes a few hundred thousand short-lived Python objects (the parsed
JSON, the validated models, the rows). While they are alive, the collector's generation-2
passes walk all of them, holding the GIL for hundreds of milliseconds: every other request
(even `/healthz`, which needs the GIL for a few microseconds) waits that long. None of those
objects form reference cycles (refcounting frees them all), so collecting while a large
report is in flight buys nothing. `collector_paused()` switches the collector off while at
least one large report is being handled, process-wide, and back on after the last one.

Example:
    >>> import gc
    >>> with collector_paused():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_was_enabled = True


@contextmanager
def collector_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block (reentrant across threads)."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, the app) out of the collector's reach.

    Called once the server has started: later full collections walk only what requests
    allocate, not the tens of thousands of long-lived objects of the imports.
    """
    gc.collect()
    gc.freeze()
