"""The exact median of `inference-stats` from median digests built off the ingest path.

A *digest* describes the sampled confidences of one (workspace, model, class) in one hour or
one UTC day: how many there are (`n`), how many fall in each of `BANDS` bands of width 0.001
over [0, 1] (`bands_of`), and the values themselves, sorted, a chunk of consecutive bands per
row (`median_values`). Nothing is written at ingest: a background job
(`build`, run by `mmagg serve` under the "median-digests" lease and callable as
`Database.build_median_digests`) builds the hour digests from raw rows and merges 24 of them
into a day digest.

**Validity without touching ingest.** Results are append-only except for retention, so a
digest still describes its bucket exactly when its `n` equals the number of results the
rollups count there (`rollups` level 3600 / 86400, `results` summed over the device and source
keys) and the bucket ends by `rollups.complete_before`. A late report makes the counts differ:
that bucket is read from raw rows until the job rebuilds it. Retention deletes the digests of
every bucket that starts before its bound, in the same transactions as the rows
(`delete_before`); on PostgreSQL the job's transactions and the prune batches take one
advisory lock, so a digest is never built from rows a concurrent batch is deleting.

**Read** over [start, end) (`medians`): whole days from day digests, whole hours of the edge
days from hour digests, the partial hours and every bucket without a valid digest from raw
rows. Phase 1 adds the band counts (and the raw values, binned the same way) to find the
band and the rank in it of the middle value(s); phase 2 reads only those bands' chunks,
merges them with the raw values there and picks. The result is the float the engine's raw
median gives: `percentile_cont(0.5)` on PostgreSQL (a + (b - a) * 0.5 for the two middle
values), the `mmagg_median` aggregate on SQLite ((a + b) / 2).

Example:
    >>> bands_of(np.array([-0.5, 0.0, 0.0009, 0.001, 0.5, 0.9999, 1.0, 3.0])).tolist()
    [0, 0, 0, 1, 500, 999, 999, 999]
    >>> pick(0.25, 0.75, "postgresql"), pick(0.25, 0.75, "sqlite")
    (0.5, 0.5)
"""

from __future__ import annotations

import math
import operator
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmagg.server import rollups
from mmagg.server.tables import MEDIAN_FUNCTION, median_digests, median_values, results
from mmagg.server.tables import rollups as rollup_table

if TYPE_CHECKING:
    from mmagg.server.db import Database

BANDS = 1000
HOUR = 3600
DAY = 86400
#: Coarse to fine, the levels digests exist at (both are rollup levels too).
LEVELS = (DAY, HOUR)
#: Consecutive bands per value chunk. An hour of one (model, class) holds ~10^3 values in a
#: fleet: one row per band would be a row per value or two; a day holds 24x more, so finer
#: chunks keep the phase-2 read small.
CHUNK_BANDS = {HOUR: 100, DAY: 10}
#: Bands per block when raw rows are counted in SQL (`_by_totals`): a fleet's edge hours
#: (~10^4 rows) come back as a few dozen counts per group, then only the values of the
#: blocks holding the middle. ~sqrt(rows per group x bands) keeps both reads small.
RAW_BLOCK = 25
RAW_BLOCKS = BANDS // RAW_BLOCK
#: Hours are built once they ended this long ago (reports in flight are mostly in by then;
#: one that is not only makes the digest stale until the next pass).
GRACE_SECONDS = 120.0
#: Results a build transaction reads at most, unless one hour holds more (the raw rows are read
#: inside the transaction, so that no prune batch or late report slips between the read and
#: the write; SQLite's one write lock is shared with ingest: ~0.2 s per transaction here).
TRANSACTION_RESULTS = 20_000
#: Results one build pass reads at most; a catch-up continues in the next pass.
PASS_RESULTS = 1_000_000
#: Reads use raw rows only when False (benchmarks/read.py --no-digests).
ENABLED = True
#: The advisory lock (PostgreSQL) the job's transactions and the prune batches share.
LOCK_KEY = 0x6D6D6D6564  # "mmmed"


def bands_of(values: np.ndarray) -> np.ndarray:
    """The band of each confidence: min(floor(c * 1000), 999), values below 0 in band 0.

    The one definition every digest and every read uses. It is monotone, so sorted values
    have sorted bands.
    """
    scaled = np.floor(np.asarray(values, dtype=np.float64) * BANDS)
    return np.clip(scaled, 0, BANDS - 1).astype(np.int64)


def band_counts(values: np.ndarray) -> np.ndarray:
    """How many of `values` fall in each band (int64, length `BANDS`)."""
    return np.bincount(bands_of(values), minlength=BANDS).astype(np.int64)


def encode_counts(counts: np.ndarray) -> bytes:
    """A digest's band counts as stored: zlib of little-endian uint32."""
    return zlib.compress(np.asarray(counts, dtype="<u4").tobytes(), 1)


def decode_counts(blob: bytes) -> np.ndarray:
    """The inverse of `encode_counts`, as int64."""
    return np.frombuffer(zlib.decompress(bytes(blob)), dtype="<u4").astype(np.int64)


