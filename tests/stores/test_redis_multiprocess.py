"""Four OS processes, one aggregator key, one Redis: one report per interval, nothing lost.

Each process streams its own predictions through the Workflows block (frequency 1 s) and
logs what it handed over and when. Redis is killed half-way and restarted empty.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from redis_workers import stream_through_block  # tests/stores is on sys.path

PROCESSES = 4
FREQUENCY = 1.0
PUSH_INTERVAL = 0.25
HEALTHY = 4.5  # seconds of streaming before Redis is killed
OUTAGE = 1.5  # seconds Redis stays down
DURATION = 10.5  # seconds each process streams
#: Reporting latency allowed beyond one interval and one push: the block polls its cache
#: gate once per frame, the background sender needs a moment, Redis reconnects within 1 s.
SLACK = 1.5
#: Predictions Redis held when it was killed are gone (it restarts empty, no persistence).
LOST_BEFORE_KILL = FREQUENCY + PUSH_INTERVAL + 0.5


def test_four_processes_share_one_aggregation(
    own_redis: Any, capture_server: Any, tmp_path: Path
) -> None:
    capture_server.workspace = "w"
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    key = f"yard-{uuid.uuid4().hex[:8]}"
    # Each class's best, sent early in the healthy phase: at least one report interval before
    # the predictions Redis may lose with its death (the test asserts every best is reported).
    champions = {"car": 0.8, "person": 1.1, "dog": 1.4}
    procs = []
    for i in range(PROCESSES):
        mine = {name: at for j, (name, at) in enumerate(champions.items()) if j % PROCESSES == i}
        mine[f"only-{i}"] = 0.9 + 0.15 * i
        assert max(mine.values()) <= HEALTHY - LOST_BEFORE_KILL - FREQUENCY
        args = (
            own_redis.url,
            capture_server.url,
            key,
            i,
            DURATION,
            str(tmp_path / f"worker-{i}.jsonl"),
            ready,
            go,
            mine,
        )
        procs.append(ctx.Process(target=stream_through_block, args=args))
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    started = time.time()
    time.sleep(HEALTHY)
    killed = time.time()
    own_redis.kill()
    time.sleep(OUTAGE)
    own_redis.start()
    restarted = time.time()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    predictions, summaries = [], []
    for i in range(PROCESSES):
        for line in (tmp_path / f"worker-{i}.jsonl").read_text().splitlines():
            record = json.loads(line)
            (summaries if record.get("done") else predictions).append(record)
    assert len(summaries) == PROCESSES
    for summary in summaries:
        assert summary["errors"] == []  # no exception, no error status in the video loop
        assert summary["healthy"] is True  # rejoined
    assert sum(s["counters"]["outages"] for s in summaries) >= 1

    posts = capture_server.posts
    assert all(p.path == "/w/inference-stats" for p in posts)
    # When each report was sent: its own timestamp, taken right after the claim (arrival
    # times add the loopback's variable delay on a busy machine).
    reports = sorted(
        ((_sent_at(p.json()), p.json()["inference_results"]) for p in posts),
        key=lambda report: report[0],
    )
    first_stop = min(s["stopped"] for s in summaries)
    print("reports at", [round(at - started, 2) for at, _ in reports])
    print("killed", round(killed - started, 2), "restarted", round(restarted - started, 2))
    print("stopped", [round(s["stopped"] - started, 2) for s in summaries])
    for s in summaries:
        print(s["messages"], s["counters"])

    # One report per interval while Redis is up (final flushes at shutdown excluded).
    for lo, hi in ((started, killed), (restarted + 1.0, first_stop)):
        times = [at for at, _ in reports if lo <= at < hi]
        assert len(times) >= 2, (lo, hi, times)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) >= FREQUENCY - 0.02, gaps  # claims are >= 1 s apart on Redis TIME

    # Nothing reported twice and nothing reported that no process saw.
    seen: dict[tuple[str, str], set[float]] = {}
    for p in predictions:
        seen.setdefault((p["inference_id"], p["class_name"]), set()).add(p["confidence"])
    reported = [(r["inference_id"], r["class_name"]) for _, rs in reports for r in rs]
    assert len(reported) == len(set(reported))
    for _, results in reports:
        for r in results:
            assert r["model_id"] == "yard/1"
            assert r["confidence"] in seen.get((r["inference_id"], r["class_name"]), set())

    # Every prediction is covered by a later report of its class with a confidence at
    # least as high, in time; except those Redis held when it died.
    bound = FREQUENCY + PUSH_INTERVAL + SLACK
    uncovered = []
    for p in predictions:
        if killed - LOST_BEFORE_KILL <= p["at"] <= killed + 0.1:
            continue
        deadline = p["at"] + bound if p["at"] < first_stop - bound else float("inf")
        if not any(
            p["at"] <= at <= deadline
            and any(
                r["class_name"] == p["class_name"] and r["confidence"] >= p["confidence"]
                for r in results
            )
            for at, results in reports
        ):
            uncovered.append(p)
    assert uncovered == [], [
        (
            round(p["at"] - started, 2),
            p,
            [
                (round(at - started, 2), r["confidence"])
                for at, rs in reports
                for r in rs
                if r["class_name"] == p["class_name"]
            ],
        )
        for p in uncovered[:3]
    ]

    # Each class's best prediction of the whole run appears in a report.
    best: dict[str, dict[str, Any]] = {}
    for p in predictions:
        if p["confidence"] > best.get(p["class_name"], {"confidence": -1.0})["confidence"]:
            best[p["class_name"]] = p
    reported_ids = {(r["inference_id"], r["class_name"]) for _, rs in reports for r in rs}
    for name, p in best.items():
        assert (p["inference_id"], name) in reported_ids, name


def _sent_at(body: dict[str, Any]) -> float:
    sent = datetime.fromisoformat(body["timestamp"])
    return (sent if sent.tzinfo is not None else sent.astimezone()).timestamp()
