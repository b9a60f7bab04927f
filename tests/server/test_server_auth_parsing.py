"""Scope lists and key lifetimes as users type them: property tests over many spellings."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mmagg.server.auth import (
    ALL_SCOPES,
    MAX_LIFETIME_SECONDS,
    ScopeError,
    format_scopes,
    parse_duration,
    parse_scopes,
    stored_scopes,
)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
scope_sets = st.sets(st.sampled_from(sorted(ALL_SCOPES)), min_size=1)


@st.composite
def spellings(draw: st.DrawFn) -> tuple[frozenset[str], list[str]]:
    """A set of scopes and one way of typing it: repeated options, commas, case, spaces."""
    chosen = draw(scope_sets)
    words = draw(st.permutations(sorted(chosen)))
    words = words + draw(st.lists(st.sampled_from(words), max_size=3))  # repeats are fine
    words = [draw(st.sampled_from([w, w.upper(), w.title(), f" {w} "])) for w in words]
    values: list[str] = []
    while words:
        take = draw(st.integers(1, len(words)))
        values.append(draw(st.sampled_from([",", ", ", " ,"])).join(words[:take]))
        words = words[take:]
    return frozenset(chosen), values


@given(spellings())
def test_any_spelling_of_a_scope_set_parses_to_it(case: tuple[frozenset[str], list[str]]) -> None:
    expected, values = case
    assert parse_scopes(values) == expected
    assert stored_scopes(format_scopes(expected)) == expected


@given(scope_sets, st.text(min_size=1, max_size=12))
def test_an_unknown_word_anywhere_is_refused_by_name(chosen: set[str], word: str) -> None:
    bad = word.strip().lower()
    assume(bad and "," not in word and bad not in ALL_SCOPES)
    with pytest.raises(ScopeError) as raised:
        parse_scopes([",".join(sorted(chosen)), word])
    message = str(raised.value)
    assert message.startswith("scope: expected one or more of admin, ingest, read")
    assert repr(word.strip()) in message


@given(st.integers(1, 10_000), st.sampled_from(sorted(UNITS)), st.booleans())
def test_durations_are_number_times_unit(number: int, unit: str, upper: bool) -> None:
    text = f"{number}{unit.upper() if upper else unit}"
    seconds = number * UNITS[unit]
    if seconds > MAX_LIFETIME_SECONDS:
        with pytest.raises(ScopeError, match="at most 36500d"):
            parse_duration(text)
    else:
        assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "90", "0d", "-5d", "1y", "5 days", "nan", "infd"])
def test_bad_durations_name_the_field_and_what_came(text: str) -> None:
    with pytest.raises(ScopeError) as raised:
        parse_duration(text, field="--expires-in")
    assert str(raised.value).startswith("--expires-in: expected")
    assert repr(text) in str(raised.value)


def test_stored_scopes_grant_nothing_for_null_or_unknown() -> None:
    assert stored_scopes(None) == frozenset()
    assert stored_scopes("") == frozenset()
    assert stored_scopes("ingest,root") == {"ingest"}
