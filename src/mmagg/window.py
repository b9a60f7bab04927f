"""The window: best prediction per class plus mergeable statistics, kept on arrival.

Memory is O(classes) whatever the frame rate, window length or mask size: only the
columns of a frame are kept, folded in small batches with numpy, and the winner per
``(model_id, class_name, source_id)`` survives. The result equals the original's
"store everything, group by class, sort by confidence, take the first" (ties: the
prediction seen first wins).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mmagg.predictions import PredictionBatch
from mmagg.wire import CONFIDENCE_MAX, CONFIDENCE_MIN, HISTOGRAM_BUCKETS

__all__ = ["HISTOGRAM_BUCKETS", "ClassStats", "Key", "Sample", "Window"]

#: Fixed confidence buckets of the per-class histogram: ``[i/10, (i+1)/10)``, 1.0 in the last.
#: Folding happens once this many predictions are buffered (bounds memory and per-call work).
FOLD_THRESHOLD = 1024
#: Default cardinality guard: distinct keys a window accepts before refusing new ones.
DEFAULT_MAX_CLASSES = 10_000

#: ``(model_id, class_name, source_id)``; ``source_id`` is ``""`` unless per-source is on.
Key = tuple[str, str, str]

_arrivals = itertools.count()


@dataclass(frozen=True, slots=True)
class Sample:
    """The representative prediction of one key: the most confident, first seen on ties.

    ``seen_at`` (wall-clock seconds) and ``seq`` (arrival order) only break ties.
    """

    class_name: str
    confidence: float
    inference_id: str
    model_type: str
    model_id: str
    source_id: str = ""
    seen_at: float = 0.0
    seq: int = 0

    def rank(self) -> tuple[float, float, int, str, str]:
        """Total order: the smallest rank is the better sample."""
        return (-self.confidence, self.seen_at, self.seq, self.inference_id, self.model_type)

    def to_result(self) -> dict[str, Any]:
        """The ``inference_results`` item of the original payload (DESIGN §2)."""
        return {
            "class_name": self.class_name,
            "confidence": self.confidence,
            "inference_id": self.inference_id,
            "model_type": self.model_type,
            "model_id": self.model_id,
        }


@dataclass(slots=True)
class ClassStats:
    """Count, sum, min, max and a fixed-bucket histogram of one key's confidences."""

    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)

    def merge_in(self, other: ClassStats) -> None:
        self.count += other.count
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    def copy(self) -> ClassStats:
        return ClassStats(self.count, self.total, self.minimum, self.maximum, list(self.histogram))

    def to_dict(self) -> dict[str, Any]:
        """The ``stats`` extension item (docs/wire-format.md)."""
        return {
            "count": self.count,
            "sum": self.total,
            "min": self.minimum,
            "max": self.maximum,
            "histogram": list(self.histogram),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ClassStats:
        return cls(
            int(raw["count"]),
            float(raw["sum"]),
            float(raw["min"]),
            float(raw["max"]),
            [int(v) for v in raw["histogram"]],
        )


@dataclass(slots=True)
class _Chunk:
    model_id: str
    source_id: str
    seen_at: float
    seq: int
    batch: PredictionBatch
    size: int


class _StatsTable:
    """Per-key statistics as parallel numpy arrays, one row per key, so that a fold
    updates every class of a batch in a few vectorised operations."""

    __slots__ = ("best", "count", "hist", "maximum", "minimum", "slots", "total")

    def __init__(self, capacity: int = 32) -> None:
        self.slots: dict[Key, int] = {}
        self.count = np.zeros(capacity, dtype=np.int64)
        self.total = np.zeros(capacity, dtype=np.float64)
        self.minimum = np.full(capacity, np.inf)
        self.maximum = np.full(capacity, -np.inf)
        self.hist = np.zeros((capacity, HISTOGRAM_BUCKETS), dtype=np.int64)
        #: Confidence of the sample kept for the key (mirrors ``Window._best``).
        self.best = np.full(capacity, -np.inf)

    def new_slot(self, key: Key) -> int:
        slot = len(self.slots)
        if slot >= self.count.shape[0]:
            self._grow()
        self.slots[key] = slot
        return slot

    def _grow(self) -> None:
        extra = self.count.shape[0]
        self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
        self.total = np.concatenate([self.total, np.zeros(extra)])
        self.minimum = np.concatenate([self.minimum, np.full(extra, np.inf)])
        self.maximum = np.concatenate([self.maximum, np.full(extra, -np.inf)])
        self.hist = np.concatenate([self.hist, np.zeros((extra, HISTOGRAM_BUCKETS), np.int64)])
        self.best = np.concatenate([self.best, np.full(extra, -np.inf)])

    def stats(self, slot: int) -> ClassStats:
        return ClassStats(
            int(self.count[slot]),
            float(self.total[slot]),
            float(self.minimum[slot]),
            float(self.maximum[slot]),
            self.hist[slot].tolist(),
        )

    def merge_stats(self, slot: int, item: ClassStats) -> None:
        self.count[slot] += item.count
        # Python's float addition: an overflow is inf (as in Lua), not a numpy warning.
        self.total[slot] = float(self.total[slot]) + item.total
        self.minimum[slot] = min(self.minimum[slot], item.minimum)
        self.maximum[slot] = max(self.maximum[slot], item.maximum)
        self.hist[slot] += np.asarray(item.histogram, dtype=np.int64)


class Window:
    """Best sample and statistics per key, for one reporting interval.

    ``add`` is cheap: it keeps the frame's columns and folds them with numpy every
    :data:`FOLD_THRESHOLD` predictions. Reading (``samples``, ``to_results``, ``merge``)
    folds what is pending first. Thread-safe.

    Example:
        >>> from mmagg.predictions import to_batch
        >>> w = Window()
        >>> w.add(to_batch({"predictions": [{"class": "cat", "confidence": 0.4}]}), model_id="m/1")
        1
        >>> w.add(to_batch({"predictions": [{"class": "cat", "confidence": 0.8}]}), model_id="m/1")
        1
        >>> [(r["class_name"], r["confidence"]) for r in w.to_results()]
        [('cat', 0.8)]
    """

    def __init__(self, *, max_classes: int = DEFAULT_MAX_CLASSES) -> None:
        self.max_classes = max_classes
        self._best: dict[Key, Sample] = {}
        self._table = _StatsTable()
        self._chunks: list[_Chunk] = []
        self._buffered = 0
        #: Predictions refused because their confidence was not a number within [0, 1]
        #: (NaN, infinite or out of range); the name is historical.
        self.rejected_nonfinite = 0
        #: Predictions refused because the window already held ``max_classes`` keys.
        self.dropped_max_classes = 0
        self._lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------------

    def add(
        self,
        batch: PredictionBatch | None,
        *,
        model_id: str,
        source_id: str = "",
        seen_at: float = 0.0,
    ) -> int:
        """Collect one frame's predictions; returns how many were taken in."""
        if batch is None or len(batch) == 0:
            return 0
        size = len(batch)
        chunk = _Chunk(model_id, source_id, seen_at, next(_arrivals), batch, size)
        with self._lock:
            self._chunks.append(chunk)
            self._buffered += size
            if self._buffered >= FOLD_THRESHOLD:
                self._fold()
        return size

    def merge_in(self, other: Window) -> None:
        """Merge ``other`` into this window (max per key, statistics summed)."""
        if other is self:
            return
        best, stats, rejected, dropped = other.snapshot()
        with self._lock:
            self._fold()
            self._merge_entries(best, stats)
            self.rejected_nonfinite += rejected
            self.dropped_max_classes += dropped

    def merge(self, other: Window) -> Window:
        """A new window holding both: associative and commutative.

        Example:
            >>> from mmagg.predictions import to_batch
            >>> a, b = Window(), Window()
            >>> low = to_batch({"predictions": [{"class": "x", "confidence": 0.2}]})
            >>> high = to_batch({"predictions": [{"class": "x", "confidence": 0.6}]})
            >>> _, _ = a.add(low, model_id="m"), b.add(high, model_id="m")
            >>> a.merge(b).to_results()[0]["confidence"]
            0.6
        """
        merged = Window(max_classes=max(self.max_classes, other.max_classes))
        merged.merge_in(self)
        merged.merge_in(other)
        return merged

    def merge_entries(self, best: Mapping[Key, Sample], stats: Mapping[Key, ClassStats]) -> None:
        """Merge raw entries (as read back from a store) into this window."""
        with self._lock:
            self._fold()
            self._merge_entries(best, stats)

    def _merge_entries(self, best: Mapping[Key, Sample], stats: Mapping[Key, ClassStats]) -> None:
        table = self._table
        for key, sample in best.items():
            current = self._best.get(key)
            if current is None:
                if len(self._best) >= self.max_classes:
                    self.dropped_max_classes += stats[key].count if key in stats else 1
                    continue
                slot = table.new_slot(key)
            elif sample.rank() < current.rank():
                slot = table.slots[key]
            else:
                continue
            self._best[key] = sample
            table.best[slot] = sample.confidence
        for key, item in stats.items():
            slot_or_none = table.slots.get(key)
            if slot_or_none is not None:
                table.merge_stats(slot_or_none, item)

    def drain(self) -> Window:
        """Move everything collected so far into a new window and leave this one empty.

        The object stays the same, so a caller holding it never adds to a taken window.

        Example:
            >>> from mmagg.predictions import to_batch
            >>> w = Window()
            >>> batch = to_batch({"predictions": [{"class": "x", "confidence": 0.5}]})
            >>> _ = w.add(batch, model_id="m")
            >>> taken = w.drain()
            >>> len(taken), len(w)
            (1, 0)
        """
        out = Window(max_classes=self.max_classes)
        with self._lock:
            out._best, self._best = self._best, {}
            out._table, self._table = self._table, _StatsTable()
            out._chunks, self._chunks = self._chunks, []
            out._buffered, self._buffered = self._buffered, 0
            out.rejected_nonfinite, self.rejected_nonfinite = self.rejected_nonfinite, 0
            out.dropped_max_classes, self.dropped_max_classes = self.dropped_max_classes, 0
        return out

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[Key, Sample], dict[Key, ClassStats], int, int]:
        """Copies of ``(best, stats, rejected_nonfinite, dropped_max_classes)``."""
        with self._lock:
            self._fold()
            table = self._table
            return (
                dict(self._best),
                {key: table.stats(slot) for key, slot in table.slots.items()},
                self.rejected_nonfinite,
                self.dropped_max_classes,
            )

    def samples(self) -> list[Sample]:
        """The best sample per key."""
        best, _, _, _ = self.snapshot()
        return list(best.values())

    def stats(self) -> dict[Key, ClassStats]:
        """Statistics per key."""
        return self.snapshot()[1]

    def to_results(self, *, extensions: bool = False) -> list[dict[str, Any]]:
        """``inference_results`` items, one per key; with ``extensions`` also
        ``source_id`` (when set) and ``stats``."""
        return [item for _, item, _ in self.result_items(extensions=extensions)]

    def result_items(self, *, extensions: bool = False) -> list[tuple[Key, dict[str, Any], int]]:
        """``(key, inference_results item, predictions it stands for)`` per key, in the
        order of :meth:`to_results`: what an exporter needs to split a window into parts.

        Example:
            >>> from mmagg.predictions import to_batch
            >>> w = Window()
            >>> batch = to_batch({"predictions": [{"class": "x", "confidence": 0.5}] * 3})
            >>> _ = w.add(batch, model_id="m")
            >>> [(key, item["class_name"], n) for key, item, n in w.result_items()]
            [(('m', 'x', ''), 'x', 3)]
        """
        best, stats, _, _ = self.snapshot()
        items = []
        for key, sample in best.items():
            item = sample.to_result()
            if extensions:
                if sample.source_id:
                    item["source_id"] = sample.source_id
                if key in stats:
                    item["stats"] = stats[key].to_dict()
            items.append((key, item, stats[key].count if key in stats else 1))
        return items

    def subset(self, keys: Iterable[Key]) -> Window:
        """A new window holding only ``keys`` (best sample and statistics), e.g. the part
        of a report that has to be sent again.

        Example:
            >>> from mmagg.predictions import to_batch
            >>> w = Window()
            >>> batch = to_batch({"predictions": [{"class": c, "confidence": 0.5} for c in "ab"]})
            >>> _ = w.add(batch, model_id="m")
            >>> sorted(k[1] for k in w.subset([("m", "b", "")]).keys())
            ['b']
        """
        best, stats, _, _ = self.snapshot()
        wanted = [key for key in keys if key in best]
        part = Window(max_classes=self.max_classes)
        part.merge_entries(
            {key: best[key] for key in wanted},
            {key: stats[key] for key in wanted if key in stats},
        )
        return part

    def __len__(self) -> int:
        """Number of keys (classes) held."""
        with self._lock:
            self._fold()
            return len(self._best)

    def is_empty(self) -> bool:
        with self._lock:
            return not self._chunks and not self._best

    def keys(self) -> Iterator[Key]:
        return iter(self.snapshot()[0])

    # -- folding -----------------------------------------------------------------------------

    def _fold(self) -> None:
        """Fold buffered chunks into the per-key state (caller holds the lock)."""
        if not self._chunks:
            return
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        groups: dict[tuple[str, str], list[_Chunk]] = {}
        for chunk in chunks:
            groups.setdefault((chunk.model_id, chunk.source_id), []).append(chunk)
        for (model_id, source_id), group in groups.items():
            self._fold_group(model_id, source_id, group)

    def _fold_group(self, model_id: str, source_id: str, group: list[_Chunk]) -> None:
        names = _concat([c.batch.class_names for c in group])
        conf = _concat([c.batch.confidences for c in group]).astype(np.float64, copy=False)
        lengths = np.fromiter((c.size for c in group), dtype=np.int64, count=len(group))
        chunk_of = np.repeat(np.arange(len(group)), lengths)
        ids = None
        if all(c.batch.class_ids is not None for c in group):
            ids = _concat([c.batch.class_ids for c in group])  # type: ignore[misc]
        # A confidence is a probability: NaN, inf and anything outside [0, 1] are refused
        # here, one prediction at a time (the backend would refuse the whole report).
        valid = (conf >= CONFIDENCE_MIN) & (conf <= CONFIDENCE_MAX)
        if not valid.all():
            self.rejected_nonfinite += int((~valid).sum())
            names, conf, chunk_of = names[valid], conf[valid], chunk_of[valid]
            ids = ids[valid] if ids is not None else None
            keep_rows = np.flatnonzero(valid)
        else:
            keep_rows = None
        if conf.size == 0:
            return
        unique, inverse = _group_names(names, ids)
        k = unique.size
        maxs = np.full(k, -np.inf)
        np.maximum.at(maxs, inverse, conf)
        # Per class, the first arrival among those reaching the maximum (first seen wins ties).
        at_max = np.flatnonzero(conf == maxs[inverse])
        winners = np.full(k, conf.size, dtype=np.int64)
        np.minimum.at(winners, inverse[at_max], at_max)
        counts = np.bincount(inverse, minlength=k)
        sums = np.bincount(inverse, weights=conf, minlength=k)
        mins = np.full(k, np.inf)
        np.minimum.at(mins, inverse, conf)
        scaled = conf * HISTOGRAM_BUCKETS
        np.minimum(np.maximum(scaled, 0.0, out=scaled), HISTOGRAM_BUCKETS - 1, out=scaled)
        buckets = scaled.astype(np.int64)
        hist = np.bincount(
            inverse * HISTOGRAM_BUCKETS + buckets, minlength=k * HISTOGRAM_BUCKETS
        ).reshape(k, HISTOGRAM_BUCKETS)
        rows = winners if keep_rows is None else keep_rows[winners]
        winner_chunks = chunk_of[winners]
        # Only the winners' ids and types are needed: read them from their own chunk.
        offsets = rows - (np.cumsum(lengths) - lengths)[winner_chunks]

        table = self._table
        names_list = unique.tolist()
        slots = np.empty(k, dtype=np.int64)
        accepted = np.ones(k, dtype=bool)
        for i, name in enumerate(names_list):  # once per class, not per prediction
            key = (model_id, name, source_id)
            slot = table.slots.get(key)
            if slot is None:
                if len(table.slots) >= self.max_classes:
                    accepted[i] = False
                    continue
                slot = table.new_slot(key)
            slots[i] = slot
        if not accepted.all():
            self.dropped_max_classes += int(counts[~accepted].sum())
            keep = np.flatnonzero(accepted)
            slots, counts, sums, mins, maxs, hist = (
                slots[keep],
                counts[keep],
                sums[keep],
                mins[keep],
                maxs[keep],
                hist[keep],
            )
            winners, winner_chunks, offsets = winners[keep], winner_chunks[keep], offsets[keep]
            names_list = [names_list[i] for i in keep.tolist()]
        # Slots are distinct within a fold, so plain fancy-index updates are exact.
        table.count[slots] += counts
        table.total[slots] += sums
        table.minimum[slots] = np.minimum(table.minimum[slots], mins)
        table.maximum[slots] = np.maximum(table.maximum[slots], maxs)
        table.hist[slots] += hist
        # Strictly better only: what is already kept arrived first and wins ties.
        improved = np.flatnonzero(maxs > table.best[slots])
        if improved.size == 0:
            return
        table.best[slots[improved]] = maxs[improved]
        for i in improved.tolist():
            chunk = group[int(winner_chunks[i])]
            offset = int(offsets[i])
            name = names_list[i]
            self._best[(model_id, name, source_id)] = Sample(
                class_name=name,
                confidence=float(maxs[i]),
                inference_id=str(chunk.batch.inference_ids[offset]),
                model_type=str(chunk.batch.model_types[offset]),
                model_id=model_id,
                source_id=source_id,
                seen_at=chunk.seen_at,
                seq=chunk.seq,
            )


def _group_names(
    names: npt.NDArray[np.str_], ids: npt.NDArray[np.int64] | None
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.intp]]:
    """Distinct names and each row's group. Grouping by integer class id is much cheaper
    than sorting strings; it is used only when ids and names agree one to one."""
    if ids is not None:
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        unique = names[first]
        if bool((names == unique[inverse]).all()) and len(set(unique.tolist())) == unique.size:
            return unique, inverse
    unique, inverse = np.unique(names, return_inverse=True)
    return unique, inverse.reshape(-1)


def _concat(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def naive_best(
    stream: Iterable[tuple[str, str, float, str, str]],
) -> dict[tuple[str, str], tuple[float, str, str]]:
    """The original's algorithm, for tests and benchmarks: store all, sort per class.

    ``stream`` yields ``(model_id, class_name, confidence, inference_id, model_type)``.
    """
    groups: dict[tuple[str, str], list[tuple[float, str, str]]] = {}
    for model_id, name, confidence, inference_id, model_type in stream:
        groups.setdefault((model_id, name), []).append((confidence, inference_id, model_type))
    result = {}
    for key, items in groups.items():
        items.sort(key=lambda item: item[0], reverse=True)  # stable: first seen wins ties
        result[key] = items[0]
    return result
