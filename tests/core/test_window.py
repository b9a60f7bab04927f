"""The window equals the original's store-everything-then-sort, on any stream."""

from __future__ import annotations

import math
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmagg.window as window_module
from mmagg import Window
from mmagg.predictions import PredictionBatch
from mmagg.window import FOLD_THRESHOLD, HISTOGRAM_BUCKETS, naive_best

CLASSES = ["", "car", "person", "helmet", "ünïcode", "a" * 300]
MODELS = ["m/1", "m/2"]
# A few fixed values make ties frequent; arbitrary floats cover the rest, including values
# outside [0, 1], which the window refuses (and counts) one prediction at a time.
CONFIDENCES = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 0.5, 1.0, -0.0, 1.0000000000000002, -1e-300]),
    st.floats(min_value=-1.0, max_value=2.0, allow_nan=False),
)


def in_range(confidence: float) -> bool:
    return 0.0 <= confidence <= 1.0


Prediction = tuple[str, float, str, str]  # class, confidence, inference id, model type
frame_strategy = st.tuples(
    st.sampled_from(MODELS),
    st.lists(
        st.tuples(
            st.sampled_from(CLASSES),
            CONFIDENCES,
            st.sampled_from(["i1", "i2", "i3"]),
            st.sampled_from(["object-detection", "classification"]),
        ),
        min_size=0,
        max_size=12,
    ),
)


def batch_of(preds: list[Prediction], ids: str = "none") -> PredictionBatch:
    """``ids``: "none" (group by name), "consistent" (one id per name, as models give),
    or "scrambled" (ids that disagree with names: the window must not trust them)."""
    class_ids = None
    if ids == "consistent":
        class_ids = np.array([CLASSES.index(p[0]) for p in preds], dtype=np.int64)
    elif ids == "scrambled":
        class_ids = np.array([len(p[2]) % 2 for p in preds], dtype=np.int64)
    return PredictionBatch(
        class_names=np.array([p[0] for p in preds], dtype=np.str_),
        confidences=np.array([p[1] for p in preds], dtype=np.float64),
        inference_ids=np.array([p[2] for p in preds], dtype=np.str_),
        model_types=np.array([p[3] for p in preds], dtype=np.str_),
        class_ids=class_ids,
    )


def fill(
    frames: list[tuple[str, list[Prediction]]], start: float = 0.0, ids: str = "none"
) -> Window:
    window = Window()
    for i, (model, preds) in enumerate(frames):
        if preds:
            window.add(batch_of(preds, ids), model_id=model, seen_at=start + i)
    return window


def results_of(window: Window) -> dict[tuple[str, str], tuple[float, str, str]]:
    return {
        (r["model_id"], r["class_name"]): (r["confidence"], r["inference_id"], r["model_type"])
        for r in window.to_results()
    }


def naive_stats(frames: list[tuple[str, list[Prediction]]]) -> dict[tuple[str, str], list[float]]:
    values: dict[tuple[str, str], list[float]] = {}
    for model, preds in frames:
        for name, conf, _, _ in preds:
            if in_range(conf):
                values.setdefault((model, name), []).append(conf)
    return values


@settings(max_examples=200, deadline=None)
@given(st.lists(frame_strategy, max_size=40), st.sampled_from(["none", "consistent", "scrambled"]))
def test_window_equals_store_all_then_sort(
    frames: list[tuple[str, list[Prediction]]], ids: str
) -> None:
    window = fill(frames, ids=ids)
    stream = ((m, n, c, i, t) for m, preds in frames for n, c, i, t in preds if in_range(c))
    assert results_of(window) == naive_best(stream)
    out_of_range = sum(not in_range(c) for _, preds in frames for _, c, _, _ in preds)
    assert window.snapshot()[2] == out_of_range
    stats = {(k[0], k[1]): v for k, v in window.stats().items()}
    for key, values in naive_stats(frames).items():
        s = stats[key]
        assert s.count == len(values)
        assert s.total == pytest.approx(math.fsum(values))
        assert s.minimum == min(values) and s.maximum == max(values)
        expected_hist = [0] * HISTOGRAM_BUCKETS
        for v in values:
            expected_hist[min(HISTOGRAM_BUCKETS - 1, max(0, math.floor(v * 10)))] += 1
        assert s.histogram == expected_hist