def encode_values(values: np.ndarray) -> bytes:
    """Sorted values as stored: little-endian float64."""
    return np.asarray(values, dtype="<f8").tobytes()


def decode_values(blob: bytes) -> np.ndarray:
    """The inverse of `encode_values`."""
    return np.frombuffer(bytes(blob), dtype="<f8")


def pick(low: float, high: float, dialect: str) -> float:
    """The median of an even count from its two middle values, as the engine computes it."""
    if dialect == "postgresql":
        return low + (high - low) * 0.5  # percentile_cont's interpolation
    return (low + high) / 2  # tables._Median


def conn_dialect(dialect: str) -> str:
    """The median formula a dialect's raw read uses: PostgreSQL's, else SQLite's."""
    return "postgresql" if dialect == "postgresql" else "sqlite"


def raw_median_column(conn: Connection) -> sa.ColumnElement[Any]:
    """The engine's exact median of `results.confidence` as an aggregate."""
    if conn.dialect.name == "postgresql":
        return sa.func.percentile_cont(0.5).within_group(results.c.confidence)
    return sa.Function(MEDIAN_FUNCTION, results.c.confidence)


Group = tuple[str, str]


def raw_medians(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    model_ids: Sequence[str] = (),
    group: Group | None = None,
) -> dict[Group, float | None]:
    """Per (model, class), the median over raw rows in [start, end), by the engine itself."""
    where = [
        results.c.workspace_id == workspace_id,
        results.c.ts >= start,
        results.c.ts < end,
        results.c.confidence.is_not(None),
    ]
    if model_ids:
        where.append(results.c.model_id.in_(list(model_ids)))
    if group is not None:
        where += [results.c.model_id == group[0], results.c.class_name == group[1]]
    rows = conn.execute(
        sa.select(results.c.model_id, results.c.class_name, raw_median_column(conn))
        .where(*where)
        .group_by(results.c.model_id, results.c.class_name)
    )
    return {
        (model_id, class_name): None if middle is None else float(middle)
        for model_id, class_name, middle in rows
    }


# ---------------------------------------------------------------------------------- reads


@dataclass
class _Digest:
    id: int
    level: int
    counts: np.ndarray


@dataclass
class _Parts:
    """What one group's median is made of: valid digests and raw values."""

    digests: list[_Digest] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)
    #: Counts of raw rows not in `raw`, per band (`_by_totals`: counted per block in SQL,
    #: each block's count in its first band; never a block the middle values lie in).
    raw_counts: np.ndarray | None = None


def _expected(
    conn: Connection,
    workspace_id: int,
    level: int,
    start: float,
    end: float,
    model_ids: Sequence[str],
) -> dict[tuple[float, str, str], int]:
    """(bucket, model, class) -> results the rollups count there, buckets in [start, end)."""
    r = rollup_table.c
    where = [r.workspace_id == workspace_id, r.level == level, r.bucket >= start, r.bucket < end]
    if model_ids:
        where.append(r.model_id.in_(list(model_ids)))
    rows = conn.execute(
        sa.select(r.bucket, r.model_id, r.class_name, sa.func.sum(r.results))
        .where(*where)
        .group_by(r.bucket, r.model_id, r.class_name)
    )
    return {(float(b), m, c): int(n) for b, m, c, n in rows}


def _digests(
    conn: Connection,
    workspace_id: int,
    level: int,
    start: float,
    end: float,
    model_ids: Sequence[str],
) -> dict[tuple[float, str, str], tuple[int, int, bytes]]:
    """(bucket, model, class) -> (id, n, counts blob) of the stored digests."""
    d = median_digests.c
    where = [d.workspace_id == workspace_id, d.level == level, d.bucket >= start, d.bucket < end]
    if model_ids:
        where.append(d.model_id.in_(list(model_ids)))
    rows = conn.execute(
        sa.select(d.bucket, d.model_id, d.class_name, d.id, d.n, d.counts).where(*where)
    )
    return {(float(b), m, c): (int(i), int(n), blob) for b, m, c, i, n, blob in rows}


def _raw_values(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    model_ids: Sequence[str],
    group: Group | None = None,
) -> dict[Group, np.ndarray]:
    where = [
        results.c.workspace_id == workspace_id,
        results.c.ts >= start,
        results.c.ts < end,
        results.c.confidence.is_not(None),
    ]
    if group is not None:
        where += [results.c.model_id == group[0], results.c.class_name == group[1]]
    elif model_ids:
        where.append(results.c.model_id.in_(list(model_ids)))
    found: dict[Group, list[float]] = defaultdict(list)
    rows = conn.execute(
        sa.select(results.c.model_id, results.c.class_name, results.c.confidence).where(*where)
    )
    for model_id, class_name, confidence in rows:
        found[(model_id, class_name)].append(confidence)
    return {key: np.array(values, dtype=np.float64) for key, values in found.items()}


