"""The window: best prediction per class plus mergeable statistics, kept on arrival.

Memory is O(classes) whatever the frame rate, window length or mask size: only the
columns of a frame are kept, folded in small batches with numpy, and the winner per
``(model_id, class_name, source_id)`` survives. The result equals the original's
"store everything, group by class, sort by confidence, take the first" (ties: the
prediction seen first wins).
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mmagg.predictions import PredictionBatch
from mmagg.wire import CONFIDENCE_MAX, CONFIDENCE_MIN, HISTOGRAM_BUCKETS

__all__ = ["HISTOGRAM_BUCKETS", "ClassStats", "Key", "Sample", "Window"]

#: Fixed confidence buckets of the per-class histogram: ``[i/10, (i+1)/10)``, 1.0 in the last.
#: A fold starts once this many predictions are buffered (bounds memory); it then runs one
#: small step per ``add`` call, so a larger batch lowers the mean without raising any call
#: (a step's work is bounded in rows, not in a fraction of the fold).
FOLD_THRESHOLD = 4096
#: Default cardinality guard: distinct keys a window accepts before refusing new ones.
DEFAULT_MAX_CLASSES = 10_000
#: Windows :meth:`Window.absorb` keeps unmerged; one more and they are merged at once (an
#: unmerged window holds its buffered frames' columns: memory stays flat through a long fault).
MAX_ABSORBED = 1

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


#: One buffered frame: ``(batch, seen_at, seq)`` (its rows start at the matching ``starts``).
_Frame = tuple[PredictionBatch, float, int]
#: A stream: ``(model_id, source_id)``.
_Stream = tuple[str, str]
#: Fewest rows a stream's column buffer holds. A new buffer starts with room for what the
#: window's last buffer held and a quarter (a fold threshold and a quarter in the steady
#: state; a few frames for a window reported every second); it doubles when a frame does
#: not fit.
_MIN_CAPACITY = 64
#: Rows a window's very first buffer is sized for (it doubles from there; later buffers
#: are sized by the last one, so only a stream's first window grows its buffer).
_FIRST_ROWS = 512
#: A buffer over this many bytes is not kept for reuse once folded (held memory stays
#: bounded after a burst of huge frames or very long class names).
_MAX_KEPT_BYTES = 1 << 20


def _empty_names(capacity: int, width: int) -> npt.NDArray[np.str_]:
    """An uninitialised string column: ``np.empty`` zero-fills a string dtype (a memset of
    the whole buffer on the caller's thread), an integer one it does not."""
    width = max(width, 1)
    names: npt.NDArray[np.str_] = np.empty(capacity * width, dtype=np.uint32).view(f"<U{width}")
    return names


class _Columns:
    """One stream's buffered frames, copied on arrival into preallocated contiguous
    columns (confidence, class id, class name) that grow by doubling: the fold reads them
    as they are, with no concatenation of per-frame arrays. The frames themselves are
    kept only to build the winners' samples (inference id, model type)."""

    __slots__ = ("conf", "frames", "has_ids", "ids", "names", "size", "starts")

    def __init__(self, capacity: int = 0, width: int = 1) -> None:
        capacity = max(capacity, _MIN_CAPACITY)
        self.conf = np.empty(capacity, dtype=np.float64)
        self.ids = np.empty(capacity, dtype=np.int64)
        self.names = _empty_names(capacity, width)
        self.size = 0
        self.frames: list[_Frame] = []
        #: First row of each frame, in arrival order.
        self.starts: list[int] = []
        #: Whether every frame so far came with class ids.
        self.has_ids = True

    def append(self, batch: PredictionBatch, seen_at: float, seq: int) -> None:
        start = self.size
        end = start + batch.confidences.shape[0]
        names = batch.class_names
        if names.dtype.kind != "U":
            names = np.asarray(names, dtype=np.str_)
        if end > self.conf.shape[0]:
            self._grow(end)
        if names.dtype.itemsize > self.names.dtype.itemsize:
            wider = _empty_names(self.names.shape[0], names.dtype.itemsize // 4)
            wider[:start] = self.names[:start]
            self.names = wider
        self.conf[start:end] = batch.confidences
        self.names[start:end] = names
        ids = batch.class_ids
        if ids is None:
            self.has_ids = False
        elif self.has_ids:
            self.ids[start:end] = ids
        self.frames.append((batch, seen_at, seq))
        self.starts.append(start)
        self.size = end

    def _grow(self, need: int) -> None:
        capacity = max(need, 2 * self.conf.shape[0])
        used = self.size
        conf, ids, names = self.conf, self.ids, self.names
        self.conf = np.empty(capacity, dtype=np.float64)
        self.ids = np.empty(capacity, dtype=np.int64)
        self.names = _empty_names(capacity, names.dtype.itemsize // 4)
        self.conf[:used] = conf[:used]
        self.ids[:used] = ids[:used]
        self.names[:used] = names[:used]

    def emptied(self) -> _Columns | None:
        """This buffer, emptied for reuse (``None`` when it grew too large to keep)."""
        if self.conf.nbytes + self.ids.nbytes + self.names.nbytes > _MAX_KEPT_BYTES:
            return None
        self.size = 0
        self.frames = []
        self.starts = []
        self.has_ids = True
        return self


#: Slot markers in an id map: an id not seen yet, and an id whose key the guard refused.
_UNKNOWN = -1
_REFUSED = -2
#: Class ids at or above this are not used as array indexes (the fold groups by name).
_MAX_DIRECT_ID = 1 << 16


class _IdMap:
    """What one ``(model_id, source_id)`` stream's class ids mean in one table: each id's
    slot and the class name it was first seen with (every later row is checked against it)."""

    __slots__ = ("name", "slot", "trusted")

    def __init__(self) -> None:
        self.slot = np.full(0, _UNKNOWN, dtype=np.int64)
        self.name: npt.NDArray[np.str_] = np.zeros(0, dtype="<U1")
        #: Cleared when a row's name disagrees with its id: names decide until the next table.
        self.trusted = True

    def reserve(self, size: int) -> None:
        old = self.slot.shape[0]
        if size <= old:
            return
        new = max(size, 2 * old, 64)
        self.slot = np.concatenate([self.slot, np.full(new - old, _UNKNOWN, dtype=np.int64)])
        name = np.zeros(new, dtype=self.name.dtype)
        name[:old] = self.name
        self.name = name

    def carried(self) -> _IdMap:
        """A copy for the next window's table: what the ids mean stays, a refusal by the
        cardinality guard does not (the next window counts its keys afresh)."""
        copy = _IdMap()
        copy.slot = self.slot.copy()
        copy.slot[copy.slot == _REFUSED] = _UNKNOWN
        copy.name = self.name.copy()
        return copy

    def learn(
        self, ids: npt.NDArray[np.int64], names: npt.NDArray[np.str_], slots: list[int]
    ) -> None:
        if names.dtype.itemsize > self.name.dtype.itemsize:
            self.name = self.name.astype(names.dtype)
        self.name[ids] = names
        self.slot[ids] = slots


class _StatsTable:
    """Everything a window knows, one row (slot) per key, as parallel numpy arrays, so that
    a fold updates every class of a batch in a few vectorised operations.

    The kept sample of a slot is either a :class:`Sample` (merged in from elsewhere) or a
    reference into the batch it came from (``win_ref`` + ``win_row``), turned into a
    ``Sample`` only when read: the video loop never builds one.
    """

    __slots__ = (
        "best",
        "count",
        "dropped",
        "carried",
        "hist",
        "id_maps",
        "keys",
        "live",
        "maximum",
        "minimum",
        "nlive",
        "rejected",
        "slots",
        "total",
        "win_ref",
        "win_row",
        "win_seen",
        "win_seq",
    )

    def __init__(self, capacity: int = 32) -> None:
        #: The layout: each key's slot. It may be carried from the previous window's table
        #: (:meth:`successor`), so a slot is not necessarily a key of *this* window: ``live``
        #: says which are (a row folded into it, or a sample merged in).
        self.slots: dict[Key, int] = {}
        self.keys: list[Key] = []
        self.live = np.zeros(capacity, dtype=bool)
        self.nlive = 0
        #: Slots carried from the previous table (they widen the layout's bound, not the
        #: window's: the cardinality guard counts live keys).
        self.carried = 0
        self.count = np.zeros(capacity, dtype=np.int64)
        self.total = np.zeros(capacity, dtype=np.float64)
        self.minimum = np.full(capacity, np.inf)
        self.maximum = np.full(capacity, -np.inf)
        self.hist = np.zeros((capacity, HISTOGRAM_BUCKETS), dtype=np.int64)
        #: Confidence of the sample kept for the key.
        self.best = np.full(capacity, -np.inf)
        self.win_ref = np.full(capacity, None, dtype=object)
        self.win_row = np.zeros(capacity, dtype=np.int64)
        self.win_seen = np.zeros(capacity, dtype=np.float64)
        self.win_seq = np.zeros(capacity, dtype=np.int64)
        self.id_maps: dict[tuple[str, str], _IdMap] = {}
        #: Predictions refused: non-finite confidence; key over the cardinality guard.
        self.rejected = 0
        self.dropped = 0

    def successor(self, max_classes: int) -> _StatsTable:
        """An empty table for the next window, keeping this one's layout (keys, slots, what
        the class ids mean) when it is worth it: a stream does not learn its classes again
        every window. A layout mostly unused in this window (churning names) or over the
        guard is not carried."""
        if not self.nlive or 2 * self.nlive < len(self.keys) or len(self.keys) > max_classes:
            return _StatsTable()
        nxt = _StatsTable(self.count.shape[0])
        nxt.slots = dict(self.slots)
        nxt.keys = list(self.keys)
        nxt.carried = len(self.keys)
        nxt.id_maps = {stream: id_map.carried() for stream, id_map in self.id_maps.items()}
        return nxt

    def make_live(self, slot: int) -> None:
        self.live[slot] = True
        self.nlive += 1

    def live_items(self) -> list[tuple[Key, int]]:
        """``(key, slot)`` of this window's keys, in layout order."""
        if self.nlive == len(self.keys):
            return list(self.slots.items())
        live = self.live
        return [(key, slot) for key, slot in self.slots.items() if live[slot]]

    def new_slot(self, key: Key) -> int:
        slot = len(self.keys)
        if slot >= self.count.shape[0]:
            self._grow()
        self.slots[key] = slot
        self.keys.append(key)
        return slot

    def _grow(self) -> None:
        extra = self.count.shape[0]
        self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
        self.live = np.concatenate([self.live, np.zeros(extra, dtype=bool)])
        self.total = np.concatenate([self.total, np.zeros(extra)])
        self.minimum = np.concatenate([self.minimum, np.full(extra, np.inf)])
        self.maximum = np.concatenate([self.maximum, np.full(extra, -np.inf)])
        self.hist = np.concatenate([self.hist, np.zeros((extra, HISTOGRAM_BUCKETS), np.int64)])
        self.best = np.concatenate([self.best, np.full(extra, -np.inf)])
        self.win_ref = np.concatenate([self.win_ref, np.full(extra, None, dtype=object)])
        self.win_row = np.concatenate([self.win_row, np.zeros(extra, dtype=np.int64)])
        self.win_seen = np.concatenate([self.win_seen, np.zeros(extra)])
        self.win_seq = np.concatenate([self.win_seq, np.zeros(extra, dtype=np.int64)])

    def sample(self, slot: int) -> Sample:
        ref = self.win_ref[slot]
        if isinstance(ref, Sample):
            return ref
        row = int(self.win_row[slot])
        model_id, class_name, source_id = self.keys[slot]
        sample = Sample(
            class_name=class_name,
            confidence=float(self.best[slot]),
            inference_id=str(ref.inference_ids[row]),
            model_type=str(ref.model_types[row]),
            model_id=model_id,
            source_id=source_id,
            seen_at=float(self.win_seen[slot]),
            seq=int(self.win_seq[slot]),
        )
        self.win_ref[slot] = sample  # built once; the batch it came from can go
        return sample

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

    ``add`` is cheap: it copies the frame's confidence, class-id and class-name columns
    into its stream's preallocated buffers; every :data:`FOLD_THRESHOLD` predictions the
    buffers are folded with numpy, and that fold is spread over the following ``add``
    calls (one or two whole-column operations on at most 1,024 rows each), so no single
    call pays for it. Reading (``samples``, ``to_results``, ``merge``) finishes any fold first.
    Thread-safe.

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
        #: ``None`` right after :meth:`drain` until the taken window hands its layout on
        #: (:meth:`_adopt`) or this window needs a table first (:meth:`_tab`).
        self._table: _StatsTable | None = _StatsTable()
        #: Each stream's frames since the last fold began, as columns.
        self._pending: dict[_Stream, _Columns] = {}
        self._buffered = 0
        #: The fold under way (one step per ``add``), or ``None``, and the buffers it reads.
        self._folding: Iterator[None] | None = None
        self._folded: dict[_Stream, _Columns] = {}
        #: Steps the fold under way is expected to take still (an estimate: it paces it).
        self._steps_left = 0
        #: Buffers of the last finished fold, emptied, reused by the next frames.
        self._spare: dict[_Stream, _Columns] = {}
        #: Rows and name width of the last buffer folded or taken (a new buffer's size).
        self._shape = (min(FOLD_THRESHOLD, _FIRST_ROWS), 1)
        #: Windows taken in by :meth:`absorb`, merged by the next read.
        self._absorbed: list[Window] = []
        self._lock = threading.Lock()
        #: Bumped by every :meth:`drain`: a layout handed on for an older drain is ignored.
        self._drains = 0
        #: ``(window that drained this one, its drain number)``: who gets this window's
        #: layout once it is read (built off the video loop, by the reader).
        self._heir: tuple[Window, int] | None = None
        #: The layout built for the heir, delivered outside this window's lock.
        self._offer: _StatsTable | None = None

    def _tab(self) -> _StatsTable:
        """The table, built empty if :meth:`drain` left none and no layout came (caller
        holds the lock)."""
        table = self._table
        if table is None:
            table = self._table = _StatsTable()
        return table

    def _adopt(self, table: _StatsTable, drains: int) -> None:
        """Take the layout a window taken by :meth:`drain` handed on, unless this window
        needed a table of its own meanwhile or was drained again."""
        with self._lock:
            if self._table is None and self._drains == drains:
                self._table = table

    def _deliver(self) -> None:
        """Hand a layout built under the lock on to the heir (outside the lock: two
        windows' locks are never held together)."""
        if self._offer is None:
            return
        with self._lock:
            offer, self._offer = self._offer, None
            heir = self._heir
            self._heir = None
        if offer is not None and heir is not None:
            heir[0]._adopt(offer, heir[1])

    @property
    def rejected_nonfinite(self) -> int:
        """Predictions refused because their confidence was not a number within [0, 1] (NaN,
        infinite or out of range; folded so far). The name is historical."""
        with self._lock:
            return self._tab().rejected

    @rejected_nonfinite.setter
    def rejected_nonfinite(self, value: int) -> None:
        with self._lock:
            self._tab().rejected = value

    @property
    def dropped_max_classes(self) -> int:
        """Predictions refused because the window already held ``max_classes`` keys."""
        with self._lock:
            return self._tab().dropped

    @dropped_max_classes.setter
    def dropped_max_classes(self, value: int) -> None:
        with self._lock:
            self._tab().dropped = value

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
        if batch is None:
            return 0
        size: int = batch.confidences.shape[0]
        if not size:
            return 0
        stream = (model_id, source_id)
        with self._lock:
            columns = self._pending.get(stream)
            if columns is None:
                columns = self._pending[stream] = self._new_columns(stream)
            columns.append(batch, seen_at, next(_arrivals))
            self._buffered += size
            folding = self._folding
            if folding is not None:
                if self._buffered >= 4 * FOLD_THRESHOLD:  # a safety net, not a schedule
                    for _ in folding:
                        pass
                    self._fold_done()
                    folding = None
                else:
                    # The fold's steps spread evenly over the calls left before the next
                    # fold is due (or, once it is due, before the buffer runs 4x ahead):
                    # one step per call for small frames, more for frames of thousands.
                    due_in = FOLD_THRESHOLD - self._buffered
                    if due_in <= 0:
                        due_in = 4 * FOLD_THRESHOLD - self._buffered
                    calls_left = max(1, due_in // size)
                    for _ in range(max(1, -(-self._steps_left // calls_left))):
                        self._steps_left -= 1
                        if _step(folding):
                            self._fold_done()
                            folding = None
                            break
            if folding is None and self._buffered >= FOLD_THRESHOLD:
                pending, self._pending, self._buffered = self._pending, {}, 0
                self._folding = _fold_steps(self._tab(), pending, self.max_classes)
                self._folded = pending
                self._steps_left = sum(_steps_for(c.size) for c in pending.values())
        return size

    def _new_columns(self, stream: _Stream) -> _Columns:
        """A buffer for ``stream``: the last fold's, emptied, or a new one as large as the
        last (caller holds the lock)."""
        columns = self._spare.pop(stream, None)
        if columns is None:
            rows, width = self._shape
            columns = _Columns(rows + rows // 4, width)
        return columns

    def _fold_done(self) -> None:
        """The fold under way has finished: its buffers are emptied for reuse (caller
        holds the lock)."""
        self._folding = None
        spare: dict[_Stream, _Columns] = {}
        for stream, columns in self._folded.items():
            self._shape = (columns.size, columns.names.dtype.itemsize // 4)
            kept = columns.emptied()
            if kept is not None:
                spare[stream] = kept
        self._folded = {}
        self._spare = spare

    def merge_in(self, other: Window) -> None:
        """Merge ``other`` into this window (max per key, statistics summed)."""
        if other is self:
            return
        best, stats, rejected, dropped = other.snapshot()
        with self._lock:
            self._fold()
            self._merge_entries(best, stats)
            table = self._tab()
            table.rejected += rejected
            table.dropped += dropped
        self._deliver()

    def absorb(self, other: Window) -> None:
        """Take ``other`` in, to be merged by the next read of this window (or by whoever
        reads the window :meth:`drain` takes): constant time under the lock, so the thread
        that calls it (the sender giving a failed window back to the live window) does not
        fold the live window while the video loop waits for its lock. Beyond
        :data:`MAX_ABSORBED` windows they are merged at once (bounded memory: an unmerged
        window keeps its buffered frames' columns).

        Example:
            >>> from mmagg.predictions import to_batch
            >>> a, b = Window(), Window()
            >>> batch = to_batch({"predictions": [{"class": "x", "confidence": 0.6}]})
            >>> _ = b.add(batch, model_id="m")
            >>> a.absorb(b)
            >>> a.is_empty(), len(a)
            (False, 1)
        """
        if other is self:
            return
        with other._lock:
            # Read under this window's lock later: it must not hand a layout on from there
            # (two windows' locks are never held together).
            other._heir = None
            other._offer = None
        with self._lock:
            self._absorbed.append(other)
            if len(self._absorbed) > MAX_ABSORBED:
                self._fold()
        self._deliver()

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
        self._deliver()

    def _merge_entries(self, best: Mapping[Key, Sample], stats: Mapping[Key, ClassStats]) -> None:
        table = self._tab()
        live = table.live
        for key, sample in best.items():
            slot_or_none = table.slots.get(key)
            if slot_or_none is None or not live[slot_or_none]:
                if table.nlive >= self.max_classes:
                    table.dropped += stats[key].count if key in stats else 1
                    continue
                slot = table.new_slot(key) if slot_or_none is None else slot_or_none
                table.make_live(slot)
                live = table.live  # new_slot may have grown the arrays
            elif sample.rank() < table.sample(slot_or_none).rank():
                slot = slot_or_none
            else:
                continue
            table.win_ref[slot] = sample
            table.best[slot] = sample.confidence
        for key, item in stats.items():
            slot_or_none = table.slots.get(key)
            if slot_or_none is not None and live[slot_or_none]:
                table.merge_stats(slot_or_none, item)

    def drain(self) -> Window:
        """Move everything collected so far into a new window and leave this one empty.

        The object stays the same, so a caller holding it never adds to a taken window. A
        fold under way moves with what it folds (it finishes when the taken window is read).

        Example:
            >>> from mmagg.predictions import to_batch
            >>> w = Window()
            >>> batch = to_batch({"predictions": [{"class": "x", "confidence": 0.5}]})
            >>> _ = w.add(batch, model_id="m")
            >>> taken = w.drain()
            >>> len(taken), len(w)
            (1, 0)
        """
        # Constant time, no table built: the report call on the video loop only swaps. The
        # taken window hands the next layout (keys, slots, class-id maps) to this one when
        # it is first read, on the reader's thread (the sender); if this window needs a
        # table before that, it starts an empty one (the result is the same either way).
        out = Window.__new__(Window)
        out.max_classes = self.max_classes
        out._lock = threading.Lock()
        out._offer = None
        out._drains = 0
        with self._lock:
            out._table, self._table = self._table, None
            out._pending, self._pending = self._pending, {}
            out._buffered, self._buffered = self._buffered, 0
            out._folding, self._folding = self._folding, None
            out._folded, self._folded = self._folded, {}
            out._steps_left, self._steps_left = self._steps_left, 0
            # The emptied buffers stay (the next frames reuse them); the taken window's
            # buffers go with it.
            out._spare = {}
            out._shape = self._shape
            for columns in out._pending.values():  # the next buffer: as large as this one
                self._shape = (columns.size, columns.names.dtype.itemsize // 4)
            out._absorbed, self._absorbed = self._absorbed, []
            self._drains += 1
            out._heir = (self, self._drains)
        return out

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[Key, Sample], dict[Key, ClassStats], int, int]:
        """Copies of ``(best, stats, rejected_nonfinite, dropped_max_classes)``."""
        with self._lock:
            self._fold()
            table = self._tab()
            items = table.live_items()
            result = (
                {key: table.sample(slot) for key, slot in items},
                {key: table.stats(slot) for key, slot in items},
                table.rejected,
                table.dropped,
            )
        self._deliver()
        return result

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
            n = self._tab().nlive
        self._deliver()
        return n

    def is_empty(self) -> bool:
        with self._lock:
            return (
                not self._buffered
                and self._folding is None
                and (self._table is None or not self._table.nlive)
                and all(other.is_empty() for other in self._absorbed)
            )

    def keys(self) -> Iterator[Key]:
        return iter(self.snapshot()[0])

    # -- folding -----------------------------------------------------------------------------

    def _fold(self) -> None:
        """Finish the fold under way and fold what is buffered (caller holds the lock)."""
        if self._folding is not None:
            for _ in self._folding:
                pass
            self._folding = None
        if self._pending:
            pending, self._pending, self._buffered = self._pending, {}, 0
            for _ in _fold_steps(self._tab(), pending, self.max_classes):
                pass
        # A read keeps no buffer for reuse: a window that is read (a taken one, a failed
        # one given back) holds only its table; the live window's next frames (if any)
        # start a buffer sized by what its last one held.
        self._folded = {}
        self._spare = {}
        while self._absorbed:
            best, stats, rejected, dropped = self._absorbed.pop(0).snapshot()
            self._merge_entries(best, stats)
            table = self._tab()
            table.rejected += rejected
            table.dropped += dropped
        heir = self._heir
        if heir is not None and heir[0]._drains != heir[1]:
            self._heir = heir = None  # drained again since: it wants a newer layout
        if heir is not None and self._offer is None and self._table is not None:
            # Everything is folded: the layout of the next window, built here (off the
            # video loop), delivered by ``_deliver`` once the lock is released.
            self._offer = self._table.successor(self.max_classes)


_DONE = object()
#: New class ids learned per fold step.
_LEARN_PER_STEP = 8
#: Winners handled one by one (cheaper than a vectorised pass when there are few).
_FEW_WINNERS = 32
#: "No row yet" in a per-slot minimum of row indexes.
_NO_ROW = np.iinfo(np.intp).max


def _steps_for(rows: int) -> int:
    """About how many steps a fold of one stream's ``rows`` takes (steady state: a few
    fixed ones, eight per :data:`_ROWS_PER_STEP` rows)."""
    return 9 + 8 * -(-rows // _ROWS_PER_STEP)


def _step(folding: Iterator[None]) -> bool:
    """Run one step of a fold; ``True`` when it is finished."""
    return next(folding, _DONE) is _DONE


def _fold_steps(
    table: _StatsTable, pending: dict[_Stream, _Columns], max_classes: int
) -> Iterator[None]:
    """Fold buffered frames into ``table`` in small vectorised steps, yielding between them.

    All steps of one fold run, in order, before the next fold starts: that is what keeps
    "first seen wins ties" exact whatever the interleaving with ``add``. Each stream's
    rows are read from its column buffer as they are (no concatenation); every step does
    one or two whole-column operations, and the name check (the heaviest) works on at most
    :data:`_ROWS_PER_STEP` rows per step, so no step costs much more than another.
    """
    for (model_id, source_id), columns in pending.items():
        n = columns.size
        conf = columns.conf[:n]
        where: npt.NDArray[np.intp] | None = None
        # A confidence is a probability: NaN, inf and anything outside [0, 1] are refused
        # here, one prediction at a time (the backend would refuse the whole report).
        # Two reductions in the common case (NaN fails both comparisons).
        if not (conf.min() >= CONFIDENCE_MIN and conf.max() <= CONFIDENCE_MAX):
            valid = conf >= CONFIDENCE_MIN
            valid &= conf <= CONFIDENCE_MAX
            table.rejected += int(conf.size - np.count_nonzero(valid))
            where = np.flatnonzero(valid)
            del valid
            conf = conf[where]
            if conf.size == 0:
                continue
        id_map = table.id_maps.get((model_id, source_id))
        if id_map is None:
            id_map = table.id_maps[(model_id, source_id)] = _IdMap()
        names = columns.names[:n] if where is None else columns.names[where]
        rows = None
        if id_map.trusted and columns.has_ids:
            ids = columns.ids[:n] if where is None else columns.ids[where]
            yield
            rows = yield from _slots_by_id(id_map, ids)
            if rows is not None:
                yield
                if rows.min() < 0 and (rows == _UNKNOWN).any():
                    yield
                    rows = yield from _learn(
                        table, id_map, model_id, source_id, ids, names, rows, max_classes
                    )
                # Every row's name against the name its id was first seen with.
                if not (yield from _check_in_parts(id_map, ids, names)):
                    id_map.trusted = False  # names decide from now on, for this table
                    rows = None
            del ids
        if rows is None:
            yield
            rows = _rows_by_name(table, model_id, source_id, names, max_classes)
        del names
        if table.nlive < len(table.keys):  # slots not (yet) this window's keys
            yield
            rows = yield from _admit(table, rows, max_classes)
        if rows.min() < 0:  # keys refused by the cardinality guard
            keep = np.flatnonzero(rows >= 0)
            table.dropped += int(rows.size - keep.size)
            if keep.size == 0:
                continue
            rows, conf = rows[keep], conf[keep]
            where = keep if where is None else where[keep]
        k = len(table.keys)
        top = np.full(k, -np.inf)  # this fold's maximum per slot
        for start in range(0, rows.shape[0], _ROWS_PER_STEP):
            part = slice(start, start + _ROWS_PER_STEP)
            part_rows, part_conf = rows[part], conf[part]
            yield
            cells = part_conf * HISTOGRAM_BUCKETS
            np.minimum(cells, HISTOGRAM_BUCKETS - 1, out=cells)  # conf >= 0 here
            cells = cells.astype(np.intp)
            cells += part_rows * HISTOGRAM_BUCKETS
            yield
            hist = np.bincount(cells, minlength=k * HISTOGRAM_BUCKETS).reshape(k, HISTOGRAM_BUCKETS)
            del cells
            table.hist[:k] += hist
            table.count[:k] += hist.sum(axis=1)
            del hist
            yield
            table.total[:k] += np.bincount(part_rows, weights=part_conf, minlength=k)
            np.minimum.at(table.minimum, part_rows, part_conf)
            yield
            np.maximum.at(top, part_rows, part_conf)
        yield
        np.maximum(table.maximum[:k], top, out=table.maximum[:k])
        # Only a slot whose maximum here is strictly above what is kept gets a new sample:
        # the first row (in arrival order) at that maximum; what is kept arrived first.
        improved = top > table.best[:k]
        if improved.any():
            # NaN at the slots not improved: no row equals it.
            target = np.where(improved, top, np.nan)
            at_top = np.empty(rows.shape[0], dtype=bool)
            for start in range(0, rows.shape[0], _ROWS_PER_STEP):
                yield
                part = slice(start, start + _ROWS_PER_STEP)
                np.equal(conf[part], np.take(target, rows[part]), out=at_top[part])
            candidates = np.flatnonzero(at_top)
            del at_top
            yield
            yield from _fold_best(table, rows, conf, where, candidates, columns)
        yield


def _slots_by_id(
    id_map: _IdMap, ids: npt.NDArray[np.int64]
) -> Generator[None, None, npt.NDArray[np.intp] | None]:
    """Each row's slot through the class-id map (an array index, no sorting; unknown ids
    are ``_UNKNOWN``), :data:`_ROWS_PER_STEP` rows per step; ``None`` when the ids cannot
    serve as indexes."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= _MAX_DIRECT_ID:
        return None
    id_map.reserve(high + 1)
    rows = np.empty(ids.shape[0], dtype=np.intp)
    for start in range(0, ids.shape[0], _ROWS_PER_STEP):
        if start:
            yield
        part = slice(start, start + _ROWS_PER_STEP)
        np.take(id_map.slot, ids[part], out=rows[part])
    return rows


def _learn(
    table: _StatsTable,
    id_map: _IdMap,
    model_id: str,
    source_id: str,
    ids: npt.NDArray[np.int64],
    names: npt.NDArray[np.str_],
    rows: npt.NDArray[np.intp],
    max_classes: int,
) -> Generator[None, None, npt.NDArray[np.intp]]:
    """Learn the ids not seen yet (their slots and names) and give every row's slot."""
    # One row per new id (any row: the name check reads them all), without sorting,
    # :data:`_ROWS_PER_STEP` rows per step (a stream's first fold has every row unknown).
    row_of = np.full(id_map.slot.shape[0], -1, dtype=np.intp)
    for start in range(0, rows.shape[0], _ROWS_PER_STEP):
        yield
        part = slice(start, start + _ROWS_PER_STEP)
        unknown = np.flatnonzero(rows[part] == _UNKNOWN)
        row_of[ids[part][unknown]] = unknown + start
    yield
    new_ids = np.flatnonzero(row_of >= 0)
    new_names = names[row_of[new_ids]]
    name_list = new_names.tolist()
    for start in range(0, len(name_list), _LEARN_PER_STEP):
        yield
        part = slice(start, start + _LEARN_PER_STEP)
        slots = [
            _key_slot(table, (model_id, name, source_id), max_classes) for name in name_list[part]
        ]
        id_map.learn(new_ids[part], new_names[part], slots)
    yield
    learned: npt.NDArray[np.intp] = id_map.slot[ids]
    return learned


def _names_agree(id_map: _IdMap, ids: npt.NDArray[np.int64], names: npt.NDArray[np.str_]) -> bool:
    """Whether every row's name is the name its id was first seen with.

    Compared as the strings' code points (``uint32``, one row of them per name) at one
    width: four times cheaper than numpy's string comparison, and exactly as equal
    (numpy strings are NUL-padded, so trailing NULs never count either way).
    """
    width = max(names.dtype.itemsize, id_map.name.dtype.itemsize) // 4
    if width == 0:  # every name on both sides is ""
        return True
    dtype = np.dtype(f"<U{width}")
    if id_map.name.dtype != dtype:
        id_map.name = id_map.name.astype(dtype)  # widened once, kept wide
    if names.dtype != dtype or not names.flags.c_contiguous:
        names = np.ascontiguousarray(names, dtype=dtype)
    # Eight bytes at a time when the width allows (half the elements to take and compare).
    unit, per_row = (np.uint64, width // 2) if width % 2 == 0 else (np.uint32, width)
    got = names.view(unit).reshape(-1, per_row)
    expected = np.take(id_map.name.view(unit).reshape(-1, per_row), ids, axis=0)
    # Same shapes by construction (one id per name): no np.array_equal checks needed.
    return bool((got == expected).all())


def _check_in_parts(
    id_map: _IdMap, ids: npt.NDArray[np.int64], names: npt.NDArray[np.str_]
) -> Generator[None, None, bool]:
    """:func:`_names_agree` over :data:`_CHECK_ROWS_PER_STEP` rows per step."""
    for start in range(0, ids.shape[0], _CHECK_ROWS_PER_STEP):
        yield
        end = start + _CHECK_ROWS_PER_STEP
        if not _names_agree(id_map, ids[start:end], names[start:end]):
            return False
    return True


def _key_slot(table: _StatsTable, key: Key, max_classes: int) -> int:
    slot = table.slots.get(key)
    if slot is None:
        # The layout holds at most the carried slots plus this window's new keys.
        if len(table.slots) >= max_classes + table.carried:
            return _REFUSED
        slot = table.new_slot(key)
    return slot


def _admit(
    table: _StatsTable, rows: npt.NDArray[np.intp], max_classes: int
) -> Generator[None, None, npt.NDArray[np.intp]]:
    """Make the slots of ``rows`` this window's keys, as far as the cardinality guard lets
    (lowest slots first); rows of refused slots become ``_REFUSED``. Two steps: the slots
    seen, then the ones not live yet."""
    mark = np.zeros(len(table.keys), dtype=bool)  # sorted and unique, without sorting
    mark[rows if rows.min() >= 0 else rows[rows >= 0]] = True
    yield
    mark &= ~table.live[: mark.shape[0]]
    slots = np.flatnonzero(mark)
    if not slots.size:
        return rows
    room = max(0, max_classes - table.nlive)
    if slots.size > room:
        refused = slots[room:]
        slots = slots[:room]
        rows = np.where(np.isin(rows, refused), _REFUSED, rows)
    table.live[slots] = True
    table.nlive += int(slots.size)
    return rows


def _rows_by_name(
    table: _StatsTable,
    model_id: str,
    source_id: str,
    names: npt.NDArray[np.str_],
    max_classes: int,
) -> npt.NDArray[np.intp]:
    unique, inverse = np.unique(names, return_inverse=True)
    slots = np.fromiter(
        (_key_slot(table, (model_id, name, source_id), max_classes) for name in unique.tolist()),
        dtype=np.int64,
        count=unique.size,
    )
    rows: npt.NDArray[np.intp] = slots[inverse.reshape(-1)]
    return rows


def _fold_best(
    table: _StatsTable,
    rows: npt.NDArray[np.intp],
    conf: npt.NDArray[np.float64],
    where: npt.NDArray[np.intp] | None,
    candidates: npt.NDArray[np.intp],
    columns: _Columns,
) -> Iterator[None]:
    """Keep, per slot, the first of ``candidates`` (row indexes in arrival order, each at
    its slot's new maximum) as the slot's sample."""
    # The first candidate per slot: a minimum per slot over the row indexes, no sorting.
    first = np.full(len(table.keys), _NO_ROW, dtype=np.intp)
    np.minimum.at(first, rows[candidates], candidates)
    winners = np.flatnonzero(first != _NO_ROW)
    position = first[winners]
    table.best[winners] = conf[position]
    if where is not None:
        position = where[position]
    starts, frames = columns.starts, columns.frames
    if winners.size <= _FEW_WINNERS:
        yield
        # Each winner's frame by bisection, then one vectorised assignment per column
        # (four numpy item assignments per winner were the heaviest fold step).
        at = [bisect.bisect_right(starts, index) - 1 for index in position.tolist()]
        found = [frames[f] for f in at]
        refs = np.empty(len(found), dtype=object)
        for i, frame in enumerate(found):
            refs[i] = frame[0]
        table.win_ref[winners] = refs
        table.win_row[winners] = position - np.asarray([starts[f] for f in at], dtype=np.intp)
        table.win_seen[winners] = [frame[1] for frame in found]
        table.win_seq[winners] = [frame[2] for frame in found]
        return
    yield
    start_of = np.asarray(starts, dtype=np.intp)
    frame_of = np.searchsorted(start_of, position, side="right") - 1
    table.win_row[winners] = position - start_of[frame_of]
    yield
    seen = np.fromiter((frame[1] for frame in frames), dtype=np.float64, count=len(frames))
    seq = np.fromiter((frame[2] for frame in frames), dtype=np.int64, count=len(frames))
    refs = np.empty(len(frames), dtype=object)
    for i, frame in enumerate(frames):
        refs[i] = frame[0]
    table.win_seen[winners] = seen[frame_of]
    table.win_seq[winners] = seq[frame_of]
    table.win_ref[winners] = refs[frame_of]


#: Rows one fold step reads with each whole-column operation (a fold of
#: :data:`FOLD_THRESHOLD` rows does each in four steps).
_ROWS_PER_STEP = 1024
#: Rows whose names one fold step checks (the heaviest per-row operation).
_CHECK_ROWS_PER_STEP = 512


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
