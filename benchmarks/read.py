"""Read-side timings of the backend's queries on a seeded SQLite file.

Seeds a database through `Database.store_report` (the ingest write path) with REPORTS
reports of 8 results each, spread over the 24 hours before now (5 models, 20 devices,
50 video sources, the `stats` extension; one model without a declared frequency), then times
the queries behind the read endpoints, median of `--repeat` runs each:

    python benchmarks/read.py                            # 25,000 reports = 200,000 results
    python benchmarks/read.py --reports 2000 --repeat 3  # quick
    git show HEAD~1:src/mmagg/server/queries.py > /tmp/old_queries.py
    python benchmarks/read.py --compare /tmp/old_queries.py   # before/after on the same file
    python benchmarks/read.py --days 30 --raw    # a fleet's month (benchmarks/_fleet.py)

With `--compare FILE`, FILE is loaded as an alternative `mmagg.server.queries` and every
query is also timed with it, on the same database, printing the ratio. For the models
overview the comparison is what the dashboard asked for on each refresh: before, `/models`
over the range *and* over all time (two calls, when the endpoint had no all-time fields);
after, one call.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import _fleet
from _support import random_result
from mmagg.server import queries
from mmagg.server.db import Database
from mmagg.server.schemas import REPORT_ADAPTER

CLASSES = ("person", "car", "truck", "helmet", "forklift", "bicycle", "dog", "pallet")
MODELS = 5
WORKSPACE = "bench"


def seed(db: Database, count: int, now: float, seed: int = 1) -> None:
    """`count` reports of 8 results, evenly spread over the 24 hours before `now`."""
    rng = random.Random(seed)
    principal = db.authenticate(db.create_key(WORKSPACE))
    assert principal is not None
    step = 86400 / count
    for i in range(count):
        model = f"site-{i % MODELS}/3"
        items = [
            random_result(rng, class_name, model, f"cam-{i % 50}", 0.5) for class_name in CLASSES
        ]
        body: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(now - 86400 + i * step, timezone.utc).isoformat(),
            "device_id": f"edge-{i % 20:02d}",
            "inference_results": items,
        }
        if i % MODELS != MODELS - 1:  # the last model declares no frequency
            body["mmagg"] = {"frequency": 5.0}
        db.store_report(principal, REPORT_ADAPTER.validate_python(body), None)


def timed(call: Callable[[Any], Any], conn: Any, repeat: int) -> tuple[float, Any]:
    """Median seconds over `repeat` calls of `call(conn)`, and the last answer."""
    seconds = []
    answer = None
    for _ in range(repeat):
        started = time.perf_counter()
        answer = call(conn)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), answer


def load_queries(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_queries", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cases(
    module: ModuleType, workspace_id: int, now: float, baseline: bool
) -> dict[str, Callable[[Any], Any]]:
    """Query name -> a call taking a connection, for the queries of `module`."""
    day = module.TimeRange(now - 86400, now + 1)
    half = module.TimeRange(now - 43200, now + 1)
    hour = module.TimeRange(now - 3600, now + 1)
    every = module.TimeRange(0, now + 1)
    model = "site-0/3"

    def overview(conn: Any) -> Any:
        if baseline:  # the dashboard's two calls before /models had all-time fields
            module.models(conn, workspace_id, hour)
            return module.models(conn, workspace_id, every)
        return module.models(conn, workspace_id, hour)

    def overview_device(conn: Any) -> Any:
        if baseline:  # filtered in the browser
            return overview(conn)
        return module.models(conn, workspace_id, hour, device_id="edge-03")

    return {
        "inference-stats 24 h": lambda c: module.inference_stats(c, workspace_id, day),
        "inference-stats 12 h (+ 12 h before)": lambda c: module.inference_stats(
            c, workspace_id, half
        ),
        "inference-stats 1 h": lambda c: module.inference_stats(c, workspace_id, hour),
        "inference-stats 24 h, 1 model": lambda c: module.inference_stats(
            c, workspace_id, day, [model]
        ),
        "models overview (1 h + all time)": overview,
        "models overview, one device": overview_device,
        "models 24 h": lambda c: module.models(c, workspace_id, day),
        "classes 24 h": lambda c: module.classes(c, workspace_id, model, day),
        "timeseries 24 h / 15 min": lambda c: module.timeseries(c, workspace_id, model, day, 900),
        "histogram 24 h": lambda c: module.histogram(c, workspace_id, model, day),
        "devices 24 h": lambda c: module.devices(c, workspace_id, day),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=25_000, help="reports to seed (x8 results)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per query (median)")
    parser.add_argument("--database", type=Path, help="reuse/keep this SQLite file")
    parser.add_argument("--compare", type=Path, help="an older queries.py to time as well")
    _fleet.add_arguments(parser)
    args = parser.parse_args()
    if args.days is not None:
        with tempfile.TemporaryDirectory() as directory:
            return _fleet.run(args, directory)

    with tempfile.TemporaryDirectory() as directory:
        path = args.database or Path(directory) / "read.db"
        fresh = not path.exists()
        db = Database(f"sqlite:///{path}")
        now = time.time()
        if fresh:
            started = time.perf_counter()
            seed(db, args.reports, now)
            print(
                f"seeded {args.reports:,} reports ({args.reports * 8:,} results) "
                f"in {time.perf_counter() - started:.1f} s"
            )
            with db.engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE")
                conn.commit()
        principal = db.authenticate(db.create_key(WORKSPACE))
        assert principal is not None
        with db.read() as conn:
            newest = conn.exec_driver_sql("SELECT MAX(ts) FROM results").scalar()
        now = float(newest or now)

        after = cases(queries, principal.workspace_id, now, baseline=False)
        before = (
            cases(load_queries(args.compare), principal.workspace_id, now, baseline=True)
            if args.compare
            else {}
        )
        header = f"{'query':40} {'now':>9}"
        if before:
            header += f" {'before':>9} {'before/now':>10}"
        print(header)
        with db.read() as conn:
            for name, call in after.items():
                seconds, _ = timed(call, conn, args.repeat)
                line = f"{name:40} {seconds * 1000:7.1f}ms"
                if name in before:
                    base, _ = timed(before[name], conn, args.repeat)
                    line += f" {base * 1000:7.1f}ms {base / seconds:9.1f}x"
                print(line, flush=True)
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
