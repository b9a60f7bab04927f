"""The Model Monitoring HTTP client: workspace lookup, send, retries, redaction.

Speaks the dialect of Roboflow's API (DESIGN §2), so it reports to Roboflow or to a
self-hosted ``mmagg serve`` unchanged. It only knows *how* to talk HTTP; *when* to
talk is the reporter's business.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mmagg._secrets import get_logger, redact, register_secret
from mmagg.cache import Cache
from mmagg.outcomes import predictions_text
from mmagg.wire import MAX_BODY_BYTES, MAX_RESULTS

if TYPE_CHECKING:
    import httpx

    from mmagg._http import PoolLease
    from mmagg.outcomes import ExportResult
    from mmagg.window import Window

__all__ = [
    "DEFAULT_API_BASE_URL",
    "HttpExporter",
    "ModelMonitoringClient",
    "ReportError",
    "RetryPolicy",
    "resolve_api_base_url",
    "resolve_api_key",
    "workspace_cache_key",
]

DEFAULT_API_BASE_URL = "https://api.roboflow.com"
WORKSPACE_CACHE_KEY_TEMPLATE = "workflows:api_key_to_workspace:{digest}"
WORKSPACE_CACHE_EXPIRE = 15 * 60
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Most bytes of a response body read (error texts, the workspace lookup's JSON): the rest
#: is discarded with the connection, so a hostile or broken server that answers 200 MB, an
#: endless chunked body or one byte a second costs neither memory nor time past the deadline.
MAX_RESPONSE_BYTES = 64 * 1024
#: Longest ``Retry-After`` honoured across reports: a wrong header must not silence
#: monitoring for days.
MAX_RETRY_AFTER = 900.0

logger = get_logger("mmagg.client")


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The argument, else ``ROBOFLOW_API_KEY``, else ``API_KEY``, else ``None``."""
    return api_key or os.environ.get("ROBOFLOW_API_KEY") or os.environ.get("API_KEY") or None


def resolve_api_base_url(api_base_url: str | None = None) -> str:
    """The argument, else ``API_BASE_URL``, else ``https://api.roboflow.com`` (no trailing /)."""
    url = api_base_url or os.environ.get("API_BASE_URL") or DEFAULT_API_BASE_URL
    return url.rstrip("/")


def workspace_cache_key(api_key: str) -> str:
    """The original's cache key for the API key → workspace lookup.

    Example:
        >>> workspace_cache_key("abc")
        'workflows:api_key_to_workspace:900150983cd24fb0d6963f7d28e17f72'
    """
    digest = hashlib.md5(api_key.encode("utf-8")).hexdigest()
    return WORKSPACE_CACHE_KEY_TEMPLATE.format(digest=digest)