@settings(max_examples=80, deadline=None)
@given(
    st.lists(frame_strategy, max_size=10),
    st.lists(frame_strategy, max_size=10),
    st.lists(frame_strategy, max_size=10),
)
def test_merge_is_associative_and_commutative(
    a: list[tuple[str, list[Prediction]]],
    b: list[tuple[str, list[Prediction]]],
    c: list[tuple[str, list[Prediction]]],
) -> None:
    wa, wb, wc = fill(a, 0), fill(b, 100), fill(c, 200)

    def view(w: Window) -> object:
        stats = {k: (v.count, v.minimum, v.maximum, v.histogram) for k, v in w.stats().items()}
        sums = {k: v.total for k, v in w.stats().items()}
        return results_of(w), stats, sums

    left, right = wa.merge(wb).merge(wc), wa.merge(wb.merge(wc))
    assert view(left)[:2] == view(right)[:2]
    assert view(left)[2] == pytest.approx(view(right)[2])
    assert view(wa.merge(wb))[:2] == view(wb.merge(wa))[:2]
    # Merging windows of consecutive parts equals one window over the whole stream.
    assert results_of(left) == results_of(fill(a + b + c))


def test_ids_shared_by_two_names_are_not_trusted() -> None:
    window = Window()
    preds = [("car", 0.9, "a", "od"), ("bus", 0.8, "b", "od"), ("car", 0.7, "c", "od")]
    batch = batch_of(preds)
    batch.class_ids = np.array([3, 3, 3], dtype=np.int64)
    window.add(batch, model_id="m")
    assert {s.class_name: s.confidence for s in window.samples()} == {"car": 0.9, "bus": 0.8}
    # Two ids for one name (classes merged upstream): still one key per name.
    other = batch_of([("car", 0.95, "d", "od"), ("car", 0.1, "e", "od")])
    other.class_ids = np.array([1, 2], dtype=np.int64)
    window.add(other, model_id="m")
    assert {s.class_name: s.confidence for s in window.samples()} == {"car": 0.95, "bus": 0.8}
    assert window.stats()[("m", "car", "")].count == 4


def test_first_seen_wins_ties_across_folds() -> None:
    window = Window()
    n = FOLD_THRESHOLD + 10
    first = batch_of([("car", 0.5, "first", "od")] * n)
    window.add(first, model_id="m", seen_at=1.0)
    window.add(batch_of([("car", 0.5, "second", "od")]), model_id="m", seen_at=2.0)
    (sample,) = window.samples()
    assert sample.inference_id == "first"
    assert window.stats()[("m", "car", "")].count == n + 1


def test_non_finite_confidences_are_rejected_and_counted() -> None:
    window = Window()
    window.add(
        batch_of([("car", float("nan"), "", ""), ("car", math.inf, "", ""), ("car", 0.3, "", "")]),
        model_id="m",
    )
    window.add(batch_of([("bus", -math.inf, "", "")]), model_id="m")
    assert [(s.class_name, s.confidence) for s in window.samples()] == [("car", 0.3)]
    assert window.rejected_nonfinite == 3


def test_out_of_range_confidences_are_rejected_and_counted() -> None:
    window = Window()
    window.add(
        batch_of(
            [
                ("car", 1.5, "too-high", ""),
                ("car", -0.1, "negative", ""),
                ("car", 1.0, "edge-high", ""),
                ("bus", 0.0, "edge-low", ""),
                ("bus", 100.0, "percent", ""),
            ]
        ),
        model_id="m",
    )
    assert sorted((s.class_name, s.confidence, s.inference_id) for s in window.samples()) == [
        ("bus", 0.0, "edge-low"),
        ("car", 1.0, "edge-high"),
    ]
    assert window.rejected_nonfinite == 3
    assert {k[1]: s.count for k, s in window.stats().items()} == {"car": 1, "bus": 1}


