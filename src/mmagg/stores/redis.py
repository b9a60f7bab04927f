"""Shared state in Redis: one aggregation and one interval clock across processes and hosts.

Each process collects into a local window (the caller thread never waits on Redis); a
daemon thread pushes it every ``push_interval`` through a Lua script that keeps the best
sample per key and sums the statistics atomically. The interval is claimed by another
script on Redis's own clock (``TIME``), so of all processes that find it due, exactly one
takes the merged window and reports. When Redis is unreachable the process keeps
collecting and reports by itself on a local clock until Redis is back.

Redis layout per aggregator key ``K`` (``{K}`` is a cluster hash tag: one slot per key)::

    mmagg:{K}:best    hash  field [model_id, class_name, source_id] -> best sample
    mmagg:{K}:stats   hash  same field -> [count, sum, min, max, 10 histogram buckets]
    mmagg:{K}:meta    hash  rejected / dropped counters of the window
    mmagg:{K}:clock   string  start of the current interval (Redis TIME, seconds)
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mmagg.stores._lua import CLAIM, MERGE, TAKE
from mmagg.stores.base import is_due
from mmagg.window import DEFAULT_MAX_CLASSES, ClassStats, Key, Sample, Window

try:  # redis-py >= 8 probes every new connection for maintenance push notifications
    from redis.maint_notifications import MaintNotificationsConfig

    _CONNECTION_OPTIONS: dict[str, Any] = {
        "maint_notifications_config": MaintNotificationsConfig(enabled=False)
    }
except ImportError:  # pragma: no cover - redis-py 5..7
    _CONNECTION_OPTIONS = {}

__all__ = ["RedisStore", "redact_url"]

logger = logging.getLogger(__name__)

#: Names of :meth:`RedisStore.counters`.
COUNTERS = (
    "round_trips",  # script calls that reached Redis
    "pushes",  # round trips that carried a non-empty window
    "push_failures",  # round trips that failed (their window stays local)
    "outages",  # transitions healthy -> degraded
    "claims_won",  # intervals this process won in Redis
    "local_claims",  # intervals reported from the local clock while degraded
    "given_back",  # failed reports merged back into Redis
)


class RedisStore:
    """Windows and the interval clock shared through Redis (extra ``mmagg[redis]``).

    ``window(key)`` is process-local and free of I/O; a background thread named
    ``mmagg-redis-push`` pushes it to Redis every ``push_interval`` seconds, one round trip
    at a time; :meth:`claim`, :meth:`take` and :meth:`give_back` push first, in the same
    round trip. While Redis is unreachable (:attr:`healthy` is ``False``) nothing is
    lost: pending windows stay local and :meth:`claim` runs on a local clock.

    Args:
        url: ``redis://[user:password@]host:port/db`` (any URL redis-py accepts).
        prefix: first part of every Redis key.
        push_interval: seconds between pushes of the local windows.
        ttl: seconds after the last write before an abandoned key expires (at least three
            reporting intervals are always kept).
        max_classes: distinct keys a shared window accepts before refusing new ones.
        socket_timeout: seconds a Redis round trip may take before the store degrades.
        reconnect_interval: seconds between reconnection attempts while degraded.
        claim_grace: a claim at most this many seconds early waits for the interval's end
            (not with an injected ``clock``).
        clock: seconds; replaces Redis ``TIME`` and the local clock (tests). ``None``:
            Redis ``TIME`` decides, one clock for every host.

    Example:
        >>> store = RedisStore("redis://:s3cret@localhost:6379/0")  # connects on first use
        >>> store.shared, store.safe_url
        (True, 'redis://***@localhost:6379/0')
        >>> store.keys_for("line-1")[0]
        'mmagg:{line-1}:best'

        Per frame ``store.window("line-1").add(batch, model_id="yard/3")``; in the
        reporter, ``store.claim("line-1", frequency=5)`` returns the merged window of
        every process to the one that wins the interval, ``None`` to the others.
    """

    shared = True

    BEST_KEY: ClassVar[str] = "{prefix}:{{{key}}}:best"
    STATS_KEY: ClassVar[str] = "{prefix}:{{{key}}}:stats"
    META_KEY: ClassVar[str] = "{prefix}:{{{key}}}:meta"
    CLOCK_KEY: ClassVar[str] = "{prefix}:{{{key}}}:clock"
    THREAD_NAME: ClassVar[str] = "mmagg-redis-push"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mmagg",
        push_interval: float = 0.25,
        ttl: float = 3600.0,
        max_classes: int = DEFAULT_MAX_CLASSES,
        socket_timeout: float = 1.0,
        reconnect_interval: float = 1.0,
        claim_grace: float = 0.5,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if push_interval <= 0:
            raise ValueError(f"push_interval: expected seconds > 0, got {push_interval!r}")
        if max_classes < 1:
            raise ValueError(f"max_classes: expected an integer >= 1, got {max_classes!r}")
        self.url = url
        self.safe_url = redact_url(url)
        self.prefix = prefix
        self.push_interval = push_interval
        self.ttl = ttl
        self.max_classes = max_classes
        self.socket_timeout = socket_timeout
        self.reconnect_interval = reconnect_interval
        self.claim_grace = claim_grace
        self._clock = clock
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._reset_process_state()
        _INSTANCES.add(self)

    def __repr__(self) -> str:  # never the password
        state = "healthy" if self._healthy else "degraded"
        return f"RedisStore({self.safe_url!r}, prefix={self.prefix!r}, {state})"

    @classmethod
    def for_url(cls, url: str) -> RedisStore:
        """The process-wide store for ``url`` (what ``MMAGG_REDIS_URL`` resolves to).


        Example:
            >>> RedisStore.for_url("redis://localhost/0") is RedisStore.for_url(
            ...     "redis://localhost/0"
            ... )
            True
        """
        store = _SHARED.get(url)
        if store is None:
            with _SHARED_LOCK:
                store = _SHARED.get(url)
                if store is None:
                    store = _SHARED[url] = cls(url)
        return store

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._windows: dict[str, Window] = {}
        self._lock = threading.Lock()
        # At most one round trip in flight: pushes, claims, takes and give-backs take turns.
        self._io_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._healthy = True
        self._retry_at = 0.0
        self._pushed_at = -math.inf  # last round trip or push cycle (monotonic)
        self._interval_start: dict[str, float] = {}
        self._frequency: dict[str, float] = {}

    # -- state -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """``False`` while Redis is unreachable and this process works on its own."""
        return self._healthy

    @property
    def in_this_process(self) -> bool:
        """``False`` in a forked child until the fork hook reset the store."""
        return self._pid == os.getpid()

    @property
    def degraded(self) -> bool:
        """The opposite of :attr:`healthy`."""
        return not self._healthy

    def counters(self) -> dict[str, int]:
        """Round trips, pushes, failures, outages and claims since the store was created."""
        return dict(self._counters)

    def keys_for(self, key: str) -> list[str]:
        """The Redis keys holding ``key``'s state: best, stats, meta, clock."""
        return [
            template.format(prefix=self.prefix, key=key)
            for template in (self.BEST_KEY, self.STATS_KEY, self.META_KEY, self.CLOCK_KEY)
        ]

    # -- the Store protocol ------------------------------------------------------------------

    def window(self, key: str) -> Window:
        """This process's window for ``key`` (no I/O; the same object for every caller)."""
        window = self._local(key)
        if self._thread is None:
            self._start_pusher()
        return window

    def due(self, key: str, frequency: float, now: float | None = None) -> bool:
        """No I/O: ``False`` while ``key``'s interval cannot be due yet on any process.

        Estimated from the last claim's answer (another process claiming only restarts
        the interval later); ``True`` when unknown. ``now`` is ignored: one clock (Redis
        ``TIME``, or the store's injected ``clock``) serves every process.
        """
        return self._early_by(key, frequency) <= 0

    def claim(self, key: str, frequency: float, now: float | None = None) -> Window | None:
        """Push, then claim ``key``'s interval on Redis's clock; the winner gets the window.

        ``now`` is ignored (see :meth:`due`).

        Skips the round trip while the interval cannot be due yet (another process
        claiming it only restarts it later), so polling costs nothing. A claim at most
        ``claim_grace`` seconds early waits for the interval's end: a caller pacing
        itself on its own clock would otherwise miss the shared interval by a few
        milliseconds, again and again.
        """
        self._frequency[key] = frequency
        early_by = self._early_by(key, frequency)
        if early_by > 0:
            if self._clock is not None or early_by > self.claim_grace:
                return None
            time.sleep(early_by + 0.002)
        window, early_by = self._claim_once(key, frequency)
        if window is None and self._clock is None and 0 < early_by <= self.claim_grace:
            time.sleep(early_by + 0.002)
            window, _ = self._claim_once(key, frequency)
        return window

    def _early_by(self, key: str, frequency: float) -> float:
        """Seconds until ``key``'s interval may be due (0 when it may be, or unknown)."""
        until_due = self._until_due(key, frequency)
        return 0.0 if until_due is None or until_due <= 0 else until_due

    def _until_due(self, key: str, frequency: float) -> float | None:
        """Estimated seconds until ``key``'s interval is due (negative: overdue)."""
        start = self._interval_start.get(key)
        if start is None:
            return None
        elapsed = self._local_now() - start
        if is_due(elapsed, frequency):
            return min(0.0, math.ceil(frequency) - elapsed)
        return max(math.ceil(frequency) - elapsed, 1e-6)

    def _claim_once(self, key: str, frequency: float) -> tuple[Window | None, float]:
        """The claimed window, or ``None`` and how many seconds early the claim was."""
        start = self._interval_start.get(key)
        with self._io_lock:
            if self._ready():
                reply = self._exchange("claim", key, frequency=frequency)
                if reply is not None:
                    after = self._local_now()
                    if int(reply[0]) != 1:
                        elapsed = float(reply[1])
                        self._interval_start[key] = after - elapsed
                        early_by = math.ceil(frequency) - elapsed if elapsed > 0 else 0.0
                        return None, early_by
                    self._interval_start[key] = after
                    self._counters["claims_won"] += 1
                    return self._decode(reply), 0.0
            # Degraded: report by ourselves on the local estimate of the interval.
            now = self._local_now()
            if start is None:
                self._interval_start[key] = now
                return None, 0.0
            if not is_due(now - start, frequency):
                return None, 0.0
            self._interval_start[key] = now
            self._counters["local_claims"] += 1
            return self._local(key).drain(), 0.0

    def take(self, key: str) -> Window:
        """Push, then take the whole shared window of ``key`` (flush / close)."""
        with self._io_lock:
            if self._ready():
                reply = self._exchange("take", key)
                if reply is not None:
                    return self._decode(reply)
            return self._local(key).drain()

    def give_back(self, key: str, window: Window) -> None:
        """Merge a window whose report failed into Redis (locally while degraded)."""
        with self._io_lock:
            if self._ready():
                if self._exchange("merge", key, extra=window) is not None:
                    self._counters["given_back"] += 1
                    return
                return  # _exchange kept it locally
            self._local(key).merge_in(window)

    def push(self) -> bool:
        """Push every pending local window now; ``False`` if Redis could not be reached."""
        return self._push(lambda key: True)

    def _push(self, wanted: Callable[[str], bool]) -> bool:
        with self._io_lock:
            if not self._ready():
                return False
            for key in list(self._windows):
                if self._windows[key].is_empty() or not wanted(key):
                    continue
                if self._exchange("merge", key) is None:
                    return False
            return True

    def _claim_imminent(self, key: str) -> bool:
        # The claim pushes in the same round trip: skipping this push keeps a process at
        # one round trip per push_interval, claims included. The claim comes from the
        # caller's own pacing, a little before or after the estimate; once it is overdue
        # by a full push_interval (no caller claims any more), pushes resume. Data waits
        # at most 2.5 push intervals for its push.
        frequency = self._frequency.get(key)
        if frequency is None:
            return False
        until_due = self._until_due(key, frequency)
        return until_due is not None and -self.push_interval < until_due <= 1.5 * self.push_interval

    def close(self) -> None:
        """Stop the push thread, push what is pending, drop the connections.

        The store stays usable: the thread and connections come back on the next use.
        """
        with self._lock:  # a window() meanwhile starts a new thread on the new event
            thread, self._thread = self._thread, None
            stop, self._stop = self._stop, threading.Event()
        stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.socket_timeout + self.push_interval + 1.0)
        self.push()
        with self._io_lock:
            client, self._client = self._client, None
            self._scripts = {}
        if client is not None:
            client.close()

    # -- round trips -------------------------------------------------------------------------

    def _exchange(
        self,
        script: str,
        key: str,
        *,
        frequency: float = 0.0,
        extra: Window | None = None,
    ) -> Sequence[Any] | None:
        """Run ``script`` with ``key``'s pending window; ``None`` (and degraded) on failure.

        Caller holds ``_io_lock``. A window that could not be pushed is merged back into
        the local one, so nothing is lost and it is never pushed twice.
        """
        pending = self._local(key).drain()
        try:
            if extra is not None:
                # Unbounded here: Redis applies max_classes against the shared window.
                combined = Window(max_classes=sys.maxsize)
                combined.merge_in(pending)
                combined.merge_in(extra)
                pending = combined
            args = self._arguments(key, pending, frequency)
            reply = self._script(script)(keys=self.keys_for(key), args=args)
        except redis.RedisError as exc:
            self._local(key).merge_in(pending)
            self._degrade(exc)
            return None
        except BaseException:
            self._local(key).merge_in(pending)
            raise
        self._counters["round_trips"] += 1
        if len(args) > 6 or args[2] or args[3]:
            self._counters["pushes"] += 1
        self._pushed_at = time.monotonic()
        self._recover()
        return reply  # type: ignore[no-any-return]

    def _arguments(self, key: str, window: Window, frequency: float) -> list[bytes | str | int]:
        best, stats, rejected, dropped = window.snapshot()
        longest = max(frequency, self._frequency.get(key, 0.0))
        ttl_ms = max(1000, int(max(self.ttl, 3 * longest) * 1000))
        now = "" if self._clock is None else repr(float(self._clock()))
        args: list[bytes | str | int] = [
            ttl_ms,
            self.max_classes,
            rejected,
            dropped,
            repr(float(frequency)),
            now,
        ]
        for entry, sample in best.items():
            args.append(_dumps(list(entry)))
            args.append(
                _dumps(
                    [
                        sample.confidence,
                        sample.seen_at,
                        sample.seq,
                        sample.inference_id,
                        sample.model_type,
                    ]
                )
            )
            item = stats.get(entry)
            args.append(b"" if item is None else _encode_stats(item))
        return args

    def _decode(self, reply: Sequence[Any]) -> Window:
        best_raw, stats_raw, meta = reply[2], reply[3], reply[4]
        stats = {_decode_key(f): _decode_stats(v) for f, v in _pairs(stats_raw)}
        samples: list[tuple[Key, Sample]] = []
        for field, value in _pairs(best_raw):
            entry = _decode_key(field)
            confidence, seen_at, seq, inference_id, model_type = json.loads(_text(value))
            sample = Sample(
                class_name=entry[1],
                confidence=float(confidence),
                inference_id=inference_id,
                model_type=model_type,
                model_id=entry[0],
                source_id=entry[2],
                seen_at=float(seen_at),
                seq=int(seq),
            )
            samples.append((entry, sample))
        samples.sort(key=lambda item: (item[1].seen_at, item[1].seq))
        window = Window(max_classes=max(self.max_classes, len(samples)))
        window.merge_entries(dict(samples), stats)
        window.rejected_nonfinite = int(meta[0])
        window.dropped_max_classes = int(meta[1])
        return window

    def _script(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            client = self._redis()
            # register_script: EVALSHA, loading the source again after a Redis restart.
            self._scripts = {
                "merge": client.register_script(MERGE),
                "take": client.register_script(TAKE),
                "claim": client.register_script(CLAIM),
            }
            script = self._scripts[name]
        return script

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                # A retried script may already have run: never merge a window twice.
                retry=Retry(NoBackoff(), 0),
                **_CONNECTION_OPTIONS,
            )
        return self._client

    # -- health ------------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._healthy or time.monotonic() >= self._retry_at

    def _degrade(self, exc: Exception) -> None:
        self._counters["push_failures"] += 1
        self._retry_at = time.monotonic() + self.reconnect_interval
        if self._healthy:
            self._healthy = False
            self._counters["outages"] += 1
            logger.warning(
                "mmagg: Redis at %s unreachable (%s); aggregating locally and reporting "
                "from this process until it is back",
                self.safe_url,
                self._redact(f"{type(exc).__name__}: {exc}"),
            )

    def _recover(self) -> None:
        if not self._healthy:
            self._healthy = True
            logger.warning("mmagg: Redis at %s reachable again; sharing resumed", self.safe_url)

    def _redact(self, text: str) -> str:
        password = urlsplit(self.url).password
        return text.replace(password, "***") if password else text

    # -- local state -------------------------------------------------------------------------

    def _local(self, key: str) -> Window:
        window = self._windows.get(key)
        if window is None:
            with self._lock:
                window = self._windows.setdefault(key, Window(max_classes=self.max_classes))
        return window

    def _local_now(self) -> float:
        return time.monotonic() if self._clock is None else self._clock()

    def _start_pusher(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            # The first push too waits a full push_interval.
            self._pushed_at = max(self._pushed_at, time.monotonic())
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name=self.THREAD_NAME, daemon=True
            )
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        # Every cycle pushes at most one window per key: work per cycle stays bounded.
        while not stop.wait(self._until_next_push()):
            if time.monotonic() - self._pushed_at < 0.9 * self.push_interval:
                continue  # a claim pushed while we slept
            try:
                if self._ready() and any(not w.is_empty() for w in list(self._windows.values())):
                    self._push(lambda key: not self._claim_imminent(key))
            except Exception:  # the pusher must survive anything; data stays local
                logger.exception("mmagg: unexpected error in the Redis push thread")
            self._pushed_at = max(self._pushed_at, time.monotonic())

    def _until_next_push(self) -> float:
        # A claim or take pushed too: the next push waits a full interval after it.
        since = time.monotonic() - self._pushed_at
        return min(self.push_interval, max(0.01, self.push_interval - since))

    def after_fork_in_child(self) -> None:
        """Forget this process's state in a forked child (called by the fork hook)."""
        # A forked child must not re-send its parent's windows nor share its sockets.
        self._reset_process_state()