class ReportError(Exception):
    """A lookup or send that did not succeed; its text never contains the API key.

    Attributes:
        kind: ``"connection"``, ``"timeout"``, ``"http"``, ``"bad_response"``, ``"cancelled"``
            or ``"deferred"`` (the backend's ``Retry-After`` has not passed yet: no request).
        status: the HTTP status, when there was one.
        retryable: whether a later report may succeed with the same data (the window is
            merged back); ``False`` means the backend refused the data (4xx).
    """

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class _Answer:
    """A response as far as it was read: status line, headers, at most
    :data:`MAX_RESPONSE_BYTES` of the body (decoded) and why the reading stopped early."""

    status: int
    reason: str
    headers: httpx.Headers
    body: bytes
    #: ``None`` when the whole body was read, else what cut it short.
    cut: str | None = None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def text(self, limit: int) -> str:
        """The start of the body for a message: at most ``limit`` characters, control
        characters (a binary body, NULs) shown as U+FFFD."""
        text = self.body[: limit * 4].decode("utf-8", errors="replace")[:limit]
        return "".join(c if c.isprintable() or c == " " else "\ufffd" for c in text)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter inside one overall deadline (seconds)."""

    deadline: float = 30.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_attempts: int = 6

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Backoff before retry number ``attempt`` (1-based): uniform in (0, base·2^(n-1)]."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return float(max(0.01, ceiling * rng()))


class ModelMonitoringClient:
    """Talks to a Model Monitoring backend.

    Example (against a local ``mmagg serve``; not run here):
        >>> client = ModelMonitoringClient("mmk_...", api_base_url="http://127.0.0.1:9090")
        >>> client.send({"inference_results": [], ...})  # doctest: +SKIP
    """

    def __init__(
        self,
        api_key: str,
        *,
        api_base_url: str | None = None,
        request_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        cache: Cache | None = None,
        transport: httpx.BaseTransport | None = None,
        cancel: threading.Event | None = None,
        on_retry: Callable[[], None] | None = None,
        rng: Callable[[], float] | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key: expected a non-empty Roboflow API key, got nothing")
        register_secret(api_key)
        self._api_key = api_key
        self.api_base_url = resolve_api_base_url(api_base_url)
        if request_timeout is None:
            request_timeout = float(
                os.environ.get("MMAGG_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT)
            )
        self.request_timeout = request_timeout
        self.retry = retry or RetryPolicy()
        self._cache = cache
        self._cancel = cancel or threading.Event()
        self._on_retry = on_retry
        # A private generator: jitter must not touch (or depend on) the global random state.
        self._rng = rng or random.Random().random
        # Monotonic time before which the backend asked not to be called (Retry-After).
        self._not_before = 0.0
        #: The latest failed attempt's text (``None`` after a success): what a log at
        #: shutdown names as the cause.
        self.last_error: str | None = None
        #: Whether :meth:`close` closes the pool: not when it is a shared one (``http``,
        #: see :mod:`mmagg._http`), whose owner closes it.
        self._owns_http = http is None
        if http is None:
            import httpx  # deferred: `import mmagg` stays light

            http = httpx.Client(
                transport=transport,
                timeout=request_timeout,
                headers={"User-Agent": "mmagg"},
                follow_redirects=False,
            )
        self._http = http

    def __repr__(self) -> str:  # never show the key
        return f"ModelMonitoringClient(api_base_url={self.api_base_url!r})"

    @property
    def http(self) -> httpx.Client:
        """The connection pool this client sends through (shared per tenant by exporters)."""
        return self._http

    def close(self) -> None:
        """Close the connection pool (unless it is a shared one passed as ``http``)."""
        if self._owns_http:
            self._http.close()

    def cancel(self) -> None:
        """Stop waiting between retries (used at shutdown)."""
        self._cancel.set()

    # -- the two calls -----------------------------------------------------------------------

    def workspace(self, *, deadline: float | None = None) -> str:
        """The workspace of the API key, cached 15 minutes in the injected cache."""
        key = workspace_cache_key(self._api_key)
        if self._cache is not None:
            cached = self._cache.get(key)
            if isinstance(cached, str) and cached:
                return cached
        answer = self._request(
            "GET",
            f"{self.api_base_url}/",
            params={"api_key": self._api_key, "nocache": "true"},
            deadline=deadline,
        )
        workspace = _workspace_from(answer)
        if self._cache is not None:
            self._cache.set(key, workspace, expire=WORKSPACE_CACHE_EXPIRE)
        return workspace

    def send(
        self,
        payload: Mapping[str, Any] | bytes,
        *,
        idempotency_key: str | None = None,
        deadline: float | None = None,
    ) -> None:
        """Look up the workspace and POST one report (a body, or its JSON already encoded);
        raises :class:`ReportError`."""
        from mmagg.payload import encode_json

        end = self._deadline(deadline)
        workspace = self.workspace(deadline=end)
        body = payload if isinstance(payload, bytes) else encode_json(dict(payload))
        self._request(
            "POST",
            f"{self.api_base_url}/{workspace}/inference-stats",
            params={"api_key": self._api_key},
            content=body,
            headers={
                "Idempotency-Key": idempotency_key or uuid.uuid4().hex,
                "Content-Type": "application/json",
            },
            deadline=end,
        )

    # -- retries -----------------------------------------------------------------------------

    def _deadline(self, deadline: float | None) -> float:
        return deadline if deadline is not None else time.monotonic() + self.retry.deadline

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str],
        deadline: float | None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer:
        end = self._deadline(deadline)
        where = f"{method} {url}"
        attempt = 0
        last: ReportError | None = None
        # Built (URL, query, body, headers) once: a retry only sends it again, so the sender
        # holds the GIL for less Python work per attempt. Compressed answers would have to be
        # inflated to be read (a small gzip body can unpack to gigabytes): ask for none, and
        # inflate a bounded part of what comes anyway (see _inflated).
        request = self._http.build_request(
            method,
            url,
            params=params,
            content=content,
            headers={**(headers or {}), "Accept-Encoding": "identity"},
        )
        while True:
            attempt += 1
            remaining = end - time.monotonic()
            if remaining <= 0 or self._cancel.is_set():
                why = "shutdown" if self._cancel.is_set() else "the report's deadline passed"
                raise self._given_up(where, last, why, attempt - 1)
            # A Retry-After longer than one report's deadline holds for the next reports too:
            # they fail fast (their data is merged back) instead of calling the backend.
            hold = self._not_before - time.monotonic()
            if hold >= remaining:
                raise ReportError(
                    f"{where}: not sent, the backend asked to retry after {hold:.0f}s more",
                    kind="deferred",
                )
            if hold > 0 and self._cancel.wait(hold):
                raise self._given_up(where, last, "shutdown", attempt - 1)
            outcome, retry_now, wait = self._attempt(
                request, url, min(self.request_timeout, remaining)
            )
            if not isinstance(outcome, ReportError):
                self.last_error = None
                return outcome
            error = last = outcome
            self.last_error = str(error)
            if not retry_now or attempt >= self.retry.max_attempts:
                raise error
            delay = max(wait or 0.0, self.retry.delay(attempt, self._rng))
            if time.monotonic() + delay >= end:
                raise error
            logger.info("%s failed (%s); retry %d in %.2fs", where, error, attempt, delay)
            if self._on_retry is not None:
                self._on_retry()
            if self._cancel.wait(delay):
                raise self._given_up(where, last, "shutdown", attempt)

    @staticmethod
    def _given_up(where: str, last: ReportError | None, why: str, attempts: int) -> ReportError:
        """The error of a request abandoned at shutdown or deadline: the last failure's."""
        if last is None:
            kind = "cancelled" if why == "shutdown" else "timeout"
            return ReportError(f"{where}: not sent, gave up at {why}", kind=kind)
        tried = f"{attempts} attempt" + ("" if attempts == 1 else "s")
        return ReportError(
            f"{last} (gave up at {why} after {tried})",
            kind=last.kind,
            status=last.status,
            retryable=last.retryable,
        )

    def _attempt(
        self, request: httpx.Request, url: str, timeout: float
    ) -> tuple[ReportError | _Answer, bool, float | None]:
        """One try of ``request`` (to ``url``): the answer, or the error, whether to retry
        it now, and a server-asked wait. The whole attempt, body included, ends within
        ``timeout``."""
        import httpx

        where = f"{request.method} {url}"
        end = time.monotonic() + timeout
        failure: str | None = None
        kind = "connection"
        answer: _Answer | None = None
        try:
            request.extensions["timeout"] = httpx.Timeout(timeout).as_dict()
            response = self._http.send(request, stream=True)
            answer = _read_capped(response, end)
        except httpx.TimeoutException as exc:
            failure, kind = f"{type(exc).__name__} after {timeout:.1f}s", "timeout"
        except httpx.ConnectError as exc:
            failure = _connect_failure(url, exc)
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        # Built outside the except blocks so that no chained exception (whose text holds
        # the URL with the key) travels with the error.
        if failure is not None or answer is None:
            error = ReportError(redact(f"{where}: {failure}", self._api_key), kind=kind)
            return error, True, None
        if answer.is_success:
            return answer, False, None
        status = answer.status
        body = answer.text(200).strip()
        if answer.cut is not None:
            body = f"{body}… ({answer.cut})" if body else f"({answer.cut})"
        reason = answer.reason[:100]
        text = redact(f"{where}: HTTP {status} {reason}. {body}", self._api_key)
        retry_now = status in RETRYABLE_STATUSES
        error = ReportError(
            text.strip(),
            kind="http",
            status=status,
            # Any 5xx keeps the data for the next report; other 4xx mean it was refused.
            retryable=retry_now or status >= 500,
        )
        wait = _retry_after(answer.headers.get("Retry-After")) if retry_now else None
        if wait:
            self._not_before = time.monotonic() + min(wait, MAX_RETRY_AFTER)
        return error, retry_now, wait


