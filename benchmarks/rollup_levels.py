"""What one more rollup level costs at ingest: `Database.store_report` CPU per report, in
process (no HTTP), with the current levels and with a chosen set, alternated on fresh SQLite
files so that both see the same machine load.

The reports are those of `benchmarks/ingest.py` (8 results with the `stats` extension, each
from its own video source: 8 rollup keys a report). Prints the process CPU per report of each
round and the median per level set.

    python benchmarks/rollup_levels.py                         # current vs without 6 h
    python benchmarks/rollup_levels.py --other 86400,3600,300,60 --reports 3000 --rounds 4
    python benchmarks/rollup_levels.py --other ""             # current vs no rollups at all
    python benchmarks/rollup_levels.py --smoke
    python benchmarks/rollup_levels.py --late                  # every report before the watermark

The reports are timestamped after the database is made, 0.1 s apart (what a fleet of 20
devices sends in a few minutes), so that with the rollup watermark (schema 10) ingest leaves
them to the fold job; each round then folds them (`Database.fold_rollups`) and counts that
CPU too (printed apart, and in the total). `--late` dates them before the database, as
replayed reports are: then ingest writes their rollups itself, as before schema 10.

No target: it measures a design choice (docs/scale.md, "Ingest cost of the rollups").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _support import random_result
from mmagg.server import Database, rollups
from mmagg.server.bounds import place
from mmagg.server.schemas import REPORT_ADAPTER

CLASSES = ("person", "car", "truck", "helmet", "forklift", "bicycle", "dog", "pallet")


def _bodies(count: int, now: float, step: float = 1.0) -> list[Any]:
    rng = random.Random(3)
    found = []
    for i in range(count):
        items = [
            random_result(rng, CLASSES[j], f"site-{i % 5}/3", f"cam-{(i * 8 + j) % 400}", 0.85)
            for j in range(len(CLASSES))
        ]
        when = datetime.fromtimestamp(now + i * step, timezone.utc).isoformat()
        body = {"timestamp": when, "device_id": f"edge-{i % 20}", "inference_results": items}
        found.append(REPORT_ADAPTER.validate_python(body))
    return found


def _round(
    directory: Path, name: str, levels: tuple[int, ...], bodies: list[Any]
) -> tuple[float, float]:
    """CPU seconds per report of storing `bodies` with rollup `levels` on a fresh file, and
    of folding them afterwards (0 where the database has no fold job)."""
    saved = rollups.LEVELS
    rollups.LEVELS = levels
    db = Database(f"sqlite:///{directory / name}.db")
    try:
        principal = db.authenticate(db.create_key("bench"))
        assert principal is not None
        started = time.process_time()
        for report in bodies:
            placement = place(report.timestamp, report.timestamp.timestamp())
            db.store_report(principal, report, None, placement)
        stored = time.process_time() - started
        fold = getattr(db, "fold_rollups", None)
        folded = 0.0
        if fold is not None:
            last = max(report.timestamp.timestamp() for report in bodies)
            started = time.process_time()
            fold(until=(last // 60 + 1) * 60)
            folded = time.process_time() - started
        return stored / len(bodies), folded / len(bodies)
    finally:
        db.close()
        rollups.LEVELS = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", default="86400,3600,300,60", help="levels to compare with")
    parser.add_argument("--reports", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="a few seconds")
    parser.add_argument("--late", action="store_true", help="reports before the watermark")
    args = parser.parse_args()
    if args.smoke:
        args.reports, args.rounds = 200, 1
    other = tuple(int(level) for level in args.other.split(",") if level)
    variants = {"current " + str(rollups.LEVELS): rollups.LEVELS, "other " + str(other): other}
    now = time.time()
    bodies = (
        _bodies(args.reports, now - args.reports - 3600)
        if args.late
        else _bodies(args.reports, now + 60, step=0.1)
    )
    found: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as directory:
        for index in range(args.rounds):
            for number, (name, levels) in enumerate(variants.items()):
                stored, folded = _round(Path(directory), f"r{index}_{number}", levels, bodies)
                found[name].append(stored + folded)
                print(
                    f"round {index + 1} {name}: {(stored + folded) * 1000:.3f} ms CPU/report "
                    f"(store {stored * 1000:.3f} + fold {folded * 1000:.3f})",
                    flush=True,
                )
    medians = {name: statistics.median(values) for name, values in found.items()}
    for name, value in medians.items():
        print(f"median {name}: {value * 1000:.3f} ms CPU/report")
    first, second = medians.values()
    print(f"difference: {(first - second) * 1000:+.3f} ms/report ({first / second - 1:+.1%})")
    if args.smoke:
        print("smoke: targets not judged (no target: a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