def test_cardinality_guard_counts_what_it_refuses() -> None:
    window = Window(max_classes=3)
    window.add(batch_of([(f"c{i}", 0.5, "", "") for i in range(5)]), model_id="m")
    window.add(batch_of([("c0", 0.9, "", ""), ("c9", 0.9, "", "")]), model_id="m")
    assert len(window) == 3
    assert window.dropped_max_classes == 3


def test_memory_is_bounded_by_classes_not_frames() -> None:
    window = Window()
    preds = [(f"c{i % 20}", (i % 97) / 97, "x", "od") for i in range(50)]
    for frame in range(3000):
        window.add(batch_of(preds), model_id="m", seen_at=frame)
    assert len(window) == 20
    assert window._buffered < FOLD_THRESHOLD  # folded as it goes, never the whole stream


# -- the fold spread over add() calls (issue 14) ----------------------------------------------

ID_MODES = ["none", "consistent", "scrambled", "negative", "huge"]


def batch_with(preds: list[Prediction], ids: str) -> PredictionBatch:
    """``batch_of`` plus ids the window must not use as array indexes."""
    if ids == "negative":
        batch = batch_of(preds)
        batch.class_ids = np.array([-1 - CLASSES.index(p[0]) for p in preds], dtype=np.int64)
        return batch
    if ids == "huge":
        batch = batch_of(preds)
        batch.class_ids = np.array([2**40 + CLASSES.index(p[0]) for p in preds], dtype=np.int64)
        return batch
    return batch_of(preds, ids)


spread_frame = st.tuples(
    frame_strategy,
    st.sampled_from(ID_MODES),
    st.sampled_from(["", "", "cam-2"]),
    st.booleans(),  # read the window after this frame
)
WITH_NON_FINITE = st.one_of(CONFIDENCES, st.sampled_from([math.nan, math.inf, -math.inf]))


def expected_of(
    frames: list[tuple[str, str, list[Prediction]]],
) -> tuple[
    dict[tuple[str, str, str], tuple[float, str, str]], dict[tuple[str, str, str], list[float]]
]:
    """Store everything, group by key, sort: computed without the window."""
    best: dict[tuple[str, str, str], tuple[float, str, str]] = {}
    values: dict[tuple[str, str, str], list[float]] = {}
    for model, source, preds in frames:
        for name, conf, inference_id, model_type in preds:
            if not in_range(conf):  # NaN, inf and values outside [0, 1] are refused
                continue
            key = (model, name, source)
            values.setdefault(key, []).append(conf)
            if key not in best or conf > best[key][0]:  # strictly: first seen wins ties
                best[key] = (conf, inference_id, model_type)
    return best, values


def check_window(window: Window, frames: list[tuple[str, str, list[Prediction]]]) -> None:
    best, values = expected_of(frames)
    got = {
        (s.model_id, s.class_name, s.source_id): (s.confidence, s.inference_id, s.model_type)
        for s in window.samples()
    }
    assert got == best
    stats = window.stats()
    assert set(stats) == set(values)
    for key, vals in values.items():
        s = stats[key]
        assert (s.count, s.minimum, s.maximum) == (len(vals), min(vals), max(vals))
        assert s.total == pytest.approx(math.fsum(vals))
        hist = [0] * HISTOGRAM_BUCKETS
        for v in vals:
            hist[min(HISTOGRAM_BUCKETS - 1, max(0, math.floor(v * 10)))] += 1
        assert s.histogram == hist
    refused = sum(1 for _, _, preds in frames for p in preds if not in_range(p[1]))
    assert window.rejected_nonfinite == refused


