"""Shared state in Redis: what it costs the video loop and Redis, and whether N processes
produce exactly one report per interval.

1. Caller-thread cost per frame of ``ModelMonitoringInferenceAggregatorBlockV1.run()``
   (30 detections over 20 classes per frame, ``frequency=1``, background reporting to a
   loopback server) with the Redis store against the memory store, at a paced frame rate.
   Target: Redis / memory <= 1.2.
2. Redis commands per second from one process (``INFO commandstats`` of a private
   ``redis-server``), paced and as fast as the loop can go. Target: <= 4/s at any rate.
3. End to end: 8 spawned processes stream through the block with one aggregator key and
   ``frequency=1``; reports received per interval. Target: exactly 1 (no two reports in
   one interval, no interval without a report).

    python benchmarks/redis_scale.py            # 10 s per phase
    python benchmarks/redis_scale.py --smoke    # a few seconds per phase, for CI
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from datetime import datetime
from typing import Any

import numpy as np
import redis

try:
    warnings.filterwarnings("ignore", message="OpenCV")
    import supervision as sv
except ImportError:  # pragma: no cover - dict frames instead
    sv = None

from _support import start_capture, verdict  # noqa: E402
from mmagg import MemoryCache  # noqa: E402
from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1  # noqa: E402
from mmagg.stores import MemoryStore, Store  # noqa: E402
from mmagg.stores.redis import RedisStore  # noqa: E402

CLASSES = np.array([f"class_{i:02d}" for i in range(20)])
PER_FRAME = 30
FPS = 60


#: Send times of the reports the capture server received (the reports' own timestamps,
#: taken right after the claim: arrival times are delayed by a variable amount when busy).
REPORTS: list[float] = []
REPORTS_LOCK = threading.Lock()


def _record(body: dict[str, Any]) -> None:
    sent = datetime.fromisoformat(body["timestamp"])
    if sent.tzinfo is None:
        sent = sent.astimezone()
    with REPORTS_LOCK:
        REPORTS.append(sent.timestamp())


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or "redis-server"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(250):
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except redis.RedisError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def make_frames(n: int, seed: int = 0) -> list[Any]:
    """``sv.Detections`` frames (vectorised path) when supervision is installed, else dicts."""
    rng = np.random.default_rng(seed)
    frames: list[Any] = []
    for i in range(n):
        class_id = rng.integers(0, len(CLASSES), PER_FRAME)
        conf = rng.beta(5, 2, PER_FRAME)
        if sv is not None:
            det = sv.Detections(
                xyxy=rng.random((PER_FRAME, 4)) * 640,
                confidence=conf.astype(np.float32),
                class_id=class_id,
            )
            det.data["class_name"] = CLASSES[class_id]
            det.data["inference_id"] = np.full(PER_FRAME, f"frame-{seed}-{i}")
            det.data["prediction_type"] = np.full(PER_FRAME, "object-detection")
            frames.append(det)
            continue
        items = [
            {"class": str(name), "confidence": float(c)}
            for name, c in zip(CLASSES[class_id], conf, strict=True)
        ]
        frames.append(
            {
                "inference_id": f"frame-{seed}-{i}",
                "prediction_type": "object-detection",
                "predictions": items,
            }
        )
    return frames


def make_block(store: Store, api_base_url: str) -> ModelMonitoringInferenceAggregatorBlockV1:
    return ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key="bench",
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=api_base_url,
        store=store,
    )


def stream(
    block: ModelMonitoringInferenceAggregatorBlockV1,
    frames: list[Any],
    key: str,
    seconds: float,
    fps: float | None,
) -> list[float]:
    """Run frames through the block for ``seconds``; the caller-thread time of each call."""
    costs = []
    period = 1.0 / fps if fps else 0.0
    started = time.perf_counter()
    next_at = started
    i = 0
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        block.run(True, frames[i % len(frames)], 1, key, "bench/1")
        costs.append(time.perf_counter() - t0)
        i += 1
        if period:
            next_at += period
            time.sleep(max(0.0, next_at - time.perf_counter()))
    return costs


#: What a client sends; ``INFO commandstats`` also counts the commands Lua scripts run.
CLIENT_COMMANDS = ("evalsha", "eval", "script", "hello", "client", "ping", "select", "auth")


def commands(url: str) -> tuple[int, int]:
    """(commands clients sent, commands run inside scripts) since the last reset."""
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    sent = inside = 0
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_").split("|")[0]
        if command in ("info", "config"):
            continue
        if command in CLIENT_COMMANDS:
            sent += int(value["calls"])
        else:
            inside += int(value["calls"])
    return max(0, sent - 1), inside  # minus the HELLO of this very connection


def reset_stats(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        client.config_resetstat()


def caller_cost(url: str, api_base_url: str, seconds: float) -> dict[str, Any]:
    frames = make_frames(64)
    results: dict[str, list[float]] = {"memory": [], "redis": []}
    redis_store = RedisStore(url)
    memory_store = MemoryStore()
    rounds = 2
    for r in range(rounds):
        for name, store in (("memory", memory_store), ("redis", redis_store)):
            block = make_block(store, api_base_url)
            key = f"cost-{name}-{r}-{uuid.uuid4().hex[:6]}"
            stream(block, frames, key, 0.5, FPS)  # warm up
            results[name] += stream(block, frames, key, seconds / rounds, FPS)
            block.reporter(key).close()
    redis_store.close()
    summary: dict[str, Any] = {}
    for name, costs in results.items():
        summary[name] = {
            "frames": len(costs),
            "mean_us": statistics.fmean(costs) * 1e6,
            "median_us": statistics.median(costs) * 1e6,
            "p99_us": float(np.percentile(costs, 99)) * 1e6,
        }
    summary["ratio_mean"] = summary["redis"]["mean_us"] / summary["memory"]["mean_us"]
    summary["ratio_median"] = summary["redis"]["median_us"] / summary["memory"]["median_us"]
    return summary


def command_rate(url: str, api_base_url: str, seconds: float, fps: float | None) -> dict[str, Any]:
    frames = make_frames(64, seed=1)
    store = RedisStore(url)
    block = make_block(store, api_base_url)
    key = f"rate-{uuid.uuid4().hex[:6]}"
    stream(block, frames, key, 0.5, fps)  # connections and scripts in place
    reset_stats(url)
    started = time.perf_counter()
    costs = stream(block, frames, key, seconds, fps)
    elapsed = time.perf_counter() - started
    calls, inside = commands(url)
    block.reporter(key).close()
    store.close()
    return {
        "fps": round(len(costs) / elapsed),
        "commands_per_s": calls / elapsed,
        "script_ops_per_s": inside / elapsed,
        "round_trips": store.counters()["round_trips"],
    }


def _replica(
    url: str, api_base_url: str, key: str, seed: int, seconds: float, ready: Any, go: Any
) -> None:
    frames = make_frames(16, seed=seed)
    block = make_block(RedisStore.for_url(url), api_base_url)
    block.run(True, None, 1, key, "bench/1")  # warm up
    ready.put(seed)
    go.wait(120)
    stream(block, frames, key, seconds, 30)


def end_to_end(url: str, api_base_url: str, processes: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    key = f"e2e-{uuid.uuid4().hex[:6]}"
    procs = [
        ctx.Process(target=_replica, args=(url, api_base_url, key, i, seconds, ready, go))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    with REPORTS_LOCK:
        REPORTS.clear()
    reset_stats(url)
    started = time.time()
    go.set()
    time.sleep(seconds)
    stopped = time.time()
    calls, _ = commands(url)
    with REPORTS_LOCK:
        during = sorted(t for t in REPORTS if started <= t < stopped - 0.2)
    for proc in procs:
        proc.join(timeout=30)
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    # Interval k of the shared clock is [first + k, first + k + 1): reports per interval.
    per_interval: list[int] = []
    if during:
        first = during[0]
        n = int((during[-1] - first) // 1.0) + 1
        per_interval = [0] * n
        for t in during:
            per_interval[min(n - 1, int((t - first) // 1.0))] += 1
    return {
        "processes": processes,
        "seconds": seconds,
        "reports": len(during),
        "per_interval_min": min(per_interval, default=0),
        "per_interval_max": max(per_interval, default=0),
        "min_gap_s": min(gaps, default=float("nan")),
        "max_gap_s": max(gaps, default=float("nan")),
        "commands_per_s_per_process": calls / seconds / processes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds per phase")
    parser.add_argument("--redis-url", help="use this Redis (flushes nothing; own by default)")
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args()
    seconds = 3.0 if args.smoke else 10.0
    server, api_base_url = start_capture(_record)
    proc = None
    if args.redis_url:
        url = args.redis_url
    else:
        proc, url = start_redis()
    try:
        cost = caller_cost(url, api_base_url, seconds)
        paced = command_rate(url, api_base_url, seconds, FPS)
        flat_out = command_rate(url, api_base_url, seconds, None)
        e2e = end_to_end(url, api_base_url, args.processes, max(seconds, 5.0))
    finally:
        server.shutdown()
        if proc is not None:
            proc.kill()
            proc.wait()
    print(f"caller cost per frame at {FPS} fps ({PER_FRAME} detections, block.run):")
    for name in ("memory", "redis"):
        c = cost[name]
        print(
            f"  {name:6}  mean {c['mean_us']:7.1f} us  median {c['median_us']:7.1f} us  "
            f"p99 {c['p99_us']:8.1f} us  ({c['frames']} frames)"
        )
    print(
        f"  redis/memory: mean {cost['ratio_mean']:.2f}x  median {cost['ratio_median']:.2f}x"
        "  (target <= 1.2x)"
    )
    print("Redis commands per second, one process (target <= 4/s):")
    for label, rate in (("paced", paced), ("flat out", flat_out)):
        print(
            f"  {label:8}  {rate['fps']:6d} fps  {rate['commands_per_s']:.2f} commands/s  "
            f"({rate['round_trips']} script calls; {rate['script_ops_per_s']:.0f} ops/s inside)"
        )
    print(f"end to end, {e2e['processes']} processes, frequency 1 s, {e2e['seconds']:.0f} s:")
    print(
        f"  {e2e['reports']} reports; per interval min {e2e['per_interval_min']} "
        f"max {e2e['per_interval_max']} (target exactly 1); gaps "
        f"{e2e['min_gap_s']:.3f}..{e2e['max_gap_s']:.3f} s; "
        f"{e2e['commands_per_s_per_process']:.2f} commands/s per process"
    )
    # Exactly one report per interval is correctness, judged in smoke mode too; the rest
    # are speed targets, judged only in a full run.
    correct = e2e["per_interval_min"] == e2e["per_interval_max"] == 1
    judged = verdict(
        [
            ("redis/memory mean <= 1.2x", cost["ratio_mean"] <= 1.2),
            ("redis/memory median <= 1.2x", cost["ratio_median"] <= 1.2),
            ("paced <= 4 commands/s", paced["commands_per_s"] <= 4.0),
            ("flat out <= 4 commands/s", flat_out["commands_per_s"] <= 4.0),
        ],
        smoke=args.smoke,
    )
    if not correct:
        print("FAILED: not exactly one report per interval")
    return 0 if correct and judged else 1


if __name__ == "__main__":
    sys.exit(main())
