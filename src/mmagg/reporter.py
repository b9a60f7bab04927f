"""The reporter: the one place that decides *when* a report leaves.

Shaped like OpenTelemetry's batch processor: a :class:`Reporter` is built with its
configuration fixed (tenant, aggregator key, frequency, extensions, timeouts) and one
injected :class:`Exporter` (the *where*, e.g. :class:`mmagg.client.HttpExporter`). It owns
the per-frame step (add to the window, ask the interval clock whether a report is due,
hand the window to the sender), at most one send in flight, merge-back of failed windows,
the shutdown deadline and fork handling. It logs instead of raising: the video loop never
sees an exception because monitoring failed.

The process's reporters live in :data:`REPORTERS`, one per (store, tenant, aggregator key):
faces (``Aggregator``, the block, sinks) with the same tenant and key share one reporter,
and therefore one aggregation.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from mmagg._secrets import get_logger, redact
from mmagg.outcomes import (
    MESSAGE_BACKGROUND,
    MESSAGE_ERROR_PREFIX,
    MESSAGE_NOT_IN_RANGE,
    MESSAGE_SENT,
    Counters,
    predictions_text,
)
from mmagg.stores.base import IntervalClock, Store

if TYPE_CHECKING:
    import httpx

    from mmagg.cache import Cache
    from mmagg.client import RetryPolicy
    from mmagg.outcomes import ExportResult
    from mmagg.predictions import PredictionBatch
    from mmagg.tenant import Tenant
    from mmagg.window import Window

__all__ = [
    "MESSAGE_BACKGROUND",
    "MESSAGE_ERROR_PREFIX",
    "MESSAGE_NOT_IN_RANGE",
    "MESSAGE_SENT",
    "REPORTERS",
    "ConfigMismatchError",
    "Counters",
    "Exporter",
    "Reporter",
    "ReporterConfig",
    "ReporterRegistry",
    "open_reporter",
    "validate_frequency",
]

_WORKSPACE_CACHES: dict[str, Cache] = {}
_WORKSPACE_CACHES_LOCK = threading.Lock()

DEFAULT_FLUSH_TIMEOUT = 5.0
_SEND_LOCK_WAIT = 60.0

logger = get_logger("mmagg.reporter")


#: How long close() waits, after interrupting a send that outlived the flush deadline, for
#: that send's outcome (a wait between retries ends at once; a hung request does not).
_CANCEL_GRACE = 0.25


#: How often the own sender looks at its pending slot while a report is expected (from the
#: last report until ``frequency`` + :data:`_POLL_SLACK` seconds after it): the report call
#: then only stores the window, it never wakes the sender (no futex wake, no GIL hand-over
#: on the video loop), and a report waits at most this long. Outside that span the sender
#: sleeps until woken, and the report call wakes it as before.
_POLL_INTERVAL = 0.05

#: How long past the expected next report the sender keeps polling: covers frames that come
#: late (a stalled camera, a slow model, frame rates down to 0.5 fps); a stream that stops
#: for longer costs one wake on its next report.
_POLL_SLACK = 2.0

#: Longer intervals are not polled (the report call wakes the sender, once a minute at
#: most): polling a whole hour for one report is not worth the wake it saves.
_POLL_MAX_FREQUENCY = 60

#: Bumped in a forked child (``os.register_at_fork``): the per-frame step compares it instead
#: of asking the kernel for the pid on every frame.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


def default_flush_timeout() -> float:
    return float(os.environ.get("MMAGG_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT))


class _Tally:
    """Mutable counters behind a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.collected = 0

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self.lock:
                self.values[name] += n

    def collect(self, n: int) -> None:
        """``add("collected", n)`` for the per-frame step: no name to look up."""
        with self.lock:
            self.collected += n

    def drop(self, reason: str, n: int) -> None:
        if n:
            with self.lock:
                self.dropped[reason] += n

    def snapshot(self) -> Counters:
        with self.lock:
            v = self.values
            return Counters(
                collected=self.collected,
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


class Exporter(Protocol):
    """Where reports go (:class:`mmagg.client.HttpExporter`); the reporter decides when.

    ``export`` raises on failure: an exception with ``retryable = False`` (a backend's 4xx)
    drops the window, anything else merges it back for the next report.
    """

    @property
    def retried(self) -> int:
        """Retries inside exports so far."""
        ...

    def prepare(self) -> None:
        """One-off set-up, called once on the thread that creates the reporter."""
        ...

    def export(self, window: Window, metadata: Mapping[str, Any]) -> ExportResult | None:
        """Send ``window``: ``None`` when it went as one report, an
        :class:`~mmagg.outcomes.ExportResult` when it took several (what went, what was
        dropped, what is left); raises when nothing went."""
        ...

    def shutdown(self, *, cancel: bool) -> None:
        """Stop (``cancel``: interrupt a send in flight instead of closing gracefully)."""
        ...

    @property
    def last_error(self) -> str | None:
        """What the latest failed attempt met (named in the log when close gives up)."""
        ...


Outcome = tuple[bool, str]
_NOT_IN_RANGE: Outcome = (False, MESSAGE_NOT_IN_RANGE)


def validate_frequency(frequency: object) -> int:
    """A whole number of seconds ≥ 1 (a selector may deliver ``"5"``).

    Example:
        >>> validate_frequency("5")
        5
        >>> validate_frequency(0)
        Traceback (most recent call last):
        ...
        ValueError: frequency: expected a whole number of seconds >= 1, got 0
    """
    if type(frequency) is int and frequency >= 1:  # the common case, first
        return frequency
    value: Any = frequency
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isdigit() else text
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"frequency: expected a whole number of seconds >= 1, got {frequency!r}")
    return value