@settings(max_examples=150, deadline=None)
@given(st.lists(spread_frame, max_size=40), st.integers(min_value=1, max_value=30))
def test_spread_fold_equals_store_all_then_sort(
    frames: list[tuple[tuple[str, list[Prediction]], str, str, bool]], threshold: int
) -> None:
    """Small fold thresholds make folds start, run step by step inside add() and overlap
    with reads, with id maps learned, trusted and distrusted along the way."""
    seen: list[tuple[str, str, list[Prediction]]] = []
    with patch.object(window_module, "FOLD_THRESHOLD", threshold):
        window = Window()
        for i, ((model, preds), ids, source, read) in enumerate(frames):
            if preds:
                window.add(batch_with(preds, ids), model_id=model, source_id=source, seen_at=i)
            seen.append((model, source, preds))
            if read:
                check_window(window, seen)
        check_window(window, seen)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(MODELS),
            st.lists(
                st.tuples(st.sampled_from(CLASSES), WITH_NON_FINITE, st.just("i"), st.just("t")),
                max_size=12,
            ),
            st.sampled_from(ID_MODES),
        ),
        max_size=30,
    ),
    st.integers(min_value=0, max_value=30),
    st.integers(min_value=1, max_value=20),
)
def test_drain_in_the_middle_of_a_fold_loses_nothing(
    frames: list[tuple[str, list[Prediction], str]], cut: int, threshold: int
) -> None:
    """A window taken while a fold is under way carries that fold with it: the taken part
    and the rest, merged, equal one window over the whole stream."""
    with patch.object(window_module, "FOLD_THRESHOLD", threshold):
        window = Window()
        taken = None
        for i, (model, preds, ids) in enumerate(frames):
            if i == cut:
                taken = window.drain()
            if preds:
                window.add(batch_with(preds, ids), model_id=model, seen_at=i)
        if taken is None:
            taken = window.drain()
        whole = [(model, "", preds) for model, preds, _ in frames]
        check_window(taken.merge(window), whole)
        check_window(taken, whole[:cut])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(frame_strategy, st.sampled_from(ID_MODES)), max_size=30),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=20),
)
def test_cardinality_guard_under_spread_folds(
    frames: list[tuple[tuple[str, list[Prediction]], str]], max_classes: int, threshold: int
) -> None:
    """At most ``max_classes`` keys; every prediction either counted in a kept key or
    counted as dropped; a kept key's best is its best over the whole stream."""
    with patch.object(window_module, "FOLD_THRESHOLD", threshold):
        window = Window(max_classes=max_classes)
        for i, ((model, preds), ids) in enumerate(frames):
            if preds:
                window.add(batch_with(preds, ids), model_id=model, seen_at=i)
        best, values = expected_of([(m, "", p) for (m, p), _ in frames])
        samples = window.samples()
        assert len(samples) <= max_classes
        stats = window.stats()
        total = sum(len(v) for v in values.values())
        assert sum(s.count for s in stats.values()) + window.dropped_max_classes == total
        for s in samples:
            key = (s.model_id, s.class_name, s.source_id)
            assert (s.confidence, s.inference_id, s.model_type) == best[key]
            assert stats[key].count == len(values[key])


def test_class_ids_beyond_the_first_fold_keep_their_names() -> None:
    """An id seen with one name in an earlier fold and another name later: names decide."""
    with patch.object(window_module, "FOLD_THRESHOLD", 2):
        window = Window()
        first = batch_of([("car", 0.4, "a", "od"), ("car", 0.3, "b", "od")])
        first.class_ids = np.array([7, 7], dtype=np.int64)
        window.add(first, model_id="m")
        later = batch_of([("bus", 0.9, "c", "od"), ("car", 0.5, "d", "od")])
        later.class_ids = np.array([7, 7], dtype=np.int64)
        window.add(later, model_id="m")
        got = {s.class_name: (s.confidence, s.inference_id) for s in window.samples()}
    assert got == {"car": (0.5, "d"), "bus": (0.9, "c")}
    assert window.stats()[("m", "car", "")].count == 3


