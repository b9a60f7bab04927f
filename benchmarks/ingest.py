"""Ingest throughput, latency and server CPU of `mmagg serve`, with an exactly-once check.

N concurrent clients (asyncio + httpx over loopback) post realistic reports (8 classes,
per-source results with the stats extension, an Idempotency-Key each) for a fixed time.
Prints reports/s, p50/p99 latency, the server's CPU per report and the group commit's mean
batch size, then checks that every report answered 2xx is stored exactly once and nothing
else is.

    python benchmarks/ingest.py                 # 20 s, 8 clients, each as fast as answered
    python benchmarks/ingest.py --rate 500      # open loop: 500 reports/s offered in total
    python benchmarks/ingest.py --database-url postgresql://postgres@127.0.0.1/bench
    python benchmarks/ingest.py --smoke         # ~3 s, for CI
    python benchmarks/ingest.py --workers 2     # 1 worker, then 2, in the same run
    python benchmarks/ingest.py --workers 2 --database-url postgresql://postgres@127.0.0.1/x

The database defaults to a fresh SQLite file; with a PostgreSQL URL each run writes into a
workspace of its own (the check compares every report stored there). The server CPU counts
the `mmagg serve` processes only, not PostgreSQL's; it includes the rollup job, which runs
in `mmagg serve`: after the load the benchmark waits (up to ~70 s, not with --smoke) until
the job has folded every report of the run, and reads the server's CPU after that, less
what the idle server used over the wait (its idle rate is measured for 5 s before the
load); the CPU during the load alone is printed too. Each report carries the time it is
sent, as a live client's does.

On the 2-vCPU development VM the open loop showed higher latency at lower throughput than
the closed loop (cause not established; idle-vCPU wake-ups are the suspect), so targets are
judged on the closed loop.

Targets on 2 cores: >= 500 reports/s with p99 <= 100 ms, <= 0.4 ms of server CPU per
report, and none lost. With `--workers N` the same load runs against `mmagg serve` (one
process) and then `mmagg serve --workers N`, each on a fresh database, and the target is N
workers >= 1.6x one on this 2-core machine (issue 15). The load generator runs on the same
cores, so the ratio understates what N workers do on a machine of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import sqlalchemy as sa

from _support import random_result, verdict
from mmagg.server.db import Database
from mmagg.server.tables import reports, workspaces

CLASSES = ("person", "car", "truck", "helmet", "forklift", "bicycle", "dog", "pallet")


TIMESTAMP_MARK = "%%TIMESTAMP%%"
# Seconds the idle server is watched before the load (its CPU rate while idle).
IDLE_SECONDS = 5.0


def stamped(body: bytes) -> bytes:
    """`body` with its timestamp set to now: the server files reports by their timestamp,
    and the rollup job folds the minutes behind the clock (a fixed timestamp would turn
    every report after the first fold into a late one)."""
    now = datetime.now(timezone.utc).isoformat().encode()
    return body.replace(TIMESTAMP_MARK.encode(), now, 1)


def build_bodies(count: int, results_per_report: int, seed: int = 1) -> list[bytes]:
    """Pre-serialised report bodies like an aggregator with extensions sends them."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        items = [
            random_result(rng, CLASSES[j % len(CLASSES)], f"site-{i % 5}/3", f"cam-{i % 50}", 0.85)
            for j in range(results_per_report)
        ]
        bodies.append(
            json.dumps(
                {
                    # Stamped as each report is sent (`stamped`), like a live client's.
                    "timestamp": TIMESTAMP_MARK,
                    "source": "workflow",
                    "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
                    "device_id": f"edge-{i % 20:02d}",
                    "inference_server_version": "0.1.0",
                    "platform": "Linux",
                    "platform_release": "6.1.0",
                    "platform_version": "#1 SMP PREEMPT_DYNAMIC",
                    "architecture": "x86_64",
                    "hostname": f"edge-{i % 20:02d}",
                    "ip_address": "10.0.0.5",
                    "mac_address": "00:11:22:33:44:55",
                    "processor": "x86_64",
                    "inference_results": items,
                    "mmagg": {"frequency": 5.0, "aggregator_key": f"agg-{i % 50}"},
                }
            ).encode()
        )
    return bodies


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    acknowledged: list[str] = field(default_factory=list)


