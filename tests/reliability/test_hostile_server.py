"""The client against hostile servers: huge, endless, slow and compressed response bodies.

A real loopback server (raw sockets, so it can misbehave in ways an HTTP library would not)
answers the client's requests with bodies of 200 MB, endless chunked bodies, one byte at a
time, or a gzip bomb. The client must read at most a small cap, so memory stays bounded
(tracemalloc), the report's deadline holds, the caller's thread never waits, the failure is
counted and its message says what happened without ever showing the API key.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import mmagg
from mmagg import MemoryCache, ModelMonitoringClient, ReportError, RetryPolicy
from mmagg.client import MAX_RESPONSE_BYTES

KEY = "rf_HOSTILE_secret_key_42"
MiB = 1 << 20

#: A behaviour writes one answer on a connection whose request was read; it returns when
#: the client hangs up (or the server stops).
Behaviour = Callable[[socket.socket, threading.Event], None]


def _write(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return True
    except OSError:  # the client hung up: what a capped read is expected to do
        return False


def huge(status: int, size: int = 200 * MiB) -> Behaviour:
    """A body of ``size`` bytes (declared), written as fast as the client takes it."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        head = f"HTTP/1.1 {status} Hostile\r\nContent-Length: {size}\r\n\r\n"
        if not _write(conn, head.encode()):
            return
        block = b"E" * 65536
        sent = 0
        while sent < size and not stop.is_set():
            if not _write(conn, block):
                return
            sent += len(block)

    return answer


def endless_chunked(status: int, prefix: bytes = b"") -> Behaviour:
    """A chunked body that never ends."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        head = f"HTTP/1.1 {status} Hostile\r\nTransfer-Encoding: chunked\r\n\r\n"
        if not _write(conn, head.encode()):
            return
        if prefix and not _write(conn, b"%x\r\n%s\r\n" % (len(prefix), prefix)):
            return
        chunk = b"x" * 8192
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        while not stop.is_set():
            if not _write(conn, frame):
                return

    return answer


def slow_drip(status: int, every: float = 0.05) -> Behaviour:
    """A declared 10,000-byte body sent one byte every ``every`` seconds (8 minutes)."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        head = f"HTTP/1.1 {status} Slow\r\nContent-Length: 10000\r\n\r\n"
        if not _write(conn, head.encode()):
            return
        for _ in range(10000):
            if stop.wait(every) or not _write(conn, b"s"):
                return

    return answer


def gzip_bomb(status: int) -> Behaviour:
    """A 200 KB gzip body that inflates to 200 MB, sent although the client asked for none."""
    bomb = gzip.compress(b"\0" * (200 * MiB), compresslevel=9)

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        head = (
            f"HTTP/1.1 {status} Bomb\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
        )
        _write(conn, head.encode() + bomb)
        stop.wait(2)

    return answer


def workspace_ok(conn: socket.socket, stop: threading.Event) -> None:
    body = b'{"workspace": "hostile-ws"}'
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
    _write(conn, head.encode() + body)


@dataclass
class HostileServer:
    """Answers ``GET /`` (the workspace lookup) with ``lookup`` and every POST with ``post``."""

    lookup: Behaviour = workspace_ok
    post: Behaviour = field(default_factory=lambda: huge(500))
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="capture-server-hostile")
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            thread = threading.Thread(
                target=self._handle, args=(conn,), name="capture-server-hostile-conn"
            )
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    more = conn.recv(65536)
                    if not more:
                        return
                    rest += more
            except (OSError, ValueError):
                return
            self.requests.append((method, target, headers))
            behaviour = self.lookup if method == "GET" else self.post
            try:
                behaviour(conn, self._stop)
            except OSError:
                pass

    @property
    def posts(self) -> int:
        return sum(1 for method, _, _ in self.requests if method == "POST")

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(5)
        self._sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    try:
        yield server
    finally:
        server.stop()


def _client(
    server: HostileServer, *, timeout: float = 1.0, deadline: float = 3.0
) -> ModelMonitoringClient:
    return ModelMonitoringClient(
        KEY,
        api_base_url=server.url,
        request_timeout=timeout,
        retry=RetryPolicy(deadline=deadline, base_delay=0.01, max_delay=0.02, max_attempts=2),
        cache=MemoryCache(),
    )


def _send_measured(client: ModelMonitoringClient) -> tuple[ReportError, float, int]:
    """Send one report; the error, the seconds it took and tracemalloc's peak (bytes)."""
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(ReportError) as caught:
            client.send({"inference_results": []}, idempotency_key="hostile")
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
    return caught.value, took, peak


