"""Request guards in front of the app: the body limit and key redaction in the logs.

`BodyLimitMiddleware` answers 413 for every body over the limit, declared or streamed,
whatever route it was sent to; `RedactApiKeys` keeps keys out of uvicorn's access log.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any

from fastapi.responses import JSONResponse

from mmagg.server.errors import BodyTooLargeError
from mmagg.server.metrics import Metrics


class BodyLimitMiddleware:
    """Reject bodies over `limit` bytes: by Content-Length up front, else while streaming.

    Checking the declared length alone would let a chunked upload through, so the wrapped
    `receive` counts the bytes actually read and raises `BodyTooLargeError` past the limit.
    """

    def __init__(self, app: Any, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit or declared < 0:
                    self.metrics.reject("too_large" if declared > self.limit else "invalid")
                    status = 413 if declared > self.limit else 400
                    detail = (
                        f"request body: expected at most {self.limit} bytes, "
                        f"Content-Length says {declared}"
                        if status == 413
                        else "Content-Length: expected a non-negative integer"
                    )
                    response = JSONResponse(
                        {"detail": detail}, status_code=status, headers={"Connection": "close"}
                    )
                    await response(scope, receive, send)
                    return
        if any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            # A chunked body declares no size: read it here, up to the limit, so that it
            # gets its 413 even on a route that would never read it.
            receive = await self._buffered(receive)
            if receive is None:
                self.metrics.reject("too_large")
                await self._too_large(scope, send)
                return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Any:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLargeError(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise BodyTooLargeError(self.limit)
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if exceeded and not started:
                # Whatever the app made of the aborted read (FastAPI turns any error while
                # parsing a body into a 400), the answer is ours: 413.
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLargeError:
            if not exceeded:
                raise
        if exceeded and not started:
            self.metrics.reject("too_large")
            await self._too_large(scope, send)

    async def _too_large(self, scope: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body: expected at most {self.limit} bytes, got more"},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, _no_body, send)

    async def _buffered(self, receive: Any) -> Any:
        """`receive` replaying the whole body, or None past the limit."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            part = message.get("body", b"")
            size += len(part)
            if size > self.limit:
                return None
            parts.append(part)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        return replay


async def _no_body() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}


# A query parameter: its name (any percent-encoding, any case) and its value.
_QUERY_PARAM = re.compile(r"(?P<name>[^&=\s\"?]+)=(?P<value>[^&\s\"]*)")
# What a key looks like, wherever it is pasted.
_KEY_SHAPE = re.compile(r"mmk_[A-Za-z0-9_\-%]{8,}")


def _param_name(raw: str) -> str:
    """A query parameter's name as a server would read it: percent-decoded (repeatedly),
    '+' as space, lower-cased."""
    name = raw
    for _ in range(4):
        decoded = urllib.parse.unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower()


def redact_keys(text: str) -> str:
    """`text` with the value of every `api_key` query parameter, however its name is
    encoded (`api%5Fkey`, `API_KEY`), and anything shaped like a key replaced by `***`.

    Example:
        >>> redact_keys("GET /acme/api/models?api%5Fkey=abc&model=m HTTP/1.1")
        'GET /acme/api/models?api%5Fkey=***&model=m HTTP/1.1'
    """

    def param(match: re.Match[str]) -> str:
        if _param_name(match["name"]) in ("api_key", "apikey", "api-key"):
            return f"{match['name']}=***"
        return match[0]

    return _KEY_SHAPE.sub("***", _QUERY_PARAM.sub(param, text))


class RedactApiKeys(logging.Filter):
    """Log filter applying `redact_keys` to messages and their string arguments.

    uvicorn's access log prints the full path, query string included, and the Roboflow
    dialect carries the key there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_keys(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = redact_keys(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach `RedactApiKeys` to uvicorn's loggers once."""
    for name in ("uvicorn.access", "uvicorn.error"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeys) for f in target.filters):
            target.addFilter(RedactApiKeys())