async def client_loop(
    base_url: str,
    workspace: str,
    key: str,
    bodies: list[bytes],
    deadline: float,
    interval: float,
    offset: float,
    tally: Tally,
) -> None:
    url = f"{base_url}/{workspace}/inference-stats"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        next_send = time.perf_counter() + offset
        i = random.randrange(len(bodies))
        while True:
            if interval:
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_send += interval
            if time.perf_counter() >= deadline:
                return
            idempotency_key = uuid.uuid4().hex
            started = time.perf_counter()
            try:
                response = await client.post(
                    url,
                    content=stamped(bodies[i % len(bodies)]),
                    headers={**headers, "Idempotency-Key": idempotency_key},
                )
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[status] += 1
            if status.startswith("2"):
                tally.acknowledged.append(idempotency_key)
            i += 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(database_url: str, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-c",
        "from mmagg.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--log-level",
        "warning",
    ]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("mmagg serve did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (the workers of
    `--workers N`; Linux /proc), 0.0 where unavailable."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def wait_for_fold(database_url: str, until: float, timeout: float = 150.0) -> float | None:
    """Wait until the server's rollup job has folded every report sent before `until`, so
    that the server CPU measured counts the job's work too; the seconds waited (idle server
    CPU counts as well), or None for a server without the job (no rollup watermark)."""
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            try:
                with engine.connect() as conn:
                    value = conn.exec_driver_sql(
                        "SELECT complete_before FROM rollup_watermark"
                    ).scalar()
            except sa.exc.DBAPIError:
                return None
            if value is not None and value >= until:
                return time.monotonic() - started
            time.sleep(1.0)
        raise RuntimeError(f"the rollup job did not fold the run within {timeout:.0f} s")
    finally:
        engine.dispose()