def test_a_fold_is_spread_over_the_following_calls() -> None:
    """No add() runs a whole fold: the buffered frames are handed to a fold that advances
    one step per call (its steps are counted here through the generator)."""
    window = Window()
    preds = [(f"c{i % 20}", (i % 97) / 97, "x", "od") for i in range(50)]
    calls_with_fold = 0
    for frame in range(200):
        window.add(batch_of(preds), model_id="m", seen_at=frame)
        calls_with_fold += window._folding is not None
    # A fold starts every FOLD_THRESHOLD / 50 frames and stays under way for several calls.
    assert calls_with_fold >= 200 // (FOLD_THRESHOLD // 50 + 1) * 5
    assert len(window) == 20
    assert window.stats()[("m", "c0", "")].count == 200 * 3


# -- the per-stream column buffers (issue 14, round 5) ---------------------------------------


@settings(max_examples=150, deadline=None)
def _check_cut_stream(
    frames: list[tuple[tuple[tuple[str, list[Prediction]], str, str, bool], bool]],
) -> None:
    """Feed `frames` ((model, predictions), id mode, source, read now?), cut?) into one
    window: a read checks it against store-everything-then-sort over the frames since the
    last cut, a cut drains it (the taken window checked the same way, the window left
    empty)."""
    window = Window()
    segment: list[tuple[str, str, list[Prediction]]] = []
    for i, (((model, preds), ids, source, read), cut) in enumerate(frames):
        if preds:
            window.add(batch_with(preds, ids), model_id=model, source_id=source, seen_at=i)
        segment.append((model, source, preds))
        if read:
            check_window(window, segment)
        if cut:
            check_window(window.drain(), segment)
            assert len(window) == 0 and window.is_empty() and not window.samples()
            segment = []
    check_window(window, segment)


@given(
    st.lists(st.tuples(spread_frame, st.booleans()), max_size=40),
    st.integers(min_value=1, max_value=30),
    st.integers(min_value=1, max_value=8),
    st.sampled_from([0, 200, 1 << 20]),
    st.integers(min_value=1, max_value=7),
)
def test_column_buffers_grow_widen_and_are_reused_exactly(
    frames: list[tuple[tuple[tuple[str, list[Prediction]], str, str, bool], bool]],
    threshold: int,
    min_capacity: int,
    kept_bytes: int,
    rows_per_step: int,
) -> None:
    """Buffers that start at a few rows grow (at any row), widen their name column when a
    longer name arrives after shorter ones, are reused after a fold or dropped when over
    the kept size, and fold in steps of a few rows; windows are taken by ``drain()`` at
    any point, mid-fold included: each taken window still equals store-everything-then-
    sort over its own frames, every prediction counted."""
    with (
        patch.object(window_module, "FOLD_THRESHOLD", threshold),
        patch.object(window_module, "_MIN_CAPACITY", min_capacity),
        patch.object(window_module, "_MAX_KEPT_BYTES", kept_bytes),
        patch.object(window_module, "_ROWS_PER_STEP", rows_per_step),
        patch.object(window_module, "_CHECK_ROWS_PER_STEP", rows_per_step),
    ):
        _check_cut_stream(frames)