def _read_capped(response: httpx.Response, end: float) -> _Answer:
    """Read at most :data:`MAX_RESPONSE_BYTES` of ``response``'s body before ``end``
    (monotonic), then close it: an unread rest closes the connection instead of being
    drained. Raises only when no status line came (the caller's transport errors)."""
    import httpx

    limit = MAX_RESPONSE_BYTES
    parts: list[bytes] = []
    size = 0
    cut: str | None = None
    if response.is_stream_consumed:  # a transport that read the body itself: in memory
        body = response.content
        response.close()
        cut = None if len(body) <= limit else f"body over {limit} bytes: the rest was not read"
        return _Answer(
            response.status_code, response.reason_phrase, response.headers, body[:limit], cut
        )
    restore = _bound_reads(response, end)
    try:
        for chunk in response.iter_raw():
            parts.append(chunk[: limit - size])
            size += len(chunk)
            if size > limit:
                cut = f"body over {limit} bytes: the rest was not read"
                break
            if time.monotonic() >= end:
                cut = "body still arriving at the deadline: the rest was not read"
                break
    except httpx.TimeoutException:
        cut = "body still arriving at the deadline: the rest was not read"
    except httpx.TransportError as exc:
        cut = f"body cut short ({type(exc).__name__})"
    finally:
        response.close()
        restore()
    body = b"".join(parts)
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        body = _inflated(body, encoding)
    return _Answer(response.status_code, response.reason_phrase, response.headers, body, cut)