def mean_batch(base_url: str) -> float | None:
    """Reports per group-commit transaction, from the server's /metrics (None if absent)."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        for name in ("mmagg_ingest_batch_reports_sum", "mmagg_ingest_batch_reports_count"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    count = found.get("mmagg_ingest_batch_reports_count")
    if not count:
        return None
    return found["mmagg_ingest_batch_reports_sum"] / count


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def run_load(
    base_url: str, workspace: str, key: str, args: argparse.Namespace, bodies: list[bytes]
) -> tuple[Tally, float]:
    tally = Tally()
    interval = args.clients / args.rate if args.rate else 0.0
    started = time.perf_counter()
    deadline = started + args.duration
    await asyncio.gather(
        *(
            client_loop(
                base_url,
                workspace,
                key,
                bodies,
                deadline,
                interval,
                interval * n / args.clients,
                tally,
            )
            for n in range(args.clients)
        )
    )
    return tally, time.perf_counter() - started


def check_stored(database_url: str, workspace: str, acknowledged: list[str]) -> list[str]:
    """Problems found comparing acknowledged reports with stored ones (empty: all good)."""
    db = Database(database_url)
    try:
        with db.read() as conn:
            stored = collections.Counter(
                conn.execute(
                    sa.select(reports.c.idempotency_key)
                    .join(workspaces, workspaces.c.id == reports.c.workspace_id)
                    .where(workspaces.c.name == workspace)
                ).scalars()
            )
    finally:
        db.close()
    problems = []
    acked = collections.Counter(acknowledged)
    missing = [k for k in acked if stored[k] == 0]
    duplicated = [k for k, n in stored.items() if n > 1]
    unacknowledged = [k for k in stored if k not in acked]
    if missing:
        problems.append(f"{len(missing)} acknowledged reports are not stored")
    if duplicated:
        problems.append(f"{len(duplicated)} reports are stored more than once")
    if unacknowledged:
        # A request that timed out client-side may still have been stored: report, don't fail.
        print(f"note: {len(unacknowledged)} stored reports were never acknowledged (timeouts)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="offered reports/s in total; 0 = closed loop"
    )
    parser.add_argument("--results-per-report", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="~3 s run for CI")
    parser.add_argument("--target-rps", type=float, default=500.0)
    parser.add_argument("--target-p99-ms", type=float, default=100.0)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also run `serve --workers N` after one process, and compare (target 1.6x)",
    )
    parser.add_argument("--target-speedup", type=float, default=1.6)
    parser.add_argument(
        "--database-url",
        default=None,
        help="an empty database for the runs (default: a temporary SQLite file each); "
        "each run uses a workspace of its own",
    )
    parser.add_argument("--target-cpu-ms", type=float, default=0.4, help="server CPU per report")
    args = parser.parse_args()
    if args.smoke:
        args.duration = 3.0
        args.clients = min(args.clients, 8)
    if args.workers < 1:
        parser.error(f"--workers: expected at least 1, got {args.workers}")
    with tempfile.TemporaryDirectory(prefix="mmagg-bench-") as tmp:
        if args.workers == 1:
            return run(args, Path(tmp))
        return compare_workers(args, Path(tmp))


def compare_workers(args: argparse.Namespace, directory: Path) -> int:
    """One process, then `--workers N`, same load; judge the throughput ratio."""
    if args.smoke:
        args.duration = min(args.duration, 2.5)
    one = measure(args, directory / "one", workers=1)
    many = measure(args, directory / "many", workers=args.workers)
    ratio = many.rps / one.rps if one.rps else 0.0
    print(
        f"workers: 1 -> {one.rps:.0f} reports/s, {args.workers} -> {many.rps:.0f} reports/s: "
        f"{ratio:.2f}x (machine shared with the load generator; see --help)"
    )
    judged = verdict(
        [(f"{args.workers} workers >= {args.target_speedup:g}x one", ratio >= args.target_speedup)],
        smoke=args.smoke,
    )
    if one.problems or many.problems or not one.rps or not many.rps:
        return 1
    return 0 if judged else 1


@dataclass
class Measured:
    rps: float
    p99_ms: float
    cpu_ms: float
    problems: list[str]


def run(args: argparse.Namespace, directory: Path) -> int:
    """One benchmark run with its database in `directory`; the exit status."""
    measured = measure(args, directory, workers=1)
    judged = verdict(
        [
            (f">= {args.target_rps:.0f} reports/s", measured.rps >= args.target_rps),
            (f"p99 <= {args.target_p99_ms:.0f} ms", measured.p99_ms <= args.target_p99_ms),
            (
                f"server CPU <= {args.target_cpu_ms:g} ms per report",
                measured.cpu_ms <= args.target_cpu_ms,
            ),
        ],
        smoke=args.smoke,
    )
    if measured.problems or measured.rps == 0:
        return 1
    return 0 if judged else 1


def measure(args: argparse.Namespace, directory: Path, workers: int) -> Measured:
    """Serve with `workers` processes, load it, print and return what was measured."""
    directory.mkdir(parents=True, exist_ok=True)
    database_url = args.database_url or f"sqlite:///{directory / 'bench.db'}"
    db = Database(database_url)
    workspace = f"bench-{uuid.uuid4().hex[:8]}"
    key = db.create_key(workspace)
    db.close()
    port = free_port()
    server = start_server(database_url, port, workers)
    bodies = build_bodies(200, args.results_per_report)
    # The idle server's own CPU (event loop, timers, the rollup job finding nothing to do),
    # measured before the load: subtracted from the time waited for the fold below.
    idle_started, idle_cpu = time.monotonic(), cpu_seconds(server.pid)
    time.sleep(0 if args.smoke else IDLE_SECONDS)
    idle_rate = (cpu_seconds(server.pid) - idle_cpu) / max(time.monotonic() - idle_started, 1e-9)
    cpu_before = cpu_seconds(server.pid)
    client_before = time.process_time()
    try:
        tally, elapsed = asyncio.run(
            run_load(f"http://127.0.0.1:{port}", workspace, key, args, bodies)
        )
        client_cpu = time.process_time() - client_before
        load_cpu = cpu_seconds(server.pid) - cpu_before
        waited = None if args.smoke else wait_for_fold(database_url, time.time())
        server_cpu = cpu_seconds(server.pid) - cpu_before
        if waited is not None:
            server_cpu = max(load_cpu, server_cpu - idle_rate * waited)
        batch = mean_batch(f"http://127.0.0.1:{port}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)

    ok = len(tally.acknowledged)
    rps = ok / elapsed
    p50 = percentile(tally.latencies, 0.50) * 1000
    p99 = percentile(tally.latencies, 0.99) * 1000
    mode = f"open loop at {args.rate:.0f}/s offered" if args.rate else "closed loop"
    print(
        f"ingest ({workers} worker{'s' if workers > 1 else ''}): {args.clients} clients, "
        f"{mode}, {args.duration:.0f} s, "
        f"{args.results_per_report} results/report, body ~{statistics.mean(map(len, bodies)):.0f} B"
    )
    print(f"  requests: {sum(tally.statuses.values())}  statuses: {dict(tally.statuses)}")
    print(f"  throughput: {rps:.0f} reports/s (2xx)")
    print(
        f"  latency: p50 {p50:.1f} ms  p99 {p99:.1f} ms  "
        f"max {max(tally.latencies, default=0) * 1000:.1f} ms"
    )
    if ok:
        print(
            f"  server CPU: {server_cpu / elapsed * 100:.0f}% of one core, "
            f"{server_cpu / ok * 1000:.2f} ms per report; load generator CPU: "
            f"{client_cpu / elapsed * 100:.0f}% of one core"
        )
    if waited is not None and ok:
        print(
            f"  server CPU includes the rollup job folding the run (waited {waited:.0f} s, "
            f"idle CPU {idle_rate * 100:.1f}% of a core subtracted); during the load alone: "
            f"{load_cpu / ok * 1000:.2f} ms per report"
        )
    if batch is not None:
        print(f"  group commit: {batch:.1f} reports per transaction on average")
    problems = check_stored(database_url, workspace, tally.acknowledged)
    print(f"  stored exactly once: {'yes' if not problems else '; '.join(problems)}")
    cpu_ms = server_cpu / ok * 1000 if ok else float("inf")
    return Measured(rps, p99, cpu_ms, problems)


if __name__ == "__main__":
    sys.exit(main())
