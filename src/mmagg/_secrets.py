"""Keeping API keys out of every log line and error text."""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "RedactingFilter", "get_logger", "redact", "register_secret"]

REDACTED = "***"
#: A secret shorter than this is replaced only where it stands as a whole token (not inside a
#: word): a one-letter test key must not turn "makes" into "ma***es" in every message.
SHORT_SECRET = 8
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Remember a secret so that :func:`redact` and the log filter hide it everywhere."""
    if not secret:
        return
    with _lock:
        _secrets.update({secret, quote(secret, safe=""), quote_plus(secret)})
    _install_filters()


def redact(text: str, *extra: str | None) -> str:
    """``text`` with every registered secret (and ``extra`` ones) replaced by ``***``.

    Example:
        >>> redact("GET /?api_key=s3cr3t", "s3cr3t")
        'GET /?api_key=***'
        >>> redact("key=k: the key makes it", "k")  # a short one only as a whole token
        'key=***: the key makes it'
    """
    candidates = set(_secrets)
    for secret in extra:
        if secret:
            candidates.update({secret, quote(secret, safe=""), quote_plus(secret)})
    # Longest first so that an encoded form is not left half-replaced.
    for secret in sorted(candidates, key=len, reverse=True):
        if not secret or secret not in text:
            continue
        if len(secret) >= SHORT_SECRET:
            text = text.replace(secret, REDACTED)
        else:
            text = re.sub(
                rf"(?<![A-Za-z0-9_-]){re.escape(secret)}(?![A-Za-z0-9_-])", REDACTED, text
            )
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message so that no registered secret reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to break
            return True
        cleaned = redact(message)
        if cleaned != message or record.exc_info:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # The formatted traceback would carry the exception text: keep it redacted.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_FILTER = RedactingFilter()
# Logger filters apply only to records created on that very logger, so children are named.
_FILTERED_LOGGERS = (
    "mmagg",
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "uvicorn.access",
    "uvicorn.error",
)
_installed = False


def _install_filters() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for name in _FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)


def get_logger(name: str) -> logging.Logger:
    """A logger whose records pass through the redacting filter."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