def _bound_reads(response: httpx.Response, end: float) -> Callable[[], None]:
    """Make every socket read of ``response``'s body end by ``end``; returns the undo.

    httpx's read timeout is per read: a server dripping a byte every second would never
    trip it. The connection's network stream (httpcore's ``network_stream`` extension) is
    given reads whose timeout is the time left, on this thread only (a pooled connection
    may serve another thread once this response is closed).
    """
    stream = response.extensions.get("network_stream")
    original = getattr(stream, "read", None)
    if stream is None or original is None:
        return lambda: None
    import httpcore

    owner = threading.get_ident()

    def read(max_bytes: int, timeout: float | None = None) -> bytes:
        if threading.get_ident() != owner:
            return bytes(original(max_bytes, timeout))
        left = end - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the report's deadline passed while reading")
        return bytes(original(max_bytes, left if timeout is None else min(timeout, left)))

    try:
        stream.read = read
    except (AttributeError, TypeError):  # a stream that does not allow it: per-read timeouts
        return lambda: None

    def restore() -> None:
        try:
            del stream.read
        except AttributeError:
            pass

    return restore


def _inflated(body: bytes, encoding: str) -> bytes:
    """At most :data:`MAX_RESPONSE_BYTES` of a gzip/deflate body a server compressed
    although it was asked not to; other encodings are not read."""
    import zlib

    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        return f"[{encoding}-encoded body, not read]".encode()
    try:
        return zlib.decompressobj(wbits).decompress(body, MAX_RESPONSE_BYTES)
    except zlib.error:
        return f"[{encoding}-encoded body that does not inflate]".encode()


def _partition(part: list[int], encoded: list[bytes], overhead: int, limit: int) -> list[list[int]]:
    """Cut ``part`` (indices into ``encoded``, the results' JSON) into runs whose bodies,
    ``overhead`` plus the results and their commas, stay within ``limit`` bytes and
    :data:`~mmagg.wire.MAX_RESULTS` results; a result alone over the limit is a run of its
    own. An empty ``part`` is one empty run (an empty report still goes).

    Example:
        >>> _partition([0, 1, 2], [b"aaaa", b"bbbb", b"cc"], 2, 11)
        [[0, 1], [2]]
    """
    runs: list[list[int]] = []
    current: list[int] = []
    size = overhead
    for i in part:
        grown = size + len(encoded[i]) + (1 if current else 0)
        if current and (grown > limit or len(current) >= MAX_RESULTS):
            runs.append(current)
            current, grown = [], overhead + len(encoded[i])
        current.append(i)
        size = grown
    if current or not runs:
        runs.append(current)
    return runs


