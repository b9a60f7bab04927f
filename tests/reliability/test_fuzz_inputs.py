"""Input fuzzing: whatever a model (or a confused caller) hands to ``collect``, only the
documented ``TypeError``/``ValueError`` escape, and the window stays consistent."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reliability_support import SECRET_KEY

import mmagg
from mmagg import MemoryStore, Window
from mmagg.window import DEFAULT_MAX_CLASSES, HISTOGRAM_BUCKETS
from mmagg.wire import MAX_BODY_BYTES

FUZZ = settings(
    max_examples=100,
    derandomize=True,  # the same examples on every run: a failure reproduces
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = st.one_of(
    st.sampled_from(["", "car", "person", "ünïcödé", "汽车", "🚗", "a\x00b", "'; DROP TABLE x;--"]),
    st.text(max_size=20),
    st.text(min_size=2000, max_size=5000, alphabet="xé漢"),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FLOATS, NAMES)
KEYS = st.one_of(NAMES, st.sampled_from(["class", "confidence", "predictions"]))
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.one_of(NAMES, st.sampled_from(["class", "confidence"])), children, max_size=4
        )
    ),
    max_leaves=20,
)
DTYPES = st.sampled_from(
    [np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i8", "u8", "?", "c8", "c16", "U4", "S4", "O")]
)


@st.composite
def arrays(draw: st.DrawFn, n: int | tuple[int, ...]) -> Any:
    """An array of any dtype, values included (NaN, inf, huge, strings, None)."""
    dtype = draw(DTYPES)
    if dtype.kind == "O":
        return draw(hnp.arrays(dtype, n, elements=SCALARS))
    return draw(hnp.arrays(dtype, n))


@st.composite
def columns(draw: st.DrawFn, n: int) -> Any:
    """A data column: usually right, sometimes absent, scalar, wrong length or wrong kind."""
    kind = draw(st.sampled_from(["names", "object", "ints", "none", "scalar", "short", "2d"]))
    if kind == "names":
        return np.array(draw(st.lists(NAMES, min_size=n, max_size=n)), dtype=str)
    if kind == "object":
        return np.array(draw(st.lists(SCALARS, min_size=n, max_size=n)) + [None], dtype=object)[:n]
    if kind == "ints":
        return np.arange(n)
    if kind == "none":
        return None
    if kind == "scalar":
        return draw(SCALARS)
    if kind == "short":
        return np.array(["x"] * max(0, n - 1))
    return np.zeros((n, 2))


@st.composite
def detections(draw: st.DrawFn) -> Any:
    n = draw(st.integers(0, 40))
    confidence = draw(
        st.one_of(
            arrays(n),
            arrays(n),
            hnp.arrays(np.float64, n, elements=FLOATS),
            st.none(),
            hnp.arrays(np.float64, st.integers(0, 3)),  # wrong length
            hnp.arrays(np.float32, (n, 1)),
        )
    )
    data_keys = draw(
        st.lists(st.sampled_from(["class_name", "inference_id", "prediction_type"]), unique=True)
    )
    data = {key: draw(columns(n)) for key in data_keys}
    if draw(st.booleans()):
        data = {k: v for k, v in data.items() if v is not None}
        try:  # a real sv.Detections when supervision accepts the columns
            import supervision as sv

            return sv.Detections(
                xyxy=np.zeros((n, 4), dtype=np.float32), confidence=confidence, data=data
            )
        except Exception:
            pass
    return SimpleNamespace(
        xyxy=np.zeros((n, 4)), confidence=confidence, data=draw(st.sampled_from([data, None]))
    )


PREDICTIONS = st.one_of(
    detections(),
    detections(),
    detections(),
    JSON,
    st.fixed_dictionaries({"predictions": JSON}, optional={"inference_id": JSON, "top": JSON}),
    st.fixed_dictionaries(
        {
            "predictions": st.lists(
                st.dictionaries(st.sampled_from(["class", "confidence", "class_name"]), SCALARS),
                max_size=8,
            )
        },
        optional={"prediction_type": SCALARS, "inference_id": SCALARS},
    ),
    st.fixed_dictionaries(
        {"predictions": st.dictionaries(NAMES, st.dictionaries(st.just("confidence"), SCALARS))}
    ),
)


def assert_window_invariants(window: Window) -> tuple[int, int, int]:
    best, stats, rejected, dropped = window.snapshot()
    assert set(best) == set(stats), "one sample and one statistics entry per key"
    assert len(best) <= window.max_classes
    for key, sample in best.items():
        s = stats[key]
        assert key[1] == sample.class_name
        assert math.isfinite(sample.confidence)
        assert sample.confidence == s.maximum, (sample, s)
        assert s.minimum <= s.maximum
        assert s.count >= 1 and sum(s.histogram) == s.count
        assert len(s.histogram) == HISTOGRAM_BUCKETS
    return sum(s.count for s in stats.values()), rejected, dropped


def new_aggregator(**kwargs: Any) -> mmagg.Aggregator:
    return mmagg.Aggregator(
        "fuzz/1",
        frequency=3600,
        api_key=SECRET_KEY,
        api_base_url="http://127.0.0.1:9",
        store=kwargs.pop("store", MemoryStore()),
        **kwargs,
    )


@pytest.fixture(scope="module")
def agg() -> Any:
    aggregator = new_aggregator()
    yield aggregator
    aggregator._reporter.store.take(aggregator._reporter.store_key)
    aggregator.close(timeout=0)


@settings(FUZZ, max_examples=250)
@given(predictions=PREDICTIONS)
def test_to_batch_raises_only_documented_errors(predictions: Any) -> None:
    try:
        batch = mmagg.to_batch(predictions)
    except (TypeError, ValueError):
        return
    if batch is not None:
        n = len(batch)
        for column in (batch.class_names, batch.inference_ids, batch.model_types):
            assert column.shape == (n,) and column.dtype.kind == "U"
        assert batch.confidences.shape == (n,) and batch.confidences.dtype == np.float64


@FUZZ
@given(frames=st.lists(PREDICTIONS, min_size=1, max_size=6))
def test_collect_raises_only_documented_errors_and_keeps_invariants(
    agg: mmagg.Aggregator, frames: list[Any]
) -> None:
    before = agg.counters
    window = agg._reporter.store.window(agg._reporter.store_key)
    held_before, rejected_before, dropped_before = assert_window_invariants(window)
    refused_inputs = 0
    for frame in frames:
        try:
            result = agg.collect(frame)
        except (TypeError, ValueError):
            refused_inputs += 1
            continue
        assert result == {
            "error_status": False,
            "message": "Not in reporting range, skipping report. (Ok)",
        }, result
    held, rejected, dropped = assert_window_invariants(window)
    after = agg.counters
    assert "internal_error" not in after.dropped
    assert after.rejected - before.rejected == refused_inputs
    # Every prediction taken in is held, or refused as non-finite, or over the class limit.
    taken = after.collected - before.collected
    assert taken == (held - held_before) + (rejected - rejected_before) + (dropped - dropped_before)


def test_thousands_of_classes_hit_the_cardinality_guard(capture_server: Any) -> None:
    """Default guard: 10,000 classes per window; what it refuses is counted, by reason."""
    import supervision as sv

    extra = 700
    names = np.array([f"class-{i:05d}" for i in range(DEFAULT_MAX_CLASSES + extra)])
    agg = mmagg.Aggregator(
        "many/1",
        frequency=3600,
        api_key=SECRET_KEY,
        api_base_url=capture_server.url,
        store=MemoryStore(),
        extensions=True,
    )
    for chunk in np.array_split(names, 6):
        n = chunk.size
        frame = sv.Detections(
            xyxy=np.zeros((n, 4), dtype=np.float32),
            confidence=np.full(n, 0.5, dtype=np.float32),
            data={"class_name": chunk},
        )
        agg.collect(frame)
        agg.collect(frame)  # twice: the refused classes count each prediction
    assert agg.close(timeout=10) is True
    counters = agg.counters
    assert counters.collected == 2 * names.size
    assert dict(counters.dropped) == {"max_classes": 2 * extra}
    # 10,000 results with stats pass the backend's 1 MiB: the window goes as several reports.
    posts = capture_server.posts
    assert len(posts) >= 2 and all(len(p.body) <= MAX_BODY_BYTES for p in posts)
    results = [r for p in posts for r in p.json()["inference_results"]]
    assert len(results) == len({r["class_name"] for r in results}) == DEFAULT_MAX_CLASSES
    assert sum(r["stats"]["count"] for r in results) == 2 * DEFAULT_MAX_CLASSES


def test_max_classes_guard_on_merge_back_counts_too() -> None:
    """A window merged into a full one refuses the new keys and counts their predictions."""
    full, extra = Window(max_classes=3), Window(max_classes=3)
    full.add(
        mmagg.to_batch({"predictions": [{"class": c, "confidence": 0.5} for c in "abc"]}),
        model_id="m",
    )
    extra.add(
        mmagg.to_batch({"predictions": [{"class": c, "confidence": 0.5} for c in "cdd"]}),
        model_id="m",
    )
    full.merge_in(extra)
    held, _, dropped = assert_window_invariants(full)
    assert (held, dropped) == (4, 2)


ODD_VALUES: list[Any] = [0, 1, -1, 0.5, np.nan, np.inf, -np.inf, 1e308, None, "0.5", b"x", 1 + 1j]


@pytest.mark.parametrize("dtype", DTYPES.elements, ids=str)  # type: ignore[attr-defined]
@pytest.mark.parametrize("shape", [(0,), (3,), (2,), (3, 1)], ids=str)
def test_every_confidence_dtype_and_shape(dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    """The deterministic corner of the fuzzing: each dtype and shape, including odd values."""
    values = []
    for value in ODD_VALUES:
        with warnings.catch_warnings():  # building the odd array may warn; using it may not
            warnings.simplefilter("ignore")
            try:
                values.append(np.full(shape, value, dtype=dtype))
            except (TypeError, ValueError, OverflowError):
                continue
    for confidence in values:
        for data in ({}, None, {"class_name": np.array(["a", "b", "c"], dtype=object)}):
            frame = SimpleNamespace(xyxy=np.zeros((3, 4)), confidence=confidence, data=data)
            try:
                batch = mmagg.to_batch(frame)
            except (TypeError, ValueError):
                continue
            assert batch is not None and batch.confidences.dtype == np.float64