@dataclass(frozen=True, slots=True)
class ReporterConfig:
    """What a reporter is built with and never changes afterwards.

    Example:
        >>> ReporterConfig(frequency=5).differences(ReporterConfig(frequency=10))
        ['frequency=5 (asked: 10)']
    """

    frequency: int
    extensions: bool = False
    device: str | None = None
    request_timeout: float | None = None
    flush_timeout: float | None = None
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        validate_frequency(self.frequency)

    def differences(self, other: ReporterConfig) -> list[str]:
        """The settings in which ``other`` differs from this one, as ``name=mine (asked: x)``."""
        return [
            f"{f.name}={getattr(self, f.name)!r} (asked: {getattr(other, f.name)!r})"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


class ConfigMismatchError(ValueError):
    """Two faces (aggregators, blocks, sinks) of one tenant and aggregator key asked for
    different settings: they would share one aggregation, so they must agree."""


class Reporter:
    """Collects and sends the windows of one aggregator key of one tenant.

    At most one send is in flight; windows that arrive meanwhile are merged into one
    pending window (never queued); a failed send gives its window back to the store so
    the next report carries it; 4xx refusals are dropped and counted.

    Build reporters with :meth:`ReporterRegistry.get` (:data:`REPORTERS`): one per
    (store, tenant, key) per process.
    """

    def __init__(
        self,
        key: str,
        *,
        tenant: Tenant,
        store: Store,
        exporter: Exporter,
        config: ReporterConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.tenant = tenant
        #: The key of this reporter's state in the store: tenant-scoped.
        self.store_key = tenant.scoped(key)
        self.store = store
        self.exporter = exporter
        self.config = config
        self.flush_timeout = (
            default_flush_timeout() if config.flush_timeout is None else config.flush_timeout
        )
        self._clock = clock
        self.tally = _Tally()
        self._reset_state()

    def __repr__(self) -> str:
        return (
            f"Reporter(key={self.key!r}, base_url={self.tenant.base_url!r}, "
            f"frequency={self.config.frequency})"
        )

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._fork_generation = _fork_generation
        self._pending: Window | None = None
        self._in_flight = False
        self._closing = False
        # Set for the final flush of close(): a failure then cannot be carried to a later
        # report, so it is counted as dropped instead of given back to the store.
        self._final = False
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # While non-zero (a monotonic deadline), the own sender polls the pending slot every
        # _POLL_INTERVAL and nobody needs to wake it; zero: it sleeps until woken.
        self._polling_until = 0.0
        self._window_started = self._clock()
        self._claim_requested: IntervalClock | None = None
        #: The time to claim at (the report frame's ``now``), or ``None``: the runner's clock.
        self._claim_now: float | None = None
        self._claim_in_progress = False
        #: The own sender is claiming (``wait_idle`` and ``flush`` wait for it).
        self._sender_claiming = False
        # Predictions of the window being sent; close() counts them as dropped when it
        # gives up on that send (``_abandoned``), and the send's late outcome corrects it.
        self._in_flight_predictions = 0
        self._abandoned = False

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # A forked child must not re-send (nor wait on) its parent's data.
            self._reset_state()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran (in this process)."""
        return self._closing and self._pid == os.getpid()

    @property
    def in_this_process(self) -> bool:
        """``False`` in a forked child until the reporter is used there."""
        return self._pid == os.getpid()

    @property
    def frequency(self) -> int:
        """The reporting interval in seconds (fixed at construction)."""
        return self.config.frequency

    def prepare(self) -> None:
        """One-off set-up on the calling thread (see :meth:`Exporter.prepare`)."""
        self.exporter.prepare()

    def counters(self) -> Counters:
        """What happened so far (a snapshot)."""
        snapshot = self.tally.snapshot()
        return Counters(
            collected=snapshot.collected,
            rejected=snapshot.rejected,
            sent=snapshot.sent,
            failed=snapshot.failed,
            retried=self.exporter.retried,
            merged_back=snapshot.merged_back,
            dropped=snapshot.dropped,
        )

    def reject(self, n: int = 1) -> None:
        """Count ``n`` inputs a face refused."""
        self.tally.add("rejected", n)

    def drop(self, reason: str, n: int) -> None:
        """Count ``n`` predictions given up for ``reason``."""
        self.tally.drop(reason, n)

    # -- the per-frame step (caller thread) --------------------------------------------------

    def start(self, now: float) -> None:
        """Start the interval now, as the face is created (a process-local clock only;
        a shared clock starts at the first claim)."""
        self._check_fork()
        if not self.store.shared:
            window = self.store.claim(self.store_key, self.config.frequency, now)
            if window is not None and not window.is_empty():  # the next report carries it
                self.submit(window)

    def step(
        self,
        batch: PredictionBatch | None,
        *,
        model_id: str,
        now: float,
        fire_and_forget: bool,
        source_id: str = "",
        interval: IntervalClock | None = None,
        background_tasks: BackgroundTasksLike | None = None,
        executor: ExecutorLike | None = None,
    ) -> Outcome:
        """One frame: add ``batch`` to the window, ask the clock, report if due.

        ``interval``: the clock to ask (default: the store's); the block passes the adapter
        of its injected cache. A clock that does I/O is claimed by the background runner,
        never on this thread. Returns ``(error_status, message)`` with the original's
        messages. Raises only what the store or window raise on a bug (the faces catch it).
        """
        if self._fork_generation != _fork_generation:
            self._check_fork()
        if batch is not None:
            taken = self.store.window(self.store_key).add(
                batch, model_id=model_id, source_id=source_id, seen_at=now
            )
            if taken:
                self.tally.collect(taken)
        clock = self.store if interval is None else interval
        frequency = self.config.frequency
        if self._claim_in_progress or not clock.due(self.store_key, frequency, now):
            return _NOT_IN_RANGE
        if clock.shared:
            return self._dispatch(fire_and_forget, clock, background_tasks, executor)
        if (
            self._polling_until
            and fire_and_forget
            and background_tasks is None
            and executor is None
        ):
            # The own sender polls (a report was expected): it claims the interval too, at
            # this frame's time, as if claimed here (same cache value, same interval), within
            # _POLL_INTERVAL. The report call itself only stores the request: no cache read
            # or write, no window swap, no wake (frames that arrive before the sender takes
            # the window go into this report instead of the next one).
            return self._dispatch(True, clock, None, None, now=now)
        window = clock.claim(self.store_key, frequency, now)
        if window is None:
            return _NOT_IN_RANGE
        # The report call only swapped the window (constant time); the sender (or the
        # runner, or a synchronous drain) reads it: its fold, table and merge happen there.
        if fire_and_forget and background_tasks is None and executor is None:
            self._hand_over(window, None)  # one lock; no wake while the sender polls
            return False, MESSAGE_BACKGROUND
        self.submit(window, wake=False)  # _dispatch hands the send to the runner
        return self._dispatch(fire_and_forget, None, background_tasks, executor)

    def submit(self, window: Window, *, wake: bool = True) -> None:
        """Add ``window`` to the pending one (no I/O, constant time: the pending window
        absorbs it, and whoever reads the pending window merges; beyond
        :data:`~mmagg.window.MAX_ABSORBED` unmerged windows they are merged at once, so a
        long fault keeps memory flat). ``wake``: wake the own sender thread."""
        if self._fork_generation != _fork_generation:
            self._check_fork()
        with self._cond:
            self._park(window)
            if wake:
                self._cond.notify_all()

    def _park(self, window: Window) -> None:  # holding self._cond
        """Put ``window`` in the pending slot, or let the pending window absorb it."""
        if self._pending is None:
            self._pending = window
        else:
            self._pending.absorb(window)

    def _dispatch(
        self,
        fire_and_forget: bool,
        claim: IntervalClock | None,
        background_tasks: BackgroundTasksLike | None,
        executor: ExecutorLike | None,
        *,
        now: float | None = None,
    ) -> Outcome:
        """Report now (synchronously) or hand it to a runner; ``claim``: a clock to claim
        the interval from first, in the runner (at ``now``; ``None``: the runner's clock)."""
        if not fire_and_forget:
            outcome = self._claim_and_drain(claim) if claim is not None else self.drain(True)
            return outcome or _NOT_IN_RANGE
        task: Callable[[], Outcome | None]
        if claim is not None:
            # One claim queued at a time: callers see "not in range" until it has run.
            self._claim_in_progress = True
            task = lambda: self._claim_and_drain(claim)  # noqa: E731
        else:
            task = self.drain
        if background_tasks is not None:
            background_tasks.add_task(task)
        elif executor is not None:
            executor.submit(task)
        else:
            self._hand_over(None, claim, now)
        return False, MESSAGE_BACKGROUND

    # -- sending (runner threads) ------------------------------------------------------------

    def _claim_and_drain(self, clock: IntervalClock, now: float | None = None) -> Outcome | None:
        """Claim the interval from ``clock`` (at ``now``, else the reporter's clock's now);
        report if this process won it."""
        if not self._claim(clock, now):
            return None
        return self.drain(blocking=True)

    def _claim(self, clock: IntervalClock, now: float | None) -> bool:
        """Claim the interval and put the window in the pending slot; ``True`` if won."""
        window: Window | None = None
        try:
            when = self._clock() if now is None else now
            window = clock.claim(self.store_key, self.config.frequency, when)
        except Exception as exc:  # the store reports its own outages; never raise here
            logger.warning("mmagg: interval claim failed: %s", redact(str(exc)))
        finally:
            self._claim_in_progress = False
            with self._cond:
                if window is not None:
                    self._park(window)
                # The own sender's claim is over (its window, if any, is pending): flush
                # and wait_idle go on from here.
                self._sender_claiming = False
                self._cond.notify_all()
        return window is not None

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
        _, stats, rejected, dropped_classes = window.snapshot()
        self.tally.drop("max_classes", dropped_classes)
        self.tally.add("rejected", rejected)
        window.rejected_nonfinite = window.dropped_max_classes = 0  # counted once
        if rejected:
            logger.warning(
                "mmagg: %s refused at collect time (%s): confidence not a number within "
                "[0, 1] (NaN, infinite or out of range); counted as rejected",
                predictions_text(rejected),
                self.key,
            )
        predictions = sum(s.count for s in stats.values())
        self._in_flight_predictions = predictions
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        metadata = {
            "timestamp": now,
            "aggregator_key": self.key,
            "frequency": self.config.frequency,
            "window_start": datetime.fromtimestamp(self._window_started, timezone.utc).isoformat(),
            "window_end": now.isoformat(),
        }
        try:
            result = self.exporter.export(window, metadata)
        except Exception as error:  # a ReportError, or a bug: keep the data unless refused
            return self._failed(window, predictions, error)
        with self._cond:
            abandoned, self._abandoned = self._abandoned, False
        if abandoned:  # close() counted it as dropped: it arrived after all
            self.tally.drop("shutdown", -predictions)
        if result is None:  # one report, all delivered
            self._window_started = now.timestamp()
            self.tally.add("sent")
            return False, MESSAGE_SENT
        return self._partly_sent(result, now)

    def _partly_sent(self, result: ExportResult, now: datetime) -> Outcome:
        """Account for a window that went as several reports (over the body limit)."""
        for reason, n in result.dropped.items():
            self.tally.drop(reason, n)
        if result.reports:
            self._window_started = now.timestamp()
            self.tally.add("sent", result.reports)
        refused = {k: v for k, v in result.dropped.items() if k.startswith("http_")}
        if refused:
            logger.warning(
                "mmagg: backend refused part of a report, dropped: %s; %s",
                ", ".join(f"{predictions_text(n)} ({k})" for k, n in refused.items()),
                redact(str(result.error)),
            )
        error = result.error
        if result.undelivered is not None and error is not None:
            leftover = result.undelivered
            return self._failed(leftover, sum(s.count for s in leftover.stats().values()), error)
        if error is not None:
            self.tally.add("failed")
            kind = getattr(error, "kind", type(error).__name__)
            text = redact(str(error))
            return True, f"{MESSAGE_ERROR_PREFIX}. Error type: {kind}. Details: {text}"
        if not result.reports:  # every result alone was over the backend's body limit
            self.tally.add("failed")
            lost = predictions_text(sum(result.dropped.values()))
            return True, (
                f"{MESSAGE_ERROR_PREFIX}. Error type: too_large. Details: {lost} dropped: "
                "each class's result alone exceeds the backend's body limit"
            )
        return False, MESSAGE_SENT

    def _failed(self, window: Window, predictions: int, error: Exception) -> Outcome:
        text = redact(str(error))
        status = getattr(error, "status", None)
        with self._cond:
            # close() gave up on this send and counted it (as "shutdown") already.
            counted, self._abandoned = self._abandoned, False
        if counted:
            self.tally.drop("shutdown", -predictions)
        if not getattr(error, "retryable", True):
            self.tally.drop(f"http_{status}", predictions)
            logger.warning(
                "mmagg: backend refused a report of %s (HTTP %s), dropped: %s",
                predictions_text(predictions),
                status,
                text,
            )
        elif self._closing or self._final:
            self.tally.drop("shutdown", predictions)
            logger.warning(
                "mmagg: report failed at shutdown, %s dropped: %s",
                predictions_text(predictions),
                text,
            )
        else:
            try:
                self.store.give_back(self.store_key, window)
                self.tally.add("merged_back")
            except Exception as exc:
                self.tally.drop("store_unavailable", predictions)
                logger.warning("mmagg: could not keep a failed window: %s", redact(str(exc)))
            logger.warning("mmagg: report failed, the next report carries its data: %s", text)
        self.tally.add("failed")  # last: a reader that sees it sees the drops too
        kind = getattr(error, "kind", type(error).__name__)
        return True, f"{MESSAGE_ERROR_PREFIX}. Error type: {kind}. Details: {text}"

    # -- the own background sender -----------------------------------------------------------

    def _hand_over(
        self, window: Window | None, claim: IntervalClock | None, now: float | None = None
    ) -> None:
        """The report call's hand-over to the own sender: store ``window`` in the pending
        slot (or ``claim``: a clock for the sender to claim from, at ``now``) under one
        lock. While the sender polls (a report was expected), that is all: it finds the
        slot within :data:`_POLL_INTERVAL`. Otherwise wake it (start it the first time)."""
        with self._cond:
            if window is not None:
                self._park(window)
            if claim is not None:
                self._claim_requested = claim
                self._claim_now = now
            if self._polling_until:
                return
            self._start_or_notify()

    def _wake(self) -> None:
        """Wake the own sender now (flush, close): never left to its next poll."""
        with self._cond:
            self._start_or_notify()

    def _start_or_notify(self) -> None:  # holding self._cond
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name=f"mmagg-sender-{self.key[:40]}", daemon=True
            )
            self._thread.start()
        self._cond.notify_all()

    def _poll_deadline(self) -> float:
        """Until when the sender polls after a report (0: it does not, long intervals)."""
        frequency = self.config.frequency
        if frequency > _POLL_MAX_FREQUENCY:
            return 0.0
        return time.monotonic() + frequency + _POLL_SLACK

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (
                        self._pending is None
                        and self._claim_requested is None
                        and not self._closing
                    ):
                        if self._polling_until > time.monotonic():
                            self._cond.wait(_POLL_INTERVAL)
                        else:
                            # From here on the report call wakes the sender (under this
                            # lock, so no hand-over is missed).
                            self._polling_until = 0.0
                            self._cond.wait()
                    if self._closing and self._pending is None:
                        return
                    claim, self._claim_requested = self._claim_requested, None
                    claim_now, self._claim_now = self._claim_now, None
                    self._sender_claiming = claim is not None
                    # A report is being handed over: the next one is expected about
                    # `frequency` seconds from now (armed again after the send, below).
                    self._polling_until = self._poll_deadline()
                try:
                    if claim is not None:
                        self._claim(claim, claim_now)  # clears _sender_claiming
                    self.drain(blocking=True)
                except Exception:  # the sender must survive anything
                    logger.exception("mmagg: unexpected error in the background sender")
                # The next report is expected about `frequency` seconds from now: poll
                # until a little after, so that its report call need not wake this thread.
                self._polling_until = self._poll_deadline()
        finally:
            with self._cond:  # a sender that is gone polls nothing: wake the next one
                self._polling_until = 0.0

    # -- flush and close ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything collected so far; ``True`` if it was all handled in time."""
        self._check_fork()
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        # A claim the own sender was asked for comes first (it takes the window of the
        # interval that came due; the take below takes what came after): run it here if the
        # sender has not started it, or let the sender finish it.
        with self._cond:
            claim, self._claim_requested = self._claim_requested, None
            claim_now, self._claim_now = self._claim_now, None
            while self._sender_claiming and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        if claim is not None:
            self._claim(claim, claim_now)
        try:
            window = self.store.take(self.store_key)
        except Exception as exc:
            logger.warning("mmagg: could not take the window at flush: %s", redact(str(exc)))
            window = None
        if window is not None and not window.is_empty():
            self.submit(window)
        with self._cond:
            if (
                self._pending is None
                and not self._in_flight
                and self._claim_requested is None
                and not self._sender_claiming
            ):
                return True
        self._wake()
        return self.wait_idle(max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or in flight (collected data stays collected)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (
                self._pending is not None
                or self._in_flight
                or self._claim_requested is not None  # the own sender claims next
                or self._sender_claiming
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None, *, grace: float = _CANCEL_GRACE) -> bool:
        """Flush within ``timeout`` then stop; what could not be sent is counted as dropped.

        Returns ``True`` only if the final flush delivered everything it carried (nothing
        dropped during close on the way out: deadline, refusal, ``too_large``; predictions
        the cardinality guard refused at collect time are counted, not delivery failures).

        The counters read right after ``close`` include everything it dropped. ``grace``:
        after the deadline, how long to wait for the interrupted send's own outcome (its
        cause then appears in the log first); a send still in flight after it is counted
        as dropped at once, and corrected if it arrives after all.
        """
        self._check_fork()
        if self._closing:
            return True
        self._final = True
        dropped_before = self.tally.dropped["shutdown"]
        all_dropped_before = self._dropped_total()
        done = self.flush(timeout)
        if not done:
            # Interrupt the send in flight (a wait between retries ends at once) and give
            # it a moment to come back with its outcome.
            self.exporter.shutdown(cancel=True)
            self.wait_idle(grace)
        with self._cond:
            self._closing = True
            leftover, self._pending = self._pending, None
            in_flight = self._in_flight_predictions if self._in_flight else 0
            self._abandoned = self._in_flight
            self._cond.notify_all()
        pending = sum(s.count for s in leftover.stats().values()) if leftover is not None else 0
        self.tally.drop("shutdown", pending + in_flight)
        if not done:
            # At interpreter exit nobody reads the counters: say it where it can be seen.
            dropped = self.tally.dropped["shutdown"] - dropped_before
            cause = self.exporter.last_error
            logger.warning(
                "mmagg: flush timeout passed at close (%s): %s dropped%s%s",
                self.key,
                predictions_text(dropped),
                f" ({in_flight} in a report still in flight)" if in_flight else "",
                f"; last error: {redact(cause)}" if cause else "",
            )
        else:
            self.exporter.shutdown(cancel=False)
        # True only if everything the final flush carried was delivered: a part refused
        # (4xx) or too large for the backend is a loss as much as a missed deadline.
        return done and self._dropped_total() == all_dropped_before

    def _dropped_total(self) -> int:
        """Predictions lost on the way out: all drops but the cardinality guard's, which
        refuses at collect time (like a rejected prediction) and is counted at the send."""
        with self.tally.lock:
            return sum(n for reason, n in self.tally.dropped.items() if reason != "max_classes")


class ReporterRegistry:
    """The process's reporters, one per (store, tenant, aggregator key).

    Same tenant and key: one shared reporter (one aggregation). Different tenant (backend
    URL or API key): never shared. Asking for an open reporter with other settings raises
    :class:`ConfigMismatchError` naming them. Closed reporters are forgotten; a forked
    child starts with none.

    Example:
        >>> registry = ReporterRegistry()
        >>> len(registry.live())
        0
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._reporters: dict[tuple[int, Tenant, str], Reporter] = {}

    def after_fork_in_child(self) -> None:
        """Forget the parent's reporters (their data belongs to the parent)."""
        self._reset()

    def get(
        self,
        key: str,
        *,
        tenant: Tenant,
        store: Store,
        config: ReporterConfig,
        exporter: Callable[[], Exporter],
        clock: Callable[[], float] = time.time,
    ) -> Reporter:
        """The open reporter of ``(store, tenant, key)``, built on first use.

        ``exporter`` is called only when a reporter is built.
        """
        if self._pid != os.getpid():
            self._reset()
        registry_key = (id(store), tenant, key)
        with self._lock:
            reporter = self._reporters.get(registry_key)
            if reporter is not None and not reporter.closed:
                differences = reporter.config.differences(config)
                if differences:
                    raise ConfigMismatchError(
                        f"unique_aggregator_key {key!r}: already reporting to "
                        f"{tenant.base_url} with this API key with "
                        f"{', '.join(differences)}; faces sharing a key share one "
                        "aggregation, so give them the same settings, use another "
                        "unique_aggregator_key, or close the first one"
                    )
                return reporter
            # Forget closed reporters: an application that makes (and closes) an aggregator
            # per video file must not keep every reporter and its client for its life.
            for stale in [k for k, r in self._reporters.items() if r.closed]:
                del self._reporters[stale]
            reporter = Reporter(
                key, tenant=tenant, store=store, exporter=exporter(), config=config, clock=clock
            )
            self._reporters[registry_key] = reporter
        reporter.prepare()
        return reporter

    def live(self) -> list[Reporter]:
        """The open reporters of this process."""
        if self._pid != os.getpid():
            return []
        with self._lock:
            return [r for r in self._reporters.values() if not r.closed]

    def close_all(self, timeout: float) -> None:
        """Close every open reporter within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        for reporter in self.live():
            # No grace at exit: one deadline for all, however many reporters are stuck.
            reporter.close(max(0.0, deadline - time.monotonic()), grace=0.0)


#: The process-wide registry every face uses.
REPORTERS = ReporterRegistry()


def open_reporter(
    key: str,
    *,
    store: Store,
    api_key: str,
    api_base_url: str | None,
    frequency: int,
    cache: Cache | None = None,
    device: str | None = None,
    extensions: bool = False,
    request_timeout: float | None = None,
    flush_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Reporter:
    """The process's one reporter for ``key`` of this tenant (backend URL + API key),
    exporting over HTTP (:class:`mmagg.client.HttpExporter`).

    Faces of the same tenant and key share it (one aggregation); another backend or
    another API key gets its own reporter, window, HTTP client and store keys.

    Raises:
        ConfigMismatchError: an open reporter of this tenant and key has other settings.
    """
    from mmagg.client import HttpExporter, resolve_api_base_url
    from mmagg.tenant import Tenant

    base_url = resolve_api_base_url(api_base_url)
    config = ReporterConfig(
        frequency=frequency,
        extensions=extensions,
        device=device,
        request_timeout=request_timeout,
        flush_timeout=flush_timeout,
        retry=retry,
    )

    def exporter() -> HttpExporter:
        return HttpExporter(
            api_key,
            api_base_url=base_url,
            device=device,
            extensions=extensions,
            request_timeout=request_timeout,
            retry=retry,
            cache=cache if cache is not None else _workspace_cache(base_url),
            transport=transport,
        )

    return REPORTERS.get(
        key,
        tenant=Tenant.of(base_url, api_key),
        store=store,
        config=config,
        exporter=exporter,
        clock=clock,
    )


def _workspace_cache(base_url: str) -> Cache:
    # One per backend: the original's workspace cache key is the API key's md5 only.
    from mmagg.cache import MemoryCache

    with _WORKSPACE_CACHES_LOCK:
        cache = _WORKSPACE_CACHES.get(base_url)
        if cache is None:
            cache = _WORKSPACE_CACHES[base_url] = MemoryCache()
        return cache


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
    os.register_at_fork(after_in_child=REPORTERS.after_fork_in_child)
atexit.register(lambda: REPORTERS.close_all(default_flush_timeout()))
