"""More than one process on one database, over real HTTP (issue 15): two `mmagg serve`
instances on one PostgreSQL database, and `mmagg serve --workers 2` on PostgreSQL and on a
SQLite file. Idempotency-Key dedup, dashboard sessions, the failed-key-check limit and the
retention job must behave as with one process."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result

from mmagg.server import Database, rollups
from mmagg.server.tables import alert_lease, reports, workspaces

URL_RE = re.compile(r"mmagg backend on (http://127\.0\.0\.1:\d+)")
FAILURES = 3  # per minute and client: the limit the instances share
REDIS_DB = 13  # a database of its own on the shared Redis; the test deletes its key


@dataclass
class Serve:
    """A `mmagg serve` subprocess (its own process group) and where it listens."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        """Pids of the worker processes (`--workers N`)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def stop(self, signum: int = signal.SIGINT, *, group: bool = True) -> int:
        """Send `signum` (to the whole group, as Ctrl-C does) and return the exit status."""
        if self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise


def start_serve(database_url: str, log: Path, *args: str) -> Serve:
    """`mmagg serve --port 0 ...`; returns once it answers /healthz."""
    command = [sys.executable, "-c", "from mmagg.cli import main; main()", "serve"]
    command += ["--port", "0", "--database-url", database_url, "--log-level", "warning", *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = URL_RE.search(log.read_text(errors="replace"))
        if found:
            try:
                if httpx.get(f"{found.group(1)}/healthz", timeout=2).status_code == 200:
                    return Serve(process, found.group(1), log)
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    pytest.fail(f"mmagg serve did not come up: {log.read_text(errors='replace')}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone too) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def two_instances(fresh_pg_url: str, tmp_path: Path) -> Iterator[tuple[Serve, Serve, str]]:
    """Instances A and B of `mmagg serve` on one PostgreSQL database, and a key."""
    db = Database(fresh_pg_url)
    key = db.create_key("acme", {"ingest", "read"})
    db.close()
    options = ("--retention-days", "30", "--login-failures-per-minute", str(FAILURES))
    first = start_serve(fresh_pg_url, tmp_path / "a.log", *options)
    try:
        second = start_serve(fresh_pg_url, tmp_path / "b.log", *options)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second, key
    finally:
        # One process re-raises Ctrl-C once it has shut down: 130 is its clean stop.
        assert second.stop() in (0, 130), second.output()
        assert first.stop() in (0, 130), first.output()


def _stored(database_url: str, workspace: str = "acme") -> list[str | None]:
    """The Idempotency-Keys of the reports stored in `workspace`, one per report."""
    db = Database(database_url, migrate_schema=False)
    try:
        with db.read() as conn:
            return list(
                conn.execute(
                    sa.select(reports.c.idempotency_key)
                    .join(workspaces, workspaces.c.id == reports.c.workspace_id)
                    .where(workspaces.c.name == workspace)
                ).scalars()
            )
    finally:
        db.close()


def _post(base_url: str, key: str, body: dict[str, object], idempotency_key: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/acme/inference-stats",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key},
        timeout=30,
    )


def _race_each_key_to_both(
    first: Serve, second: Serve, key: str, bodies: dict[str, dict[str, object]], keys: list[str]
) -> None:
    """Send each Idempotency-Key to both instances at once (`bodies` by base URL); every
    answer is 200, and of each pair one stored and one replayed the same report."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(
                lambda job: _post(job[0], key, bodies[job[0]], job[1]),
                [(server.base_url, k) for k in keys for server in (first, second)],
            )
        )
    assert [answer.status_code for answer in answers] == [200] * (2 * len(keys))
    for n in range(len(keys)):
        pair = answers[2 * n : 2 * n + 2]
        assert pair[0].json()["report_id"] == pair[1].json()["report_id"]
        assert sorted(a.headers.get("idempotent-replayed", "") for a in pair) == ["", "true"]


def test_same_idempotency_key_on_two_instances_is_stored_once(
    two_instances: tuple[Serve, Serve, str], fresh_pg_url: str
) -> None:
    first, second, key = two_instances
    body = report([result("person", 0.9)], device_id="cam-1")
    keys = [f"retry-{n}" for n in range(20)]
    # Each key sent to both instances at the same moment: the race a client's retry through
    # a load balancer makes.
    _race_each_key_to_both(first, second, key, {first.base_url: body, second.base_url: body}, keys)
    assert sorted(k or "" for k in _stored(fresh_pg_url)) == sorted(keys)


def test_one_key_filed_on_two_days_on_two_instances_is_stored_once(
    two_instances: tuple[Serve, Serve, str], fresh_pg_url: str
) -> None:
    """The same race, but the two copies of each key carry different timestamps (a retry
    whose naive timestamp is filed at its own receive time): A files its copy two days ago,
    B files its copy now, in partitions of different days of `reports`, which no unique
    constraint spans (schema step 11); still one report per key."""
    first, second = two_instances[:2]
    key = two_instances[2]
    now = datetime.now(timezone.utc)
    bodies = {
        first.base_url: report([result("person", 0.9)], timestamp=now - timedelta(days=2)),
        second.base_url: report([result("person", 0.9)], timestamp=now - timedelta(seconds=2)),
    }
    keys = [f"days-{n}" for n in range(20)]
    _race_each_key_to_both(first, second, key, bodies, keys)
    assert sorted(k or "" for k in _stored(fresh_pg_url)) == sorted(keys)


def test_a_session_from_one_instance_is_valid_on_the_other(
    two_instances: tuple[Serve, Serve, str],
) -> None:
    first, second, key = two_instances
    with httpx.Client(base_url=first.base_url, timeout=10) as on_a:
        assert on_a.post("/dashboard/api/login", json={"api_key": key}).status_code == 200
        cookie = on_a.cookies["mmagg_session"]
    with httpx.Client(base_url=second.base_url, timeout=10) as on_b:
        on_b.cookies.set("mmagg_session", cookie)
        assert on_b.get("/dashboard/api/me").json() == {"workspace": "acme"}
        assert on_b.post("/dashboard/api/logout").status_code == 200
    # Logged out on B: gone on A too.
    with httpx.Client(base_url=first.base_url, timeout=10) as on_a:
        on_a.cookies.set("mmagg_session", cookie)
        assert on_a.get("/dashboard/api/me").status_code == 401


def _spread_failures(first: Serve, second: Serve, key: str) -> list[int]:
    """FAILURES wrong keys alternately on A and B, then the right key on each."""
    statuses = []
    for n in range(FAILURES):
        server = (first, second)[n % 2]
        login = httpx.post(
            f"{server.base_url}/dashboard/api/login", json={"api_key": f"mmk_wrong{n}"}
        )
        statuses.append(login.status_code)
    for server in (second, first):
        statuses.append(httpx.get(f"{server.base_url}/", params={"api_key": key}).status_code)
    return statuses


def test_failed_logins_on_two_instances_share_one_limit(
    two_instances: tuple[Serve, Serve, str],
) -> None:
    first, second, key = two_instances
    # As one process: FAILURES failures allowed, then refused even with the right key.
    assert _spread_failures(first, second, key) == [401] * FAILURES + [429, 429]


def test_failed_logins_share_one_limit_in_redis(fresh_pg_url: str, tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    connection = redis.Redis.from_url(redis_url)
    try:
        connection.ping()
    except redis.RedisError as error:
        connection.close()
        pytest.skip(f"Redis not reachable at 127.0.0.1:6379 ({error})")
    bucket = "mmagg:failures:login:127.0.0.1"
    connection.delete(bucket)
    db = Database(fresh_pg_url)
    key = db.create_key("acme", {"ingest", "read"})
    db.close()
    options = ("--login-failures-per-minute", str(FAILURES), "--redis-url", redis_url)
    first = start_serve(fresh_pg_url, tmp_path / "a.log", *options)
    second = start_serve(fresh_pg_url, tmp_path / "b.log", *options)
    try:
        assert _spread_failures(first, second, key) == [401] * FAILURES + [429, 429]
        assert connection.exists(bucket)
        with Database(fresh_pg_url, migrate_schema=False).engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM failure_buckets")).scalar() == 0
    finally:
        assert second.stop() in (0, 130) and first.stop() in (0, 130)
        connection.delete(bucket)
        connection.close()


def _retention_runs(server: Serve) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("mmagg_retention_runs_total "):
            return float(line.split()[1])
    return 0.0


def test_retention_runs_in_one_instance(
    two_instances: tuple[Serve, Serve, str], fresh_pg_url: str
) -> None:
    first, second, _ = two_instances
    deadline = time.monotonic() + 10
    while _retention_runs(first) + _retention_runs(second) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # time enough for a second pass, were there one
    assert sorted([_retention_runs(first), _retention_runs(second)]) == [0.0, 1.0]
    db = Database(fresh_pg_url, migrate_schema=False)
    try:
        with db.read() as conn:
            holders = conn.execute(
                sa.select(alert_lease.c.holder).where(alert_lease.c.name == "retention")
            ).all()
    finally:
        db.close()
    assert len(holders) == 1


def _metric(server: Serve, name: str) -> float | None:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_one_instance_folds_the_rollups_and_reads_stay_exact(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    """Two instances: one (the rollup lease's holder) folds the reports both stored into
    the rollups; both read every result exactly, before and after the fold."""
    now = time.time()
    db = Database(fresh_pg_url)
    key = db.create_key("acme", {"ingest", "read"})
    with db.write() as conn:  # nothing is stored yet: any watermark holds
        rollups.set_watermark(conn, math.floor((now - 900) / 60) * 60)
        # The test holds the rollup lease until the reports are in, so that no fold
        # runs before (the reports would be late then, rolled up as they are stored).
        conn.execute(
            sa.insert(alert_lease).values(name="rollups", holder="test", expires_at=now + 600)
        )
    db.close()
    first = start_serve(fresh_pg_url, tmp_path / "a.log")
    try:
        second = start_serve(fresh_pg_url, tmp_path / "b.log")
        try:
            sent = 0
            for n in range(40):  # 10 minutes ago to 2 minutes ago: after the watermark
                when = datetime.fromtimestamp(now - 600 + n * 12, timezone.utc)
                body = report([result("car", 0.25), result("person", 0.75)], timestamp=when)
                server = (first, second)[n % 2]
                assert _post(server.base_url, key, body, f"fold-{n}").status_code == 200
                sent += 1
            start = datetime.fromtimestamp(now - 1200, timezone.utc).isoformat()
            end = datetime.fromtimestamp(now + 1, timezone.utc).isoformat()

            def counts(server: Serve) -> dict[str, int]:
                answer = httpx.get(
                    f"{server.base_url}/acme/inference-stats",
                    params={"startTime": start, "endTime": end},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
                stats = answer.json()["inference_stats"]
                return {item["predicted_class"]: item["num_inferences"] for item in stats}

            for server in (first, second):
                assert counts(server) == {"car": sent, "person": sent}  # from raw rows
                assert _metric(server, "mmagg_rollup_folded_results_total") == 0.0
            db = Database(fresh_pg_url, migrate_schema=False)
            try:
                with db.write() as conn:
                    conn.execute(sa.delete(alert_lease).where(alert_lease.c.name == "rollups"))
            finally:
                db.close()
            deadline = time.monotonic() + 30
            folded: list[float] = [0.0, 0.0]
            while sum(folded) < 2 * sent and time.monotonic() < deadline:
                for server in (first, second):
                    assert counts(server) == {"car": sent, "person": sent}
                folded = [
                    _metric(server, "mmagg_rollup_folded_results_total") or 0.0
                    for server in (first, second)
                ]
                time.sleep(0.2)
            assert sorted(folded) == [0.0, 2.0 * sent], (first.output(), second.output())
            for server in (first, second):
                assert counts(server) == {"car": sent, "person": sent}
                # Every instance's gauge follows the watermark (at its next look).
                lag = _metric(server, "mmagg_rollup_lag_seconds")
                while lag is not None and lag >= 120 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    lag = _metric(server, "mmagg_rollup_lag_seconds")
                assert lag is not None and lag < 120
        finally:
            assert second.stop() in (0, 130), second.output()
    finally:
        assert first.stop() in (0, 130), first.output()
    db = Database(fresh_pg_url, migrate_schema=False)
    try:
        with db.read() as conn:
            assert rollups.complete_before(conn) > now - 120
            rolled = conn.execute(
                sa.text("SELECT SUM(results) FROM rollups WHERE level = 60")
            ).scalar()
    finally:
        db.close()
    assert rolled == 2 * sent


@pytest.fixture(params=["sqlite", "postgresql"])
def workers_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'workers.db'}"
    url: str = request.getfixturevalue("fresh_pg_url")
    return url


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_workers_store_concurrent_reports_once_and_stop_cleanly(
    workers_url: str, tmp_path: Path, stop_with: int
) -> None:
    db = Database(workers_url)
    key = db.create_key("acme", {"ingest", "read"})
    db.close()
    served = start_serve(workers_url, tmp_path / "serve.log", "--workers", "2")
    workers = served.workers()
    try:
        assert len(workers) == 2
        body = report([result("car", 0.8), result("person", 0.7)], device_id="cam-2")
        keys = [uuid.uuid4().hex for _ in range(120)]

        def send(idempotency_key: str) -> int:
            return _post(served.base_url, key, body, idempotency_key).status_code

        # Six clients; every report is sent twice (a retry), so a duplicate could slip in.
        with ThreadPoolExecutor(max_workers=6) as pool:
            statuses = list(pool.map(send, keys + keys))
        assert statuses == [200] * len(statuses)
        stored = _stored(workers_url)
        assert sorted(k or "" for k in stored) == sorted(keys)
    finally:
        # SIGINT to the group is Ctrl-C in a terminal; SIGTERM goes to the supervisor only.
        status = served.stop(stop_with, group=stop_with == signal.SIGINT)
    assert status == 0, served.output()
    assert not [pid for pid in workers if alive(pid)]
    output = served.output()
    assert output.count("mmagg backend on") == 1 and "2 worker processes" in output
    assert "Application startup complete" not in output


def test_a_dead_worker_stops_the_serve_with_an_error(tmp_path: Path) -> None:
    served = start_serve(f"sqlite:///{tmp_path / 'dead.db'}", tmp_path / "s.log", "--workers", "2")
    workers = served.workers()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    try:
        status = served.process.wait(timeout=30)
    finally:
        if served.process.poll() is None:
            served.stop(signal.SIGKILL)
    assert status == 1
    assert f"worker 1 (pid {workers[0]}) stopped with signal SIGKILL" in served.output()
    assert not [pid for pid in workers if alive(pid)]


def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    served = start_serve(f"sqlite:///{tmp_path / 'kill.db'}", tmp_path / "s.log", "--workers", "2")
    workers = served.workers()
    assert len(workers) == 2
    served.process.send_signal(signal.SIGKILL)
    served.process.wait()
    deadline = time.monotonic() + 10
    while [pid for pid in workers if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


def test_workers_refuse_an_in_memory_database(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "from mmagg.cli import main; main()", "serve"]
    completed = subprocess.run(
        [*command, "--port", "0", "--workers", "2", "--database-url", "sqlite://"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "in-memory SQLite database cannot be shared" in completed.stderr


def test_an_unreachable_redis_is_refused_at_start(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    command = [sys.executable, "-c", "from mmagg.cli import main; main()", "serve"]
    completed = subprocess.run(
        [
            *command,
            "--port",
            "0",
            "--database-url",
            f"sqlite:///{tmp_path / 'r.db'}",
            "--redis-url",
            "redis://:s3cret@127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "cannot reach Redis at" in completed.stderr
    assert "s3cret" not in completed.stderr