def _ranges(buckets: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Adjacent [start, end) ranges joined."""
    joined: list[tuple[float, float]] = []
    for low, high in sorted(buckets):
        if joined and joined[-1][1] == low:
            joined[-1] = (joined[-1][0], high)
        else:
            joined.append((low, high))
    return joined


def _gaps(
    low: float, high: float, level: int, present: Iterable[float]
) -> list[tuple[float, float]]:
    """The runs of [low, high) that none of the buckets `present` (each `level` seconds
    long, inside the range) covers.

    Example:
        >>> _gaps(0.0, 10.0, 2, {2.0, 4.0, 8.0})
        [(0.0, 2.0), (6.0, 8.0)]
    """
    runs: list[tuple[float, float]] = []
    cursor = low
    for bucket in sorted(present):
        if bucket > cursor:
            runs.append((cursor, bucket))
        cursor = max(cursor, bucket + level)
    if cursor < high:
        runs.append((cursor, high))
    return runs


def medians(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    model_ids: Sequence[str] = (),
    totals: dict[Group, int] | None = None,
) -> dict[Group, float | None]:
    """Per (model, class), the exact median of the sampled confidences in [start, end),
    equal to `raw_medians` over the same rows (module docstring).

    `totals`, when given, are the results the rollups count per (model, class) in the same
    range, read on the same connection (`rollups.aggregate`, as `inference-stats` does
    anyway): the digests are then checked against them per group (`_by_totals`) instead of
    bucket by bucket against rollup rows read again; medians are answered for those groups.
    """
    if not ENABLED:
        return raw_medians(conn, workspace_id, start, end, model_ids)
    limit = rollups.complete_before(conn)
    if totals is None:
        return _checked(conn, workspace_id, start, end, model_ids, limit)
    answers, unsure = _by_totals(conn, workspace_id, start, end, model_ids, totals, limit)
    if unsure:
        # A stale or missing digest in the range: those groups bucket by bucket.
        models = sorted({model_id for model_id, _class_name in unsure})
        checked = _checked(conn, workspace_id, start, end, models, limit)
        answers.update({group: checked.get(group) for group in unsure})
    return answers


def _checked(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    model_ids: Sequence[str],
    limit: float,
) -> dict[Group, float | None]:
    """`medians` with every digest checked against its own bucket's rollup count; stale
    buckets are read from raw rows."""
    parts: dict[Group, _Parts] = defaultdict(_Parts)
    raw_ranges: list[tuple[float, float]] = []
    stale: dict[Group, list[tuple[float, float]]] = defaultdict(list)
    # (start, end, level, only these groups or None for all)
    pending: list[tuple[float, float, int, set[Group] | None]] = []
    for segment in rollups.split(start, end, LEVELS):
        if segment.level == 0:
            raw_ranges.append((segment.start, segment.end))
        else:
            pending.append((segment.start, segment.end, segment.level, None))
    valid_any = False
    while pending:
        low, high, level, only = pending.pop()
        expected = _expected(conn, workspace_id, level, low, high, model_ids)
        stored = _digests(conn, workspace_id, level, low, high, model_ids)
        finer: dict[float, set[Group]] = defaultdict(set)
        for (bucket, model_id, class_name), count in expected.items():
            group = (model_id, class_name)
            if only is not None and group not in only:
                continue
            digest = stored.get((bucket, model_id, class_name))
            if digest is not None and digest[1] == count and bucket + level <= limit:
                parts[group].digests.append(_Digest(digest[0], level, decode_counts(digest[2])))
                valid_any = True
            elif level == DAY:
                finer[bucket].add(group)
            else:
                stale[group].append((bucket, bucket + level))
        for bucket, groups in finer.items():
            pending.append((bucket, bucket + DAY, HOUR, groups))
    if not valid_any:
        # Nothing to gain from digests: one GROUP BY in the engine is the cheapest raw read.
        return raw_medians(conn, workspace_id, start, end, model_ids)
    for low, high in _ranges(raw_ranges):
        for group, values in _raw_values(conn, workspace_id, low, high, model_ids).items():
            parts[group].raw.append(values)
    for group, buckets in stale.items():
        for low, high in _ranges(buckets):
            found = _raw_values(conn, workspace_id, low, high, model_ids, group).get(group)
            if found is not None:
                parts[group].raw.append(found)
    return _finish(conn, workspace_id, start, end, parts)


def band_column(conn: Connection) -> sa.ColumnElement[Any]:
    """`bands_of` of `results.confidence` in SQL: the same band for every float on both
    engines (IEEE multiplication by 1,000, floor, clipped to [0, 999]; SQLite's CAST
    truncates towards zero, which is floor for the values it does not clip to 0)."""
    scaled = results.c.confidence * BANDS
    if conn.dialect.name == "postgresql":
        clipped = sa.func.least(sa.func.greatest(sa.func.floor(scaled), 0), BANDS - 1)
        return sa.cast(clipped, sa.Integer)
    return sa.func.min(sa.func.max(sa.cast(scaled, sa.Integer), 0), BANDS - 1)


def _raw_where(
    workspace_id: int, low: float, high: float, model_ids: Sequence[str]
) -> list[sa.ColumnElement[bool]]:
    where = [results.c.workspace_id == workspace_id, results.c.ts >= low, results.c.ts < high]
    if model_ids:
        where.append(results.c.model_id.in_(list(model_ids)))
    return where


def _raw_blocks(
    conn: Connection,
    workspace_id: int,
    ranges: Sequence[tuple[float, float]],
    model_ids: Sequence[str],
    window: set[int],
) -> tuple[dict[Group, np.ndarray], dict[tuple[Group, int], list[float]]]:
    """Per (model, class), how many raw rows in `ranges` fall in each block of `RAW_BLOCK`
    bands, and the values of those in the blocks of `window`, in one pass in the engine:
    a few dozen counts per group and the window's values come back, not every row."""
    counts: dict[Group, np.ndarray] = {}
    values: dict[tuple[Group, int], list[float]] = defaultdict(list)
    block = band_column(conn) // RAW_BLOCK
    # Rows in the window group by value (one row per distinct value, with its count);
    # the others by block only.
    value = (
        sa.case((block.in_(sorted(window)), results.c.confidence), else_=sa.null())
        if window
        else sa.null()
    )
    for low, high in ranges:
        rows = conn.execute(
            sa.select(results.c.model_id, results.c.class_name, block, value, sa.func.count())
            .where(*_raw_where(workspace_id, low, high, model_ids))
            .group_by(results.c.model_id, results.c.class_name, block, value)
        )
        for model_id, class_name, index, confidence, count in rows:
            group = (model_id, class_name)
            found = counts.get(group)
            if found is None:
                found = counts[group] = np.zeros(RAW_BLOCKS, dtype=np.int64)
            found[int(index)] += int(count)
            if confidence is not None:
                values[(group, int(index))] += [float(confidence)] * int(count)
    return counts, values


def _by_totals(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    model_ids: Sequence[str],
    totals: dict[Group, int],
    limit: float,
) -> tuple[dict[Group, float | None], set[Group]]:
    """`medians` for the groups of `totals` whose digests add up; (answers, the groups that
    do not).

    Why a sum per group suffices: a digest's n never exceeds the rollups' count of its
    bucket (built equal to it; rollup counts only grow, and retention deletes a digest no
    later than its level's row); the raw rows read never exceed the rollups' count of their
    range; and `totals` reads each part of the range at a level at least as coarse as the
    digest or raw read there, whose count is at least the finer counts (every level counts
    the same results; retention keeps coarser levels at least as long, a coarse row outliving
    some of its finer ones: `mmagg.server.retention`). So Σ n + raw rows <= the total, equal
    only when every digest's n is its bucket's count and no bucket with results lacks one:
    equal, the digests are valid (the bucket-by-bucket check would take the same ones); else
    the group is unsure.

    Buckets up to `limit` (`rollups.complete_before`) come from digests: whole days, whole
    hours of the edge days (a day no digest describes falls back to its hours), and an hour
    no digest describes (not built yet: the newest hours) is read raw; the partial hours and
    everything from `limit` on are raw rows, binned in SQL.
    """
    digest_end = max(start, min(end, limit))
    raw_ranges: list[tuple[float, float]] = []
    if digest_end < end:
        raw_ranges.append((digest_end, end))
    pending: list[tuple[float, float, int]] = []
    for segment in rollups.split(start, digest_end, LEVELS):
        if segment.level == 0:
            raw_ranges.append((segment.start, segment.end))
        else:
            pending.append((segment.start, segment.end, segment.level))
    found: dict[Group, list[tuple[int, int, bytes]]] = defaultdict(list)
    described: dict[Group, int] = defaultdict(int)
    while pending:
        low, high, level = pending.pop()
        stored = _digests(conn, workspace_id, level, low, high, model_ids)
        # The runs no digest describes (not bucket by bucket: a range may span centuries):
        # days fall back to their hours, hours to raw rows.
        present = {bucket for bucket, _model_id, _class_name in stored}
        for gap_low, gap_high in _gaps(low, high, level, present):
            if level == DAY:
                pending.append((gap_low, gap_high, HOUR))
            else:
                raw_ranges.append((gap_low, gap_high))
        for (_bucket, model_id, class_name), (digest_id, n, blob) in stored.items():
            group = (model_id, class_name)
            if group in totals:
                found[group].append((digest_id, level, blob))
                described[group] += n
    if not found:
        # Nothing to gain from digests: one GROUP BY in the engine is the cheapest raw read.
        plain = raw_medians(conn, workspace_id, start, end, model_ids)
        return {group: plain.get(group) for group in totals}, set()
    # Phase 1 needs the raw values of the blocks holding the middle values only. Raw rows
    # are `total - described` at most (`unsure` otherwise), so from the digests alone a
    # middle value of rank r lies between the first block whose digest count through it
    # plus that exceeds r and the first whose digest count alone does: that window.
    digests: dict[Group, list[_Digest]] = {}
    windows: dict[Group, set[int]] = {}
    for group, total in totals.items():
        digests[group] = [
            _Digest(digest_id, level, decode_counts(blob))
            for digest_id, level, blob in found[group]
        ]
        fine = np.zeros(BANDS, dtype=np.int64)
        for digest in digests[group]:
            fine += digest.counts
        through = np.cumsum(fine.reshape(RAW_BLOCKS, RAW_BLOCK).sum(axis=1))
        rest = max(total - described[group], 0)
        windows[group] = set()
        for rank in {(total - 1) // 2, total // 2} if total else set():
            first = int(np.searchsorted(through + rest, rank, side="right"))
            last = int(np.searchsorted(through, rank, side="right"))
            windows[group].update(range(first, min(last, RAW_BLOCKS - 1) + 1))
    joined = _ranges(raw_ranges)
    raw_blocks, values = _raw_blocks(
        conn, workspace_id, joined, model_ids, set().union(*windows.values())
    )
    parts: dict[Group, _Parts] = {}
    unsure: set[Group] = set()
    for group, total in totals.items():
        blocks = raw_blocks.get(group, np.zeros(RAW_BLOCKS, dtype=np.int64))
        if described[group] + int(blocks.sum()) != total:
            unsure.add(group)
            continue
        raw = {
            block: np.array(values.get((group, block), []), dtype=np.float64)
            for block in windows[group]
            if blocks[block]
        }
        # The other blocks' raw counts go to their first band: cumulative counts stay exact
        # at every block edge, and the middle values lie in the window's blocks.
        elsewhere = blocks.copy()
        elsewhere[list(raw)] = 0
        raw_counts = np.zeros(BANDS, dtype=np.int64)
        raw_counts[::RAW_BLOCK] = elsewhere
        parts[group] = _Parts(digests=digests[group], raw=list(raw.values()), raw_counts=raw_counts)
    return _finish(conn, workspace_id, start, end, parts), unsure


@dataclass
class _Target:
    """One group's phase-1 answer: the ranks of its middle values inside their bands."""

    count: int
    # band -> the ranks (0-based, within the band) asked of it
    ranks: dict[int, list[int]]
    raw: np.ndarray


def _finish(
    conn: Connection,
    workspace_id: int,
    start: float,
    end: float,
    parts: dict[Group, _Parts],
) -> dict[Group, float | None]:
    """Phases 1 and 2 over each group's digests and raw values."""
    dialect = conn_dialect(conn.dialect.name)
    targets: dict[Group, _Target] = {}
    answers: dict[Group, float | None] = {}
    for group, part in parts.items():
        raw = np.concatenate(part.raw) if part.raw else np.empty(0, dtype=np.float64)
        totals = band_counts(raw)
        if part.raw_counts is not None:
            totals += part.raw_counts
        for digest in part.digests:
            totals += digest.counts
        count = int(totals.sum())
        if count == 0:
            answers[group] = None
            continue
        cumulative = np.cumsum(totals)
        ranks: dict[int, list[int]] = defaultdict(list)
        for rank in sorted({(count - 1) // 2, count // 2}):
            band = int(np.searchsorted(cumulative, rank, side="right"))
            before = int(cumulative[band - 1]) if band else 0
            ranks[band].append(rank - before)
        targets[group] = _Target(count, dict(ranks), raw)
    # Phase 2: the chunks holding the target bands, of every digest that has values there.
    # (digest, chunk) -> (group, band, where the band's values lie in the chunk, the chunk's
    # length), all from the digest's band counts.
    wanted: dict[tuple[int, int], list[tuple[Group, int, int, int, int]]] = defaultdict(list)
    for group, target in targets.items():
        for digest in parts[group].digests:
            for band in target.ranks:
                if digest.counts[band]:
                    width = CHUNK_BANDS[digest.level]
                    chunk = band // width
                    first = chunk * width
                    low = int(digest.counts[first:band].sum())
                    wanted[(digest.id, chunk)].append(
                        (
                            group,
                            band,
                            low,
                            low + int(digest.counts[band]),
                            int(digest.counts[first : first + width].sum()),
                        )
                    )
    in_band: dict[tuple[Group, int], list[np.ndarray]] = defaultdict(list)
    broken: set[Group] = set()
    found: set[tuple[int, int]] = set()
    # Per (group, level): its digests' ids and the chunks its bands lie in, all in one query
    # (ids x chunks for all groups at once would fetch every digest's chunk of every
    # group's band).
    asks: dict[tuple[Group, int], tuple[set[int], set[int]]] = {}
    for group, target in targets.items():
        for digest in parts[group].digests:
            ids, chunks = asks.setdefault((group, digest.level), (set(), set()))
            ids.add(digest.id)
            chunks.update(band // CHUNK_BANDS[digest.level] for band in target.ranks)
    conditions: list[tuple[set[int], set[int]]] = []
    bound = 0
    for ids, chunks in asks.values():
        conditions.append((ids, chunks))
        bound += len(ids) + len(chunks)
        # Statements of a bounded length (SQLite: 1,000,000 bytes by default).
        if bound > 20_000:
            _take(_chunks(conn, conditions), wanted, found, broken, in_band)
            conditions, bound = [], 0
    if conditions:
        _take(_chunks(conn, conditions), wanted, found, broken, in_band)
    for key, asked in wanted.items():
        if key not in found:
            broken.update(ask[0] for ask in asked)
    for group, target in targets.items():
        if group in broken:
            answers.update(raw_medians(conn, workspace_id, start, end, group=group))
            answers.setdefault(group, None)
            continue
        middle: list[float] = []
        for band, band_ranks in sorted(target.ranks.items()):
            raw_band = target.raw[bands_of(target.raw) == band]
            values = np.sort(np.concatenate([raw_band, *in_band.get((group, band), [])]))
            middle += [float(values[rank]) for rank in band_ranks]
        answers[group] = middle[0] if len(middle) == 1 else pick(middle[0], middle[1], dialect)
    return answers


def _chunks(conn: Connection, conditions: Sequence[tuple[set[int], set[int]]]) -> Iterable[Any]:
    """The chunks (digest id, chunk, values) of each (digest ids, chunk numbers) pair.

    Written as SQL text with the integers inline: a few hundred ids, where compiling the
    expression and binding each id cost more than the rows themselves."""
    where = " OR ".join(
        f"(digest_id IN ({', '.join(str(int(i)) for i in sorted(ids))}) "
        f"AND chunk IN ({', '.join(str(int(c)) for c in sorted(chunks))}))"
        for ids, chunks in conditions
    )
    return conn.exec_driver_sql(
        f"SELECT digest_id, chunk, vals FROM {median_values.name} WHERE {where}"
    )


def _take(
    rows: Iterable[Any],
    wanted: dict[tuple[int, int], list[tuple[Group, int, int, int, int]]],
    found: set[tuple[int, int]],
    broken: set[Group],
    in_band: dict[tuple[Group, int], list[np.ndarray]],
) -> None:
    """File the values of fetched chunks under the (group, band)s that asked for them, cut
    where the digest's band counts put them; a chunk not as phase 1 saw it (rebuilt or
    pruned since, on a read without a snapshot: another length, or the cut's first and
    last values in another band) marks its group."""
    for digest_id, chunk, blob in rows:
        asked = wanted.get((int(digest_id), int(chunk)))
        if asked is None:
            continue
        found.add((int(digest_id), int(chunk)))
        values = decode_values(blob)
        for group, band, low, high, length in asked:
            if len(values) != length or (bands_of(values[[low, high - 1]]) != band).any():
                broken.add(group)
                continue
            in_band[(group, band)].append(values[low:high])


# ---------------------------------------------------------------------------------- build


@dataclass
class BuildResult:
    """What one `build` pass did."""

    hours: int = 0
    days: int = 0
    results: int = 0
    deleted: int = 0
    #: Work was left for the next pass (the pass's budget ran out).
    more: bool = False
    seconds: float = 0.0


def lock(conn: Connection) -> None:
    """PostgreSQL: serialise with the other digest builders and the prune batches until the
    transaction ends (SQLite's write lock does that there)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")


def delete_before(
    conn: Connection, before: float, by_level: Mapping[int, float] | None = None
) -> int:
    """Delete every digest whose bucket starts before `before`, or before `by_level[level]`
    for a level given there (retention per level, `mmagg.server.retention`); how many."""
    deleted = 0
    for level in LEVELS:
        bound = before if by_level is None else by_level.get(level, before)
        if bound == -math.inf:
            continue
        where = (median_digests.c.level == level, median_digests.c.bucket < bound)
        doomed = sa.select(median_digests.c.id).where(*where)
        conn.execute(sa.delete(median_values).where(median_values.c.digest_id.in_(doomed)))
        deleted += int(conn.execute(sa.delete(median_digests).where(*where)).rowcount or 0)
    return deleted


def _delete(conn: Connection, ids: Sequence[int]) -> None:
    for offset in range(0, len(ids), 500):
        part = list(ids[offset : offset + 500])
        conn.execute(sa.delete(median_values).where(median_values.c.digest_id.in_(part)))
        conn.execute(sa.delete(median_digests).where(median_digests.c.id.in_(part)))


def _store(
    conn: Connection,
    workspace_id: int,
    level: int,
    bucket: float,
    group: Group,
    values: np.ndarray,
) -> None:
    """Replace the digest of (workspace, level, bucket, group) with one of sorted `values`
    (none for no values)."""
    _store_many(conn, workspace_id, level, bucket, {group: values})


def _store_many(
    conn: Connection,
    workspace_id: int,
    level: int,
    bucket: float,
    groups: dict[Group, np.ndarray],
) -> None:
    """Replace the digests of the `groups` of one (workspace, level, bucket), each with one
    of its sorted values, in a handful of statements whatever the number of groups."""
    d = median_digests.c
    old = [
        int(digest_id)
        for digest_id, model_id, class_name in conn.execute(
            sa.select(d.id, d.model_id, d.class_name).where(
                d.workspace_id == workspace_id, d.level == level, d.bucket == bucket
            )
        )
        if (model_id, class_name) in groups
    ]
    _delete(conn, old)
    kept = [(group, values) for group, values in groups.items() if len(values)]
    if not kept:
        return
    bands = [bands_of(values) for _group, values in kept]
    ids = conn.execute(
        sa.insert(median_digests).returning(d.id, sort_by_parameter_order=True),
        [
            {
                "workspace_id": workspace_id,
                "level": level,
                "bucket": bucket,
                "model_id": group[0],
                "class_name": group[1],
                "n": len(values),
                "counts": encode_counts(np.bincount(band, minlength=BANDS)),
            }
            for (group, values), band in zip(kept, bands, strict=True)
        ],
    ).scalars()
    width = CHUNK_BANDS[level]
    rows = []
    for digest_id, (_group, values), band in zip(ids, kept, bands, strict=True):
        edges = np.searchsorted(band, np.arange(0, BANDS + width, width))
        rows += [
            {"digest_id": digest_id, "chunk": chunk, "vals": encode_values(values[low:high])}
            for chunk, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True))
            if high > low
        ]
    conn.execute(sa.insert(median_values), rows)


Key = tuple[int, float, str, str]  # (workspace, bucket, model, class)


# A condition on a column both tables have: (column name, operator, value).
Condition = tuple[str, Callable[[Any, Any], Any], Any]


def _level_counts(
    conn: Connection, level: int, where: Sequence[Condition]
) -> tuple[dict[Key, int], dict[Key, int]]:
    """(rollup counts, digest n) per (workspace, bucket, model, class) of `level`, for the
    buckets `where` selects."""
    r = rollup_table.c
    d = median_digests.c
    expected = {
        (int(w), float(b), m, c): int(n)
        for w, b, m, c, n in conn.execute(
            sa.select(r.workspace_id, r.bucket, r.model_id, r.class_name, sa.func.sum(r.results))
            .where(r.level == level, *_on(r, where))
            .group_by(r.workspace_id, r.bucket, r.model_id, r.class_name)
        )
    }
    stored = {
        (int(w), float(b), m, c): int(n)
        for w, b, m, c, n in conn.execute(
            sa.select(d.workspace_id, d.bucket, d.model_id, d.class_name, d.n).where(
                d.level == level, *_on(d, where)
            )
        )
    }
    return expected, stored


def _on(columns: Any, where: Sequence[Condition]) -> list[sa.ColumnElement[bool]]:
    """The conditions `where` on the columns of one table."""
    return [op(columns[name], value) for name, op, value in where]


def _hour_plan(
    conn: Connection, limit: float, keep_after: float
) -> tuple[dict[Key, int], dict[Key, int]]:
    """(rollup counts, digest n) per (workspace, hour, model, class) for hours that ended by
    `limit` and start at or after `keep_after`.

    A day whose day digests all match the rollups' day counts has valid hours too (hour
    digests only ever describe rows that exist, and the day was merged from them), so only
    the other days' hours are listed: a pass reads the day rows and the hours of the last
    day or two, not every hour of the retention period.
    """
    first_day = -math.inf if keep_after == -math.inf else rollups.bucket_start(keep_after, DAY)
    days_expected, days_stored = _level_counts(
        conn,
        DAY,
        [("bucket", operator.ge, first_day), ("bucket", operator.lt, limit)],
    )
    open_days = sorted(
        {(key[0], key[1]) for key, count in days_expected.items() if days_stored.get(key) != count}
    )
    bounds = [("bucket", operator.le, limit - HOUR), ("bucket", operator.ge, keep_after)]
    if len(open_days) > 64:  # a catch-up: one pass over every hour is cheaper
        return _level_counts(conn, HOUR, bounds)
    expected: dict[Key, int] = {}
    stored: dict[Key, int] = {}
    for workspace_id, day in open_days:
        more_expected, more_stored = _level_counts(
            conn,
            HOUR,
            [
                *bounds,
                ("workspace_id", operator.eq, workspace_id),
                ("bucket", operator.ge, day),
                ("bucket", operator.lt, day + DAY),
            ],
        )
        expected.update(more_expected)
        stored.update(more_stored)
    return expected, stored


def build(
    db: Database,
    now: float | None = None,
    keep_after: float | None = None,
    pass_results: int = PASS_RESULTS,
) -> BuildResult:
    """One pass of the digest job: build the missing or stale hour digests of the hours that
    ended before min(now - `GRACE_SECONDS`, `rollups.complete_before`) and start at or after
    `keep_after` (the retention bound), then the day digests whose 24 hours all have valid
    digests. Reads at most about `pass_results` results; `BuildResult.more` says whether
    work was left. Each transaction reads at most `TRANSACTION_RESULTS` results."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    floor = -math.inf if keep_after is None else keep_after
    done = BuildResult()
    with db.read() as conn:
        limit = min(now - GRACE_SECONDS, rollups.complete_before(conn))
        expected, stored = _hour_plan(conn, limit, floor)
    orphans = [key for key in stored if key not in expected]
    todo: dict[tuple[int, float], dict[Group, int]] = defaultdict(dict)
    for key, count in expected.items():
        if stored.get(key) != count:
            todo[(key[0], key[1])][(key[2], key[3])] = count
    if orphans:
        with db.write() as conn:
            lock(conn)
            for workspace_id, bucket, model_id, class_name in orphans:
                _store(conn, workspace_id, HOUR, bucket, (model_id, class_name), np.empty(0))
                done.deleted += 1
    # Newest hours first: they are the ones the dashboard's default ranges read.
    hours = sorted(todo.items(), key=lambda item: (-item[0][1], item[0][0]))
    batch: list[tuple[tuple[int, float], dict[Group, int]]] = []
    batch_results = 0
    for item in hours:
        if done.results + batch_results >= pass_results:
            done.more = True
            break
        size = sum(item[1].values())
        if batch and batch_results + size > TRANSACTION_RESULTS:
            _build_hours(db, batch, done)
            batch, batch_results = [], 0
        batch.append(item)
        batch_results += size
    if batch:
        _build_hours(db, batch, done)
    if not done.more:
        _build_days(db, limit, floor, done)
    done.seconds = time.perf_counter() - started
    return done


def _build_hours(
    db: Database,
    batch: Sequence[tuple[tuple[int, float], dict[Group, int]]],
    done: BuildResult,
) -> None:
    """Rebuild the listed groups of the listed (workspace, hour)s in one transaction."""
    with db.write() as conn:
        lock(conn)
        for (workspace_id, bucket), groups in batch:
            values = _raw_values(conn, workspace_id, bucket, bucket + HOUR, ())
            fresh = {
                group: np.sort(values.get(group, np.empty(0, dtype=np.float64))) for group in groups
            }
            _store_many(conn, workspace_id, HOUR, bucket, fresh)
            done.results += sum(len(found) for found in fresh.values())
            done.hours += len(fresh)


def _build_days(db: Database, limit: float, floor: float, done: BuildResult) -> None:
    """Merge 24 valid hour digests into each missing or stale day digest."""
    d = median_digests.c
    first_day = -math.inf if floor == -math.inf else math.ceil(floor / DAY) * DAY
    with db.read() as conn:
        expected, stored = _level_counts(
            conn, DAY, [("bucket", operator.le, limit - DAY), ("bucket", operator.ge, first_day)]
        )
        open_days = sorted(
            {(key[0], key[1]) for key, count in expected.items() if stored.get(key) != count}
        )
        # The hour digests of the days to build, summed per day.
        hour_n: dict[Key, int] = defaultdict(int)
        for workspace_id, day in open_days:
            for w, b, m, c, n in conn.execute(
                sa.select(d.workspace_id, d.bucket, d.model_id, d.class_name, d.n).where(
                    d.level == HOUR,
                    d.workspace_id == workspace_id,
                    d.bucket >= day,
                    d.bucket < day + DAY,
                )
            ):
                hour_n[(int(w), rollups.bucket_start(float(b), DAY), m, c)] += int(n)
    orphans = [key for key in stored if key not in expected]
    if orphans:
        with db.write() as conn:
            lock(conn)
            for workspace_id, bucket, model_id, class_name in orphans:
                _store(conn, workspace_id, DAY, bucket, (model_id, class_name), np.empty(0))
                done.deleted += 1
    todo: dict[tuple[int, float], list[Group]] = defaultdict(list)
    for key, count in expected.items():
        # Hour digests only ever describe rows that exist, so their sum equals the day's
        # count only when every hour of the day is in (re-checked in the transaction).
        if stored.get(key) != count and hour_n.get(key) == count:
            todo[(key[0], key[1])].append((key[2], key[3]))
    for (workspace_id, day), groups in sorted(todo.items(), key=lambda item: -item[0][1]):
        with db.write() as conn:
            lock(conn)
            _build_day(conn, workspace_id, day, groups, done)


def _build_day(
    conn: Connection, workspace_id: int, day: float, groups: Sequence[Group], done: BuildResult
) -> None:
    hour_expected = _expected(conn, workspace_id, HOUR, day, day + DAY, ())
    day_expected = _expected(conn, workspace_id, DAY, day, day + DAY, ())
    hours = _digests(conn, workspace_id, HOUR, day, day + DAY, ())
    fresh: dict[Group, np.ndarray] = {}
    for group in groups:
        ids = []
        valid = True
        for (bucket, model_id, class_name), count in hour_expected.items():
            if (model_id, class_name) != group:
                continue
            digest = hours.get((bucket, model_id, class_name))
            if digest is None or digest[1] != count:
                valid = False
                break
            ids.append(digest[0])
        total = sum(hours[key][1] for key in hours if key[1:] == group)
        if not valid or total != day_expected.get((day, *group)):
            continue
        fresh[group] = np.sort(np.concatenate([np.empty(0), *_all_values(conn, ids)]))
    if fresh:
        _store_many(conn, workspace_id, DAY, day, fresh)
        done.days += len(fresh)


def _all_values(conn: Connection, ids: Sequence[int]) -> list[np.ndarray]:
    v = median_values.c
    return [
        decode_values(blob)
        for (blob,) in conn.execute(sa.select(v.vals).where(v.digest_id.in_(list(ids))))
    ]


def storage(conn: Connection) -> dict[str, int]:
    """Rows and bytes of the digests (for benchmarks and docs)."""
    d, v = median_digests.c, median_values.c
    digests, count_bytes = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.func.length(d.counts)), 0))
    ).one()
    chunks, value_bytes = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.func.length(v.vals)), 0))
    ).one()
    return {
        "digests": int(digests),
        "count_bytes": int(count_bytes),
        "chunks": int(chunks),
        "value_bytes": int(value_bytes),
    }
