"""When and how reports leave: dispatch, the background sender, flush, close, counters.

The reporter owns the *when* (pending window, at most one send in flight, shutdown
deadline); the client owns the *where* (HTTP). It logs instead of raising: the video
loop never sees an exception because monitoring failed.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Protocol

from mmagg._secrets import get_logger, redact
from mmagg.client import ModelMonitoringClient, ReportError
from mmagg.payload import build_payload, inference_server_version, system_info
from mmagg.stores.base import Store
from mmagg.window import Window

__all__ = [
    "MESSAGE_BACKGROUND",
    "MESSAGE_ERROR_PREFIX",
    "MESSAGE_NOT_IN_RANGE",
    "MESSAGE_SENT",
    "Counters",
    "Reporter",
]

MESSAGE_NOT_IN_RANGE = "Not in reporting range, skipping report. (Ok)"
MESSAGE_SENT = "Data sent successfully"
MESSAGE_BACKGROUND = "Reporting happens in the background task"
MESSAGE_ERROR_PREFIX = "Error while uploading inference data"
DEFAULT_FLUSH_TIMEOUT = 5.0
_SEND_LOCK_WAIT = 60.0

logger = get_logger("mmagg.reporter")


def default_flush_timeout() -> float:
    return float(os.environ.get("MMAGG_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT))


@dataclass(frozen=True, slots=True)
class Counters:
    """What happened so far, readable at any time (a snapshot).

    Attributes:
        collected: predictions taken into a window.
        rejected: predictions refused (NaN/inf confidence) plus inputs refused as invalid.
        sent: reports the backend accepted.
        failed: reports that did not go through (each failure once).
        retried: HTTP retries inside reports.
        merged_back: failed windows merged back so that the next report carries them.
        dropped: predictions given up, by reason (``http_<status>`` when the backend
            refused them, ``shutdown`` when the flush deadline passed, ``max_classes``).
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


