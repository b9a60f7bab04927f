"""Redaction hides a secret wherever it stands, and a short secret (a test's one-letter key)
never mangles the words around it: a process that once used api_key="k" must not turn every
later log line's "makes" into "ma***es"."""

from __future__ import annotations

import re

from hypothesis import assume, given
from hypothesis import strategies as st

from mmagg._secrets import SHORT_SECRET, redact

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
WORDS = st.text(alphabet=TOKEN_CHARS + " =&/?:.", max_size=60)


@given(
    secret=st.text(alphabet=TOKEN_CHARS, min_size=SHORT_SECRET, max_size=40),
    before=WORDS,
    after=WORDS,
)
def test_a_long_secret_never_survives(secret: str, before: str, after: str) -> None:
    assert secret not in redact(before + secret + after, secret)


@given(secret=st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=SHORT_SECRET - 1), text=WORDS)
def test_a_short_secret_goes_as_a_token_and_words_stay(secret: str, text: str) -> None:
    assume(secret not in ("GET", "api_key"))  # the line's own tokens
    line = f"GET /?api_key={secret} {text}"
    out = redact(line, secret)
    assert out.startswith("GET /?api_key=*** ")
    # Nowhere is it left standing as a whole token ...
    tokens = re.split(r"[^A-Za-z0-9_-]+", out)
    assert secret not in tokens
    # ... and words that merely contain it are untouched.
    for word in re.split(r"[^A-Za-z0-9_-]+", text):
        if word != secret and word:
            assert word in out


def test_the_cases_that_were_seen() -> None:
    assert redact("the result alone makes a body over the backend's limit", "k") == (
        "the result alone makes a body over the backend's limit"
    )
    assert redact('"GET /?api_key=k HTTP/1.1" 401', "k") == '"GET /?api_key=*** HTTP/1.1" 401'
