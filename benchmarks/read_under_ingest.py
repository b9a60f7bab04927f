"""Ingest latency while a dashboard re-reads a large `inference-stats`, on `mmagg serve`.

Copies a database seeded by `benchmarks/read.py --database FILE`, starts `mmagg serve` on the
copy as a subprocess, and for `--duration` seconds runs 4 paced ingest clients (a report, then
10 ms of rest) twice: alone, then beside a client that re-reads the 24-hour
`GET /bench/inference-stats` in a loop. Prints ingest reports/s and p50/p99, and how many reads
finished and their median time. With `--old-src DIR` (e.g. `git archive <commit> src | tar -x
-C DIR`), the same runs are made first with that tree's server, for a before/after:

    python benchmarks/read.py --database /tmp/read.db --repeat 1
    mkdir -p /tmp/old && git archive HEAD~3 src | tar -x -C /tmp/old
    python benchmarks/read_under_ingest.py /tmp/read.db --old-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ingest import build_bodies, free_port
from mmagg.server.db import Database

CLIENTS = 4


def serve(database: Path, source: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    port = free_port()
    command = [sys.executable, "-c", "from mmagg.cli import main; main()", "serve"]
    command += ["--port", str(port), "--database-url", f"sqlite:///{database}"]
    process = subprocess.Popen(
        [*command, "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("mmagg serve did not start")


async def load(
    base: str, key: str, bodies: list[bytes], duration: float, reads: bool
) -> tuple[list[float], list[float]]:
    latencies: list[float] = []
    read_times: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.perf_counter() + duration

    async def ingest(first: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
            index = first
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                body = bodies[index % len(bodies)]
                answer = await http.post(
                    "/bench/inference-stats",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)
                index += CLIENTS
                await asyncio.sleep(0.01)

    async def reader() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as http:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                (await http.get("/bench/inference-stats")).raise_for_status()
                read_times.append(time.perf_counter() - started)

    jobs = [ingest(n) for n in range(CLIENTS)] + ([reader()] if reads else [])
    await asyncio.gather(*jobs)
    return latencies, read_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path, help="a file seeded by benchmarks/read.py")
    parser.add_argument("--old-src", type=Path, help="an older mmagg src/ tree to run first")
    parser.add_argument("--duration", type=float, default=15.0)
    args = parser.parse_args()
    bodies = build_bodies(2_000, 8)
    variants = [("before", args.old_src)] if args.old_src else []
    variants.append(("now", None))
    with tempfile.TemporaryDirectory() as directory:
        for name, source in variants:
            copy = Path(directory) / f"{name}.db"
            shutil.copyfile(args.database, copy)
            db = Database(f"sqlite:///{copy}")
            key = db.create_key("bench", {"ingest", "read"})
            db.close()
            process, base = serve(copy, source)
            try:
                for reads in (False, True):
                    latencies, read_times = asyncio.run(
                        load(base, key, bodies, args.duration, reads)
                    )
                    latencies.sort()
                    p50 = latencies[len(latencies) // 2] * 1000
                    p99 = latencies[int(len(latencies) * 0.99)] * 1000
                    line = (
                        f"{name:6} {'with' if reads else 'no':>4} reads: ingest "
                        f"{len(latencies) / args.duration:4.0f}/s p50 {p50:5.1f} ms "
                        f"p99 {p99:5.1f} ms"
                    )
                    if reads:
                        line += (
                            f" | {len(read_times)} inference-stats reads, median "
                            f"{statistics.median(read_times) * 1000:.0f} ms"
                        )
                    print(line, flush=True)
            finally:
                process.terminate()
                process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