class _Tally:
    """Mutable counters behind a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self.lock:
                self.values[name] += n

    def drop(self, reason: str, n: int) -> None:
        if n:
            with self.lock:
                self.dropped[reason] += n

    def snapshot(self) -> Counters:
        with self.lock:
            v = self.values
            return Counters(
                collected=v["collected"],
                rejected=v["rejected"],
                sent=v["sent"],
                failed=v["failed"],
                retried=v["retried"],
                merged_back=v["merged_back"],
                dropped=MappingProxyType(dict(self.dropped)),
            )


class BackgroundTasksLike(Protocol):
    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


class ExecutorLike(Protocol):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...


Outcome = tuple[bool, str]


class Reporter:
    """Sends the windows of one aggregator key.

    At most one send is in flight; windows that arrive meanwhile are merged into one
    pending window (never queued); a failed send gives its window back to the store so
    the next report carries it; 4xx refusals are dropped and counted.
    """

    def __init__(
        self,
        key: str,
        *,
        store: Store,
        client_factory: Callable[[Callable[[], None]], ModelMonitoringClient],
        device: str | None = None,
        extensions: bool = False,
        flush_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self._clock = clock
        self.store = store
        self.device = device
        self.extensions = extensions
        self.flush_timeout = default_flush_timeout() if flush_timeout is None else flush_timeout
        self.frequency: float | None = None
        self._client_factory = client_factory
        self.tally = _Tally()
        self._reset_state()
        _LIVE.add(self)

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._client: ModelMonitoringClient | None = None
        self._pending: Window | None = None
        self._in_flight = False
        self._closing = False
        # Set for the final flush of close(): a failure then cannot be carried to a later
        # report, so it is counted as dropped instead of given back to the store.
        self._final = False
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_outcome: Outcome | None = None
        self._window_started = self._clock()
        self._claim_requested: float | None = None
        self._claim_in_progress = False

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # A forked child must not re-send (nor wait on) its parent's data.
            self._reset_state()

    @property
    def client(self) -> ModelMonitoringClient:
        if self._client is None:
            self._client = self._client_factory(lambda: self.tally.add("retried"))
        return self._client

    def prepare(self) -> None:
        """Do the one-off set-up now, on the calling thread: the HTTP client (httpx import,
        TLS context) and the system info hold the GIL for tens of milliseconds, which the
        video loop would feel if the sender did it at the first report."""
        _ = self.client
        system_info()
        inference_server_version()

    def should_claim(self, frequency: float) -> bool:
        """Without I/O: whether a caller should ask for a claim of the shared interval now."""
        return not self._claim_in_progress and self.store.due(self.key, frequency)

    def counters(self) -> Counters:
        return self.tally.snapshot()

    # -- dispatch (caller thread) ------------------------------------------------------------

    def submit(self, window: Window) -> None:
        """Merge ``window`` into the pending one (no I/O)."""
        self._check_fork()
        with self._cond:
            if self._pending is None:
                self._pending = window
            else:
                self._pending.merge_in(window)
            self._cond.notify_all()

    def dispatch(
        self,
        *,
        fire_and_forget: bool,
        frequency: float | None = None,
        background_tasks: BackgroundTasksLike | None = None,
        executor: ExecutorLike | None = None,
    ) -> Outcome:
        """Report what is pending now: synchronously, or handed to a background runner.

        With a shared store the interval is claimed (I/O) in the runner, never here.
        """
        self._check_fork()
        task: Callable[[], Outcome | None]
        if self.store.shared and frequency is not None:
            task = lambda: self.claim_and_drain(frequency)  # noqa: E731
        else:
            task = self.drain
        if not fire_and_forget:
            outcome = task() if self.store.shared else self.drain(blocking=True)
            return outcome or (False, MESSAGE_NOT_IN_RANGE)
        if self.store.shared:
            # One claim queued at a time: callers see "not in range" until it has run.
            self._claim_in_progress = True
        if background_tasks is not None:
            background_tasks.add_task(task)
        elif executor is not None:
            executor.submit(task)
        else:
            self._wake(claim_frequency=frequency if self.store.shared else None)
        return False, MESSAGE_BACKGROUND

    # -- sending (runner threads) ------------------------------------------------------------

    def claim_and_drain(self, frequency: float) -> Outcome | None:
        """Claim the interval in the shared store; report if this process won it."""
        try:
            window = self.store.claim(self.key, frequency)
        except Exception as exc:  # the store reports its own outages; never raise here
            logger.warning("mmagg: interval claim failed: %s", redact(str(exc)))
            return None
        finally:
            self._claim_in_progress = False
        if window is None:
            return None
        self.submit(window)
        return self.drain(blocking=True)

    def drain(self, blocking: bool = False) -> Outcome | None:
        """Send pending windows until none is left; ``None`` if another sender has them."""
        # A synchronous caller waits for the send in flight; a background runner leaves
        # the pending window to the sender that holds the lock (it loops until empty).
        if not self._send_lock.acquire(
            blocking=blocking, timeout=_SEND_LOCK_WAIT if blocking else -1
        ):
            return None
        outcome: Outcome | None = None
        try:
            while True:
                with self._cond:
                    window, self._pending = self._pending, None
                    self._in_flight = window is not None
                if window is None:
                    break
                outcome = self._send(window)
        finally:
            with self._cond:
                self._in_flight = False
                self._cond.notify_all()
            self._send_lock.release()
        return outcome

    def _send(self, window: Window) -> Outcome:
        best, stats, rejected, dropped_classes = window.snapshot()
        self.tally.drop("max_classes", dropped_classes)
        self.tally.add("rejected", rejected)
        window.rejected_nonfinite = window.dropped_max_classes = 0  # counted once
        predictions = sum(s.count for s in stats.values())
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        extension = None
        if self.extensions:
            extension = {
                "aggregator_key": self.key,
                "frequency": self.frequency,
                "window_start": datetime.fromtimestamp(
                    self._window_started, timezone.utc
                ).isoformat(),
                "window_end": now.isoformat(),
            }
        payload = build_payload(
            window.to_results(extensions=self.extensions),
            device=self.device,
            timestamp=now,
            extension=extension,
        )
        try:
            self.client.send(payload, idempotency_key=uuid.uuid4().hex)
        except ReportError as error:
            return self._failed(window, predictions, error, error.retryable)
        except Exception as error:  # a bug or an unexpected library error: keep the data
            return self._failed(window, predictions, error, True)
        self._window_started = now.timestamp()
        self.tally.add("sent")
        outcome = (False, MESSAGE_SENT)
        self._last_outcome = outcome
        return outcome

    def _failed(self, window: Window, predictions: int, error: Exception, keep: bool) -> Outcome:
        self.tally.add("failed")
        text = redact(str(error))
        status = getattr(error, "status", None)
        if not keep:
            self.tally.drop(f"http_{status}", predictions)
            logger.warning(
                "mmagg: backend refused a report of %d predictions (HTTP %s), dropped: %s",
                predictions,
                status,
                text,
            )
        elif self._closing or self._final:
            self.tally.drop("shutdown", predictions)
            logger.warning(
                "mmagg: report failed at shutdown, %d predictions dropped: %s", predictions, text
            )
        else:
            try:
                self.store.give_back(self.key, window)
                self.tally.add("merged_back")
            except Exception as exc:
                self.tally.drop("store_unavailable", predictions)
                logger.warning("mmagg: could not keep a failed window: %s", redact(str(exc)))
            logger.warning("mmagg: report failed, the next report carries its data: %s", text)
        kind = getattr(error, "kind", type(error).__name__)
        outcome = (True, f"{MESSAGE_ERROR_PREFIX}. Error type: {kind}. Details: {text}")
        self._last_outcome = outcome
        return outcome

    # -- the own background sender -----------------------------------------------------------

    def _wake(self, claim_frequency: float | None = None) -> None:
        with self._cond:
            if claim_frequency is not None:
                self._claim_requested = claim_frequency
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"mmagg-sender-{self.key[:40]}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and self._claim_requested is None and not self._closing:
                    self._cond.wait()
                if self._closing and self._pending is None:
                    return
                claim, self._claim_requested = self._claim_requested, None
            try:
                if claim is not None:
                    self.claim_and_drain(claim)
                self.drain(blocking=True)
            except Exception:  # the sender must survive anything
                logger.exception("mmagg: unexpected error in the background sender")

    # -- flush and close ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything collected so far; ``True`` if it was all handled in time."""
        self._check_fork()
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        try:
            window = self.store.take(self.key)
        except Exception as exc:
            logger.warning("mmagg: could not take the window at flush: %s", redact(str(exc)))
            window = None
        if window is not None and not window.is_empty():
            self.submit(window)
        with self._cond:
            if self._pending is None and not self._in_flight:
                return True
        self._wake()
        with self._cond:
            while self._pending is not None or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or in flight (collected data stays collected)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush within ``timeout`` then stop; what could not be sent is counted as dropped."""
        if self._closing:
            return True
        self._final = True
        dropped_before = self.tally.dropped["shutdown"]
        done = self.flush(timeout)
        with self._cond:
            self._closing = True
            leftover, self._pending = self._pending, None
            self._cond.notify_all()
        not_sent = sum(s.count for s in leftover.stats().values()) if leftover is not None else 0
        self.tally.drop("shutdown", not_sent)
        if not done:
            # At interpreter exit nobody reads the counters: say it where it can be seen.
            logger.warning(
                "mmagg: flush timeout passed at close (%s): %d pending predictions dropped, %s",
                self.key,
                not_sent,
                "a report still in flight" if self._in_flight else "nothing in flight",
            )
        if self._client is not None:
            self._client.cancel()
            if done:
                self._client.close()
        _LIVE.discard(self)
        return done and self.tally.dropped["shutdown"] == dropped_before


_LIVE: weakref.WeakSet[Reporter] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + default_flush_timeout()
    for reporter in list(_LIVE):
        if reporter._pid != os.getpid():
            continue
        reporter.close(max(0.0, deadline - time.monotonic()))


atexit.register(_close_all_at_exit)