def test_buffers_are_reused_from_fold_to_fold() -> None:
    """The steady state allocates no column buffer: one fills while the other is folded,
    and the folded one, emptied, is the next to fill."""
    window = Window()
    preds = [(f"c{i % 20}", (i % 97) / 97, "x", "od") for i in range(50)]
    seen: dict[int, object] = {}  # held, so that no id is reused by a new buffer
    for frame in range(FOLD_THRESHOLD // 50 * 6):
        window.add(batch_of(preds), model_id="m", seen_at=frame)
        seen.update((id(columns), columns) for columns in window._pending.values())
    assert len(seen) == 2
    assert window.stats()[("m", "c0", "")].count == FOLD_THRESHOLD // 50 * 6 * 3


def test_a_long_name_after_short_ones_is_kept_whole() -> None:
    """The name column widens when a longer name arrives: no name is cut to the width of
    the names before it (numpy would truncate silently)."""
    with patch.object(window_module, "FOLD_THRESHOLD", 4):
        window = Window()
        window.add(batch_of([("a", 0.2, "i", "od")] * 3), model_id="m")
        window.add(
            batch_of([("a" * 300, 0.9, "j", "od"), ("ünïcode", 0.4, "k", "od")]), model_id="m"
        )
        window.add(batch_of([("a", 0.3, "l", "od")]), model_id="m")
    assert sorted((s.class_name, s.confidence) for s in window.samples()) == [
        ("a", 0.3),
        ("a" * 300, 0.9),
        ("ünïcode", 0.4),
    ]


# -- the layout carried from one window to the next (issue 14) -------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(spread_frame, st.booleans()), max_size=40),
    st.integers(min_value=1, max_value=30),
)
def test_windows_taken_in_turn_each_equal_store_all_then_sort(
    frames: list[tuple[tuple[tuple[str, list[Prediction]], str, str, bool], bool]],
    threshold: int,
) -> None:
    """A stream cut into windows by ``drain()`` (as reports do): each taken window equals
    store-everything-then-sort over its own frames, although the next window starts with
    the previous one's key → slot layout and class-id maps (carried, not learned again)."""
    with patch.object(window_module, "FOLD_THRESHOLD", threshold):
        _check_cut_stream(frames)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(frame_strategy, st.sampled_from(ID_MODES), st.booleans()), max_size=30),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=20),
)
def test_cardinality_guard_counts_live_keys_of_each_window(
    frames: list[tuple[tuple[str, list[Prediction]], str, bool]], max_classes: int, threshold: int
) -> None:
    """With the layout carried, the guard still bounds each window's own keys: at most
    ``max_classes`` per window, every prediction of a window counted or dropped."""
    with patch.object(window_module, "FOLD_THRESHOLD", threshold):
        window = Window(max_classes=max_classes)
        segment: list[tuple[str, str, list[Prediction]]] = []

        def check(taken: Window) -> None:
            best, values = expected_of(segment)
            samples = taken.samples()
            assert len(samples) <= max_classes
            stats = taken.stats()
            total = sum(len(v) for v in values.values())
            assert sum(s.count for s in stats.values()) + taken.dropped_max_classes == total
            for s in samples:
                key = (s.model_id, s.class_name, s.source_id)
                assert (s.confidence, s.inference_id, s.model_type) == best[key]
                assert stats[key].count == len(values[key])

        for i, ((model, preds), ids, cut) in enumerate(frames):
            if preds:
                window.add(batch_with(preds, ids), model_id=model, seen_at=i)
            segment.append((model, "", preds))
            if cut:
                check(window.drain())
                segment = []
        check(window.drain())


def test_the_layout_is_carried_to_the_next_window() -> None:
    """The next window reuses the key → slot layout and the class-id map: no id is learned
    again, and a key absent from a window is absent from its results."""
    window = Window()
    names = np.array([f"c{i}" for i in range(40)])
    ids = np.arange(40, dtype=np.int64)
    batch = PredictionBatch(
        class_names=names,
        confidences=np.linspace(0.1, 0.9, 40),
        inference_ids=np.full(40, "i"),
        model_types=np.full(40, "od"),
        class_ids=ids,
    )
    window.add(batch, model_id="m")
    assert len(window) == 40  # a read folds (a stream folds every FOLD_THRESHOLD predictions)
    first = window.drain()
    assert len(first) == 40
    layout = window._table
    assert layout is not None
    assert layout.carried == 40 and len(layout.keys) == 40 and layout.nlive == 0
    half = PredictionBatch(
        class_names=names[:10],
        confidences=np.full(10, 0.5),
        inference_ids=np.full(10, "j"),
        model_types=np.full(10, "od"),
        class_ids=ids[:10],
    )
    window.add(half, model_id="m")
    assert len(window) == 10
    assert window._table is layout
    assert len(layout.keys) == 40  # nothing learned again, nothing added
    assert sorted(s.class_name for s in window.samples()) == sorted(names[:10].tolist())
    # A window that used under half of its layout starts the next one afresh (the taken
    # window hands the layout on when it is read, off the video loop).
    taken = window.drain()
    assert window._table is None  # the report call only swapped
    assert len(taken) == 10
    assert window._table is not None and window._table.carried == 0