def _connect_failure(url: str, exc: Exception) -> str:
    """``connection refused at host:port`` (what a person can act on), else the error."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    where = f"{parts.hostname}:{port}"
    text = str(exc)
    lowered = text.lower()
    if "refused" in lowered:
        return f"connection refused at {where}"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return f"host name {parts.hostname!r} not found"
    return f"could not connect to {where} ({type(exc).__name__}: {text})"


def _workspace_from(answer: _Answer) -> str:
    import json

    body: Any = None
    if answer.cut is None:
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
    workspace = body.get("workspace") if isinstance(body, dict) else None
    if not isinstance(workspace, str) or not workspace:
        got = repr(redact(answer.text(120)))
        if answer.cut is not None:
            got = f"{got}… ({answer.cut})"
        raise ReportError(
            f'workspace lookup: expected JSON {{"workspace": "<name>"}}, got {got}',
            kind="bad_response",
        )
    return workspace


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpExporter:
    """Where reports go: one backend, one API key. Builds the body and POSTs it.

    The reporter (the *when*) hands it a window and the report's metadata; the exporter
    never decides whether to send, it only sends (with the client's retries inside one
    deadline) and raises :class:`ReportError` when that did not work.

    Args:
        api_key: the key reports are sent under (never kept anywhere else).
        api_base_url: the backend.
        device: ``device_id`` of the reports (else ``DEVICE_ID``, else the host name).
        extensions: add mmagg's ``stats``/``source_id``/``mmagg`` keys to the body.
        cache: where the workspace lookup is cached (the block's injected cache).

    Example:
        >>> exporter = HttpExporter("k", api_base_url="http://127.0.0.1:9/")
        >>> exporter.api_base_url, exporter.retried, "k" in repr(exporter)
        ('http://127.0.0.1:9', 0, False)
        >>> exporter.shutdown(cancel=True)
    """

    def __init__(
        self,
        api_key: str,
        *,
        api_base_url: str | None = None,
        device: str | None = None,
        extensions: bool = False,
        request_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        cache: Cache | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key: expected a non-empty Roboflow API key, got nothing")
        register_secret(api_key)
        self._api_key = api_key
        self.api_base_url = resolve_api_base_url(api_base_url)
        self.device = device
        self.extensions = extensions
        self._request_timeout = request_timeout
        self._retry = retry
        self._cache = cache
        self._transport = transport
        self._lock = threading.Lock()
        self.retried = 0
        """HTTP retries so far (read by the reporter's counters)."""
        # What 413 answers taught: later windows are cut to the largest body the backend
        # accepted in an export that met a 413 (only ever a cutting hint: it never drops).
        self._part_limit = MAX_BODY_BYTES
        # Built now, not on the first report: the tenant's shared connection pool (httpx
        # imported and the TLS context built once per process, see mmagg._http).
        self._pid = os.getpid()
        self._lease: PoolLease | None = None
        self._client: ModelMonitoringClient | None = self._build_client()

    def __repr__(self) -> str:  # never show the key
        return f"HttpExporter(api_base_url={self.api_base_url!r})"

    def _build_client(self) -> ModelMonitoringClient:
        from mmagg._http import lease
        from mmagg.tenant import Tenant

        self._lease = held = lease(Tenant.of(self.api_base_url, self._api_key), self._transport)
        # An exporter dropped without shutdown() still gives its hold back (not at exit:
        # the reporters' final flush, which runs after finalizers, still needs the pool).
        weakref.finalize(self, held.release).atexit = False
        return ModelMonitoringClient(
            self._api_key,
            api_base_url=self.api_base_url,
            request_timeout=self._request_timeout,
            retry=self._retry,
            cache=self._cache,
            on_retry=self._count_retry,
            http=self._lease.http,
        )

    @property
    def client(self) -> ModelMonitoringClient:
        """The HTTP client over the tenant's shared pool, built with the exporter (again in
        a forked child, over the child's own pool: no shared sockets)."""
        if self._pid != os.getpid():
            self._pid, self._lock, self._client = os.getpid(), threading.Lock(), None
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _count_retry(self) -> None:
        self.retried += 1

    @property
    def last_error(self) -> str | None:
        """The latest failed attempt of the HTTP client, ``None`` after a success."""
        client = self._client
        return None if client is None else client.last_error

    def prepare(self) -> None:
        """Do the one-off set-up now (httpx import, TLS context, system info): it holds the
        GIL for tens of milliseconds, which a video loop would feel at the first report.
        The constructor did it already (once per process); this checks the client exists."""
        _ = self.client

    def export(self, window: Window, metadata: Mapping[str, Any]) -> ExportResult | None:
        """POST ``window``; raises :class:`ReportError` when nothing of it went.

        ``metadata``: ``timestamp`` (a datetime) and, with extensions, the ``mmagg``
        object (``aggregator_key``, ``frequency``, ``window_start``, ``window_end``).

        A body over the backend's limit (:data:`mmagg.wire.MAX_BODY_BYTES`, or less once
        a server answered 413) goes as several reports, each with its own part of the
        results, the same system info and its own ``Idempotency-Key``. Returns ``None``
        when the window went as one report, else an :class:`~mmagg.outcomes.ExportResult`
        saying what was delivered, dropped (``too_large``: one class's result alone over
        the limit) and left to send again.
        """
        from mmagg.outcomes import ExportResult
        from mmagg.payload import build_payload, encode_json
        from mmagg.wire import EXTENSION_KEY

        envelope = build_payload([], device=self.device, timestamp=metadata["timestamp"])
        del envelope["inference_results"]
        if self.extensions:  # the opt-in "mmagg" object: the report's own metadata
            envelope[EXTENSION_KEY] = {k: v for k, v in metadata.items() if k != "timestamp"}
        # Every part is the same envelope with its own results spliced in: each result is
        # encoded once, whatever the number of parts.
        head = encode_json(envelope)[:-1] + b',"inference_results":['
        entries = window.result_items(extensions=self.extensions)
        encoded = [encode_json(item) for _, item, _ in entries]
        client = self.client
        end = time.monotonic() + client.retry.deadline
        # The lookup first: its failure fails the whole window, and a 413 met below can only
        # be the backend's answer to a body.
        client.workspace(deadline=end)

        def size(part: list[int]) -> int:
            return len(head) + sum(len(encoded[i]) for i in part) + max(len(part) - 1, 0) + 2

        result = ExportResult()
        # Within this export: bodies are cut to `limit`; a body of `refused_at` bytes or more
        # is refused (a 413 said so), so it is cut, or dropped if it holds one result.
        limit, refused_at, largest_ok = self._part_limit, MAX_BODY_BYTES + 1, 0
        overhead = len(head) + 2
        queue = _partition(list(range(len(entries))), encoded, overhead, limit)
        while queue:
            part = queue.pop(0)
            body_size = size(part)
            if part and body_size >= refused_at:  # an empty report goes whatever its size
                if len(part) > 1:
                    queue[:0] = _partition(part, encoded, overhead, min(limit, refused_at - 1))
                else:
                    self._too_large(result, entries[part[0]], body_size)
                continue
            body = head + b",".join(encoded[i] for i in part) + b"]}"
            try:
                client.send(body, idempotency_key=uuid.uuid4().hex, deadline=end)
            except ReportError as error:
                if error.status == 413 and part:
                    refused_at = min(refused_at, body_size)
                    if len(part) == 1:
                        self._too_large(result, entries[part[0]], body_size)
                        continue
                    # A server with a smaller limit: halve. Each step halves the body, so
                    # this ends after log2(size) steps.
                    limit = min(limit, max(body_size // 2, 1))
                    queue[:0] = _partition(part, encoded, overhead, limit)
                    continue
                lost = sum(entries[i][2] for i in part)
                if error.retryable:
                    if result.reports == 0 and not result.dropped and result.error is None:
                        raise  # nothing happened yet: the whole window fails as one
                    left = part + [i for rest in queue for i in rest]
                    result.undelivered = window.subset(entries[i][0] for i in left)
                    result.error = error
                    break
                # Refused (4xx): this part is dropped; the others may still be accepted.
                reason = f"http_{error.status}"
                result.dropped[reason] = result.dropped.get(reason, 0) + lost
                result.error = error
                continue
            result.reports += 1
            result.delivered += sum(entries[i][2] for i in part)
            largest_ok = max(largest_ok, body_size)
        if refused_at <= MAX_BODY_BYTES and largest_ok:
            # This backend takes less than the wire's limit: cut the next windows to what
            # it accepted, so they need no 413 to learn it again.
            self._part_limit = largest_ok
        if result.reports == 1 and result.complete:
            return None
        refusal = result.error
        if (
            isinstance(refusal, ReportError)
            and result.reports == 0
            and result.undelivered is None
            and list(result.dropped) == [f"http_{refusal.status}"]
        ):
            raise refusal  # refused as a whole, as one report would have been
        return result

    def _too_large(self, result: ExportResult, entry: tuple[Any, Any, int], size: int) -> None:
        key, _, predictions = entry
        result.dropped["too_large"] = result.dropped.get("too_large", 0) + predictions
        logger.warning(
            "mmagg: the result of class %r (model %r) alone makes a %d-byte body, over the "
            "backend's limit: %s dropped",
            key[1][:100],
            key[0][:100],
            size,
            predictions_text(predictions),
        )

    def shutdown(self, *, cancel: bool) -> None:
        """Stop: ``cancel`` interrupts a send waiting between retries; otherwise this
        exporter gives back its hold on the tenant's shared pool, which closes when no other
        exporter (or block) of the tenant holds it."""
        client = self._client
        if client is None or self._pid != os.getpid():
            return
        client.cancel()
        if cancel:
            # A send may still be in flight on the pool: it keeps it until this exporter
            # is dropped (the finalizer gives the hold back then).
            return
        client.close()
        if self._lease is not None:  # the tenant's pool closes with its last holder
            self._lease.release()