def redact_url(url: str) -> str:
    """``url`` without user, password or query: safe for logs.

    Example:
        >>> redact_url("redis://user:s3cret@cache.internal:6380/2?password=x")
        'redis://***@cache.internal:6380/2'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _dumps(value: object) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogatepass")


def _number(value: float) -> str:
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


def _encode_stats(stats: ClassStats) -> bytes:
    numbers = [str(stats.count), _number(stats.total), _number(stats.minimum)]
    numbers.append(_number(stats.maximum))
    numbers.extend(str(v) for v in stats.histogram)
    return ("[" + ",".join(numbers) + "]").encode()


def _decode_stats(raw: bytes | str) -> ClassStats:
    values = json.loads(_text(raw))
    return ClassStats(
        int(values[0]),
        float(values[1]),
        float(values[2]),
        float(values[3]),
        [int(v) for v in values[4:]],
    )


def _decode_key(raw: bytes | str) -> Key:
    model_id, class_name, source_id = json.loads(_text(raw))
    return (model_id, class_name, source_id)


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


_SHARED: dict[str, RedisStore] = {}
_SHARED_LOCK = threading.Lock()
_INSTANCES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    for store in list(_INSTANCES):
        store.after_fork_in_child()


def _close_all_at_exit() -> None:
    # Push what is pending so the last report (by whichever process) carries it.
    for store in list(_INSTANCES):
        if store.in_this_process:
            try:
                store.close()
            except Exception:
                logger.exception("mmagg: could not push to Redis at exit")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