def test_carried_keys_count_against_the_guard_only_when_seen_again() -> None:
    """max_classes=2: a window of a, b, then one of c, d, a: the carried a and b are not
    this window's keys until seen, and a third key is refused even though it has a slot."""
    with patch.object(window_module, "FOLD_THRESHOLD", 1):
        window = Window(max_classes=2)
        window.add(batch_of([("car", 0.5, "", ""), ("person", 0.6, "", "")]), model_id="m")
        assert len(window) == 2  # folded
        assert len(window.drain()) == 2  # the read hands the layout on
        assert window._table is not None and window._table.carried == 2
        window.add(batch_of([("helmet", 0.5, "", ""), ("", 0.4, "", "")]), model_id="m")
        window.add(batch_of([("car", 0.9, "", ""), ("person", 0.9, "", "")]), model_id="m")
        assert sorted(s.class_name for s in window.samples()) == ["", "helmet"]
        assert window.dropped_max_classes == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(frame_strategy, max_size=8), min_size=1, max_size=12), st.booleans())
def test_absorbed_windows_equal_merged_ones(
    parts: list[list[tuple[str, list[Prediction]]]], drain_first: bool
) -> None:
    """``absorb`` (constant time, merged by the next read) gives what ``merge`` gives, also
    past MAX_ABSORBED windows and when the absorbing window is taken by ``drain`` first."""
    merged = Window()
    for i, part in enumerate(parts):
        merged = merged.merge(fill(part, start=100.0 * i))
    target = Window()
    for i, part in enumerate(parts):
        target.absorb(fill(part, start=100.0 * i))
    assert len(target._absorbed) <= window_module.MAX_ABSORBED
    if drain_first:
        target = target.drain()
    # Samples carry their arrival number (a tie-break): compare what is reported.
    assert target.to_results(extensions=True) == merged.to_results(extensions=True)
    assert target.snapshot()[2:] == merged.snapshot()[2:]
    assert target.is_empty() == merged.is_empty()


def test_give_back_does_not_fold_the_live_window() -> None:
    """A failed window given back to the memory store is absorbed: the live window's
    buffered frames are not folded on the sender's thread under the window's lock (the
    video loop would wait for it), and the next report carries both."""
    from mmagg import MemoryStore

    store = MemoryStore()
    live = store.window("k")
    live.add(batch_of([("car", 0.4, "a", "od")]), model_id="m", seen_at=1.0)
    failed = fill([("m", [("car", 0.9, "b", "od"), ("bus", 0.5, "c", "od")])])
    store.give_back("k", failed)
    assert live._buffered and live._folding is None  # nothing folded
    taken = store.take("k")
    assert results_of(taken) == {("m", "car"): (0.9, "b", "od"), ("m", "bus"): (0.5, "c", "od")}
    assert taken.stats()[("m", "car", "")].count == 2


def test_drain_swaps_only_and_the_reader_hands_the_layout_on() -> None:
    """The report call (``drain``) builds nothing: the live window has no table until the
    taken window is read (by the sender) and hands its layout on; a layout handed on for
    an older drain is ignored, and a window absorbed elsewhere hands nothing on."""
    window = Window()
    window.add(batch_of([("car", 0.5, "", ""), ("person", 0.6, "", "")]), model_id="m")
    first = window.drain()
    assert window._table is None
    second = window.drain()  # drained again before the first was read
    assert len(first) == 2
    assert window._table is None  # the first window's layout is for an older drain
    assert len(second) == 0
    assert window._table is None  # the second window never had a table: nothing to hand on
    window.add(batch_of([("car", 0.7, "", "")]), model_id="m")
    third = window.drain()
    target = Window()
    target.absorb(third)
    assert len(target) == 1
    assert window._table is None  # an absorbed window hands no layout on
    window.add(batch_of([("bus", 0.4, "", "")]), model_id="m")
    assert [s.class_name for s in window.samples()] == ["bus"]  # built its own table