@pytest.mark.parametrize(
    ("post", "status", "retryable", "says"),
    [
        (huge(400), 400, False, f"body over {MAX_RESPONSE_BYTES} bytes"),
        (huge(502), 502, True, f"body over {MAX_RESPONSE_BYTES} bytes"),
        (endless_chunked(422), 422, False, f"body over {MAX_RESPONSE_BYTES} bytes"),
        (endless_chunked(503), 503, True, f"body over {MAX_RESPONSE_BYTES} bytes"),
        (slow_drip(400), 400, False, "body still arriving at the deadline"),
        (slow_drip(500), 500, True, "body still arriving at the deadline"),
    ],
    ids=["200MB-400", "200MB-502", "endless-422", "endless-503", "drip-400", "drip-500"],
)
def test_error_bodies_are_read_with_a_cap(
    hostile: HostileServer, post: Behaviour, status: int, retryable: bool, says: str
) -> None:
    hostile.post = post
    error, took, peak = _send_measured(_client(hostile, timeout=0.6, deadline=2.0))
    assert error.status == status and error.kind == "http"
    assert error.retryable is retryable
    text = str(error)
    assert f"HTTP {status}" in text and says in text, text
    assert KEY not in text and KEY not in repr(error.args)
    # The error text shows the start of the body, never more than a couple hundred bytes.
    assert len(text) < 600, len(text)
    # A 200 MB (or endless) body costs at most the cap, a few times over for buffers; the
    # whole request (client objects included) stays far below one megabyte of it.
    assert peak < 2 * MiB, f"peak {peak} bytes"
    # The report's deadline (2 s) holds: retries included, one attempt takes at most its
    # request timeout (0.6 s), body included.
    assert took < 2.0 + 1.0, took
    assert 1 <= hostile.posts <= 2


@pytest.mark.parametrize("every", [0.02, 0.9], ids=["fast-drip", "drip-under-read-timeout"])
def test_a_slow_drip_body_ends_at_the_request_timeout(hostile: HostileServer, every: float) -> None:
    hostile.post = slow_drip(400, every=every)
    error, took, _ = _send_measured(_client(hostile, timeout=1.0, deadline=10.0))
    # One attempt (400 is not retried), bounded by its request timeout (1 s): not by the
    # body's 10,000 bytes (200 s or 2.5 hours), nor by the per-read timeout that each byte
    # resets (a byte every 0.9 s would take a second read past the deadline, to 1.8 s).
    assert took < 1.0 + 0.4, took
    assert "body still arriving at the deadline" in str(error)


@pytest.mark.parametrize(
    "lookup",
    [huge(200), endless_chunked(200, prefix=b'{"workspace": "'), slow_drip(200)],
    ids=["200MB", "endless", "drip"],
)
def test_a_hostile_workspace_lookup_is_a_clear_bounded_error(
    hostile: HostileServer, lookup: Behaviour
) -> None:
    hostile.lookup = lookup
    error, took, peak = _send_measured(_client(hostile, timeout=0.5, deadline=2.0))
    assert error.kind == "bad_response"
    text = str(error)
    assert text.startswith('workspace lookup: expected JSON {"workspace": "<name>"}, got ')
    assert "the rest was not read" in text, text
    assert KEY not in text
    assert peak < 2 * MiB, f"peak {peak} bytes"
    assert took < 2.0 + 1.0
    assert hostile.posts == 0


def test_a_gzip_bomb_is_not_inflated(hostile: HostileServer) -> None:
    hostile.post = gzip_bomb(400)
    error, took, peak = _send_measured(_client(hostile, timeout=2.0, deadline=3.0))
    (_, _, headers) = next(r for r in hostile.requests if r[0] == "POST")
    assert headers["accept-encoding"] == "identity"
    assert error.status == 400 and "HTTP 400" in str(error)
    # At most the cap is inflated (the raw body itself, 200 KB, is what was read).
    assert peak < 4 * MiB, f"peak {peak} bytes"
    assert took < 3.0


def test_an_accepted_report_with_an_endless_body_counts_as_sent(hostile: HostileServer) -> None:
    # The status line is the answer: 2xx means the report was stored; the body is not needed.
    hostile.post = endless_chunked(200)
    client = _client(hostile, timeout=1.0, deadline=3.0)
    started = time.monotonic()
    try:
        client.send({"inference_results": []}, idempotency_key="ok")
    finally:
        client.close()
    assert time.monotonic() - started < 1.5
    assert hostile.posts == 1


def test_the_video_loop_never_waits_and_the_failure_is_counted(hostile: HostileServer) -> None:
    """Fire-and-forget through the Aggregator: the sender meets a dripping 500 body while the
    caller keeps collecting; close() keeps its deadline and says the data did not go."""
    hostile.post = slow_drip(500, every=0.05)
    aggregator = mmagg.Aggregator(
        "hostile/1",
        frequency=1,
        api_key=KEY,
        api_base_url=hostile.url,
        request_timeout=0.5,
        retry=RetryPolicy(deadline=1.5, base_delay=0.01, max_delay=0.02, max_attempts=3),
        clock=lambda: time.time(),
    )
    frame = {"predictions": [{"class": "car", "confidence": 0.7}]}
    slowest = 0.0
    ended = time.monotonic() + 2.5
    frames = 0
    while time.monotonic() < ended:
        started = time.perf_counter()
        aggregator.collect(frame)
        slowest = max(slowest, time.perf_counter() - started)
        frames += 1
        time.sleep(0.01)
    assert hostile.posts >= 1
    started = time.monotonic()
    delivered = aggregator.close(timeout=1.0)
    closing = time.monotonic() - started
    counters = aggregator.counters
    assert not delivered
    # close() waits its timeout plus the short grace for the interrupted send, no more.
    assert closing < 1.0 + 0.5 + 0.3, closing
    # Every collect returned at once while the sender was stuck reading.
    assert slowest < 0.1, slowest
    assert counters.failed >= 1 and counters.sent == 0
    assert counters.collected == frames
    assert counters.dropped_total == frames, counters
