"""The `mmagg` command: `serve`, `keys create|list|revoke`, `demo`, `replay`.

Server dependencies are imported inside the commands, so `mmagg --help` (and commands that
do not need the backend) stay fast and work without the `server` extra.

Example:
    $ mmagg keys create --workspace acme
    $ mmagg serve --port 9090
    $ mmagg demo --seconds 20
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmagg import _cli_errors

DEFAULT_DATABASE_URL = "sqlite:///mmagg.db"
SERVER_MODULES = ("fastapi", "sqlalchemy", "uvicorn")

app = typer.Typer(
    name="mmagg",
    help="Model Monitoring Inference Aggregator: self-hosted backend, keys and demo.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no boxes cut at 80 columns, no `<bool>` on flags
)
keys_app = typer.Typer(
    help="Create, list and revoke API keys.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(keys_app, name="keys")

console = Console(soft_wrap=True)
# soft_wrap: a message is one line however narrow the terminal (or 80 columns in a pipe).
err_console = Console(stderr=True, soft_wrap=True)

DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar="MMAGG_DATABASE_URL",
        help="SQLAlchemy URL: sqlite:///path.db or postgresql://user@host/db.",
    ),
]


def _require(modules: tuple[str, ...], extra: str) -> None:
    """Exit with the install command when an optional dependency is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        err_console.print(
            f"[red]error:[/red] this command needs {', '.join(missing)}: "
            + escape(f"pip install 'mmagg[{extra}]'")
        )
        raise typer.Exit(2)


_KEEP_HELP = (
    "Keep the {} rollups{} this many days (at least as long as the finer data; "
    "'inf': forever); default: as long as the finer data. Reads of older ranges are "
    "answered from the rollups kept (docs/server.md, 'Old data')."
)
KeepMinuteRollups = Annotated[
    float | None,
    typer.Option(
        help=_KEEP_HELP.format("minute and 5-minute", ""), envvar="MMAGG_KEEP_MINUTE_ROLLUPS"
    ),
]
KeepHourRollups = Annotated[
    float | None,
    typer.Option(help=_KEEP_HELP.format("hour and 6-hour", " and hour median digests")),
]
KeepDayRollups = Annotated[
    float | None,
    typer.Option(help=_KEEP_HELP.format("day", " and day median digests")),
]


def _retention(
    retention_days: float | None,
    minute: float | None,
    hour: float | None,
    day: float | None,
) -> Any:
    """The retention settings, or exit 2 naming the option that does not fit."""
    from mmagg.server.app import retention_settings
    from mmagg.server.retention import RetentionError

    try:
        return retention_settings(retention_days, minute, hour, day)
    except RetentionError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None


def _database(url: str) -> Any:
    _require(SERVER_MODULES, "server")
    from mmagg.server.db import Database
    from mmagg.server.tables import SchemaTooNewError

    try:
        return Database(url)
    except SchemaTooNewError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _keys_table(*columns: str) -> Table:
    """A key listing: id, prefix and workspace never wrap, then `columns`."""
    table = Table()
    for name in ("ID", "Prefix", "Workspace"):
        table.add_column(name, no_wrap=True)
    for name in columns:
        table.add_column(name)
    return table


def _wide(target: Console) -> Console:
    """`target`, or when it is not a terminal (a pipe, a file) one wide enough that a
    table's rows stay one line each, for grep and scripts."""
    if target.is_terminal:
        return target
    return Console(file=target.file, width=max(target.width, 200))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 9090,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    body_limit: Annotated[int, typer.Option(help="Largest request body, bytes.")] = 1 << 20,
    secure_cookies: Annotated[
        bool, typer.Option(help="Mark the dashboard session cookie Secure (behind HTTPS).")
    ] = False,
    retention_days: Annotated[
        float | None,
        typer.Option(min=0, help="Delete reports older than this many days (checked hourly)."),
    ] = None,
    keep_minute_rollups: KeepMinuteRollups = None,
    keep_hour_rollups: KeepHourRollups = None,
    keep_day_rollups: KeepDayRollups = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    login_failures_per_minute: Annotated[
        int,
        typer.Option(min=1, help="Failed key checks per client address and minute before 429."),
    ] = 10,
    alerts: Annotated[
        Path | None,
        typer.Option(help="Alert rules YAML (docs/alerts.md); reloaded on SIGHUP."),
    ] = None,
    alert_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between alert rule evaluations.")
    ] = 15.0,
    trusted_proxies: Annotated[
        str,
        typer.Option(
            help="Comma-separated addresses/networks of reverse proxies whose X-Forwarded-For "
            "names the client (default: none; the header is ignored)."
        ),
    ] = "",
    header_timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a client gets to send its request headers."),
    ] = 10.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes serving the one port (POSIX). Each has its own database "
            "connections; limits, sessions and jobs are shared through the database.",
        ),
    ] = 1,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="MMAGG_SERVER_REDIS_URL",
            help="Keep the failed-key-check limit in Redis (redis://host:6379/0) instead of "
            "the database; needs the redis extra.",
        ),
    ] = None,
) -> None:
    """Run the self-hosted Model Monitoring backend (Roboflow-compatible API + dashboard)."""
    _require(SERVER_MODULES, "server")
    from mmagg.server import create_app
    from mmagg.server.clients import TrustedProxies

    _retention(retention_days, keep_minute_rollups, keep_hour_rollups, keep_day_rollups)

    try:
        TrustedProxies.parse(trusted_proxies)
    except ValueError as error:
        err_console.print(f"[red]error:[/red] --trusted-proxies: {escape(str(error))}")
        raise typer.Exit(2) from None
    if workers > 1 and _in_memory(database_url):
        err_console.print(
            "[red]error:[/red] --workers: an in-memory SQLite database cannot be shared by "
            "processes: pass --database-url sqlite:///path.db or postgresql://..."
        )
        raise typer.Exit(2)
    if redis_url is not None:
        _check_redis(redis_url)
    db = _database(database_url)  # migrates, once, before any worker starts
    if alerts is not None:
        from mmagg.server.alert_rules import RulesError, load_rules

        try:
            rule_count = len(load_rules(alerts).rules)
        except (RulesError, OSError) as error:
            err_console.print(f"[red]error:[/red] alert rules: {escape(str(error))}")
            raise typer.Exit(2) from None
        err_console.print(f"alerts: {rule_count} rules, every {alert_interval:g} s")

    def application(database: Any) -> Any:
        engine = None
        if alerts is not None:
            from mmagg.server.alerts import AlertEngine, install_sighup

            engine = AlertEngine.from_file(
                database, alerts, interval=alert_interval, external_url=f"http://{host}:{port}"
            )
            install_sighup(engine)
        return create_app(
            db=database,
            body_limit=body_limit,
            secure_cookies=secure_cookies,
            retention_days=retention_days,
            keep_minute_rollups=keep_minute_rollups,
            keep_hour_rollups=keep_hour_rollups,
            keep_day_rollups=keep_day_rollups,
            login_failures_per_minute=login_failures_per_minute,
            alerts=engine,
            trusted_proxies=trusted_proxies,
            redis_url=redis_url,
        )

    from mmagg.server.gcguard import freeze_startup_heap
    from mmagg.server.protocols import guarded_protocol
    from mmagg.server.runner import (
        BindError,
        WorkerSupervisor,
        bind_socket,
        quiet_lifecycle_logs,
        serve_on,
    )

    uvicorn_options: dict[str, Any] = {
        "access_log": access_log,
        "log_level": log_level,
        "http": guarded_protocol(header_timeout),
        # X-Forwarded-For is the app's decision (--trusted-proxies), never uvicorn's.
        "proxy_headers": False,
    }
    try:
        sock = bind_socket(host, port)  # before announcing: the printed URL is one that listens
    except BindError:
        db.close()
        raise
    bound = f"http://{host}:{sock.getsockname()[1]}"
    if workers == 1:
        served = application(db)
        err_console.print(f"mmagg backend on {bound}  (dashboard: {bound}/dashboard)")
        freeze_startup_heap()
        serve_on(sock, served, **uvicorn_options)
        return
    # Each worker opens its own connections: none may be inherited across fork.
    db.close()

    def worker(listening: Any) -> None:
        from mmagg.server.db import Database

        quiet_lifecycle_logs()
        serve_on(
            listening, application(Database(database_url, migrate_schema=False)), **uvicorn_options
        )

    err_console.print(
        f"mmagg backend on {bound}  (dashboard: {bound}/dashboard), {workers} worker processes"
    )
    if database_url.startswith("sqlite"):
        err_console.print(
            "note: SQLite takes one write at a time: more workers serve more reads, not more "
            "reports (measured in docs/scale.md); PostgreSQL scales both"
        )
    freeze_startup_heap()  # before fork: the workers share the start-up heap's pages
    supervisor = WorkerSupervisor(sock, worker, workers, report=_report_error)
    code = supervisor.run()
    err_console.print("mmagg backend stopped" if code == 0 else "mmagg backend failed")
    if code:
        raise typer.Exit(code)


def _report_error(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}")


def _in_memory(database_url: str) -> bool:
    """True for SQLite URLs without a file (`sqlite://`, `sqlite:///:memory:`)."""
    if not database_url.startswith("sqlite"):
        return False
    path = database_url.split("://", 1)[1].lstrip("/") if "://" in database_url else ""
    return path in ("", ":memory:")


def _check_redis(url: str) -> None:
    """Exit with a message naming the (password-redacted) URL when Redis is not reachable."""
    _require(("redis",), "redis")
    from mmagg.server.ratelimit import RedisFailureLimiter
    from mmagg.stores.redis import redact_url

    try:
        limiter = RedisFailureLimiter(url, timeout=2.0)
    except ValueError as error:
        err_console.print(f"[red]error:[/red] --redis-url: {escape(str(error))}")
        raise typer.Exit(2) from None
    try:
        limiter.ping()
    except Exception as error:  # any failure to talk to it: say so before serving
        err_console.print(
            f"[red]error:[/red] --redis-url: cannot reach Redis at {escape(redact_url(url))} "
            f"({type(error).__name__})"
        )
        raise typer.Exit(2) from None
    finally:
        limiter.close()


@keys_app.command("create")
def keys_create(
    workspace: Annotated[str, typer.Option(help="Workspace the key belongs to (created if new).")],
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="ingest (send reports: what a device needs), read (read endpoints and the "
            "dashboard), admin (manage keys over the API). Repeat or comma-separate. "
            "Default: ingest only.",
        ),
    ] = None,
    expires_in: Annotated[
        str | None,
        typer.Option(help="Lifetime, e.g. 90d, 12h, 30m; the key then acts as revoked."),
    ] = None,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    _require(SERVER_MODULES, "server")
    from mmagg.server.auth import DEFAULT_SCOPES, ScopeError, parse_duration, parse_scopes
    from mmagg.server.db import WorkspaceNameError

    try:
        scopes = parse_scopes(scope, field="--scope") if scope else DEFAULT_SCOPES
        lifetime = None if expires_in is None else parse_duration(expires_in, "--expires-in")
    except ScopeError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    db = _database(database_url)
    try:
        key, info = db.create_key_record(workspace, scopes, expires_in=lifetime)
    except WorkspaceNameError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    finally:
        db.close()
    expiry = "" if info.expires_at is None else f", expiring {_when(info.expires_at)}"
    err_console.print(
        f"Created a key for workspace [bold]{escape(workspace)}[/bold] with scope "
        f"[bold]{', '.join(sorted(scopes))}[/bold]{expiry}.",
        soft_wrap=True,
    )
    if "read" not in scopes:
        err_console.print(
            "It cannot read data or open the dashboard; for that, create a read key: "
            + escape(f"mmagg keys create --workspace {workspace} --scope read"),
            soft_wrap=True,
        )
    err_console.print("The key is shown only this once:")
    # The key alone on stdout, so `KEY=$(mmagg keys create ...)` works.
    print(key)


@keys_app.command("list")
def keys_list(
    workspace: Annotated[
        str | None, typer.Option(help="Only this workspace's keys (default: all).")
    ] = None,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
) -> None:
    """List keys: id, prefix, workspace, scopes, status, created, last used, expiry,
    revocation; never the keys themselves."""
    db = _database(database_url)
    try:
        rows = db.list_keys(workspace)
        now = db.clock()
    finally:
        db.close()
    table = _keys_table("Scopes", "Status", "Created", "Last used", "Expires", "Revoked")
    for info in rows:
        table.add_row(
            str(info.id),
            info.prefix + "…",
            escape(info.workspace),
            ",".join(sorted(info.scopes)) or "-",
            info.status(now),
            _when(info.created_at),
            _when(info.last_used_at),
            _when(info.expires_at),
            _when(info.revoked_at),
        )
    _wide(console).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (from `mmagg keys list`) or prefix.")],
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
) -> None:
    """Revoke ONE key; requests with it get 401 from now on.

    A prefix matching several active keys revokes nothing: the matches are listed.
    """
    from mmagg.server.db import AmbiguousKeyError

    db = _database(database_url)
    try:
        revoked = db.revoke_key(key_id)
    except AmbiguousKeyError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        table = _keys_table("Scopes", "Created", "Last used")
        for info in error.matches:
            table.add_row(
                str(info.id),
                info.prefix + "…",
                escape(info.workspace),
                ",".join(sorted(info.scopes)) or "-",
                _when(info.created_at),
                _when(info.last_used_at),
            )
        _wide(err_console).print(table)
        raise typer.Exit(1) from None
    finally:
        db.close()
    # A whole key given on the command line is not echoed back: only its public prefix.
    shown = key_id if len(key_id) <= 8 else key_id[:8] + "…"
    if not revoked:
        err_console.print(
            f"[red]error:[/red] no active key with id or prefix {escape(repr(shown))}"
        )
        raise typer.Exit(1)
    err_console.print(f"Revoked key {escape(shown)}.")


@app.command()
def prune(
    older_than: Annotated[
        float, typer.Option(min=0, help="Delete reports older than this many days.")
    ],
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    keep_minute_rollups: KeepMinuteRollups = None,
    keep_hour_rollups: KeepHourRollups = None,
    keep_day_rollups: KeepDayRollups = None,
) -> None:
    """Delete old reports and their results (and expired dashboard sessions); rollups go
    with them unless kept longer."""
    retention = _retention(older_than, keep_minute_rollups, keep_hour_rollups, keep_day_rollups)
    assert retention is not None
    bounds = retention.bounds(time.time())
    db = _database(database_url)
    try:
        removed = db.prune(before=bounds.raw, rollups_before=bounds.levels)
    finally:
        db.close()
    err_console.print(f"Deleted {removed} reports older than {older_than:g} days.")


def _results_table(result: Any) -> Table:
    halves = (
        {
            (i["model_name"], i["predicted_class"]): i
            for i in result.first_half.get("inference_stats", [])
        },
        {
            (i["model_name"], i["predicted_class"]): i
            for i in result.second_half.get("inference_stats", [])
        },
    )
    table = Table(
        title=f"Read back from {result.url}/{result.workspace}/inference-stats",
        caption="Samples: best prediction per class, source and report. Predictions: all of "
        "them (stats extension). Avg: over all predictions; median: over the samples.",
    )
    for column in ("Model", "Class"):
        table.add_column(column)
    for column in ("Samples", "Predictions", "Avg", "Median", "1st half", "2nd half"):
        table.add_column(column, justify="right")
    for item in result.stats.get("inference_stats", []):
        where = (item["model_name"], item["predicted_class"])
        first, second = (h.get(where, {}).get("predictions_avg_confidence") for h in halves)
        second_text = "-" if second is None else f"{second:.3f}"
        if first is not None and second is not None and first - second > 0.15:
            second_text = f"[bold red]{second_text} ▼[/bold red]"
        table.add_row(
            item["model_name"],
            item["predicted_class"],
            str(item["num_inferences"]),
            str(item["class_count"]),
            f"{item['predictions_avg_confidence']:.3f}",
            f"{item['median_confidence']:.3f}",
            "-" if first is None else f"{first:.3f}",
            second_text,
        )
    return table


def _print_whole(table: Table) -> None:
    """Print `table` uncut: a pipe or a file is not 80 columns wide."""
    if console.is_terminal:
        console.print(table)
        return
    wide = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, wide), soft_wrap=True).print(table)


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(min=1, help="How long to stream.")] = 20.0,
    frequency: Annotated[int, typer.Option(min=1, help="Reporting interval, seconds.")] = 2,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Keep serving afterwards (Ctrl-C stops).")
    ] = False,
    port: Annotated[int, typer.Option(help="Port for the backend; 0 picks a free one.")] = 0,
    database_url: Annotated[
        str | None,
        typer.Option(help="Where the demo stores reports; default a SQLite file in a temp dir."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed of the simulation.")] = None,
) -> None:
    """Run the backend in-process and report a SIMULATED 3-camera stream to it.

    No camera, model, API key or internet is needed: detections are synthetic.
    """
    _require(SERVER_MODULES, "server")
    _require(("supervision",), "supervision")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mmagg.server import create_app
    from mmagg.server.demo import (
        DEMO_FINISHED,
        DRIFTING_CLASS,
        FPS,
        MODEL_ID,
        SOURCES,
        WORKSPACE,
        DemoResult,
        demo_rules,
        describe_alert,
        read_back,
        run_stream,
    )
    from mmagg.server.runner import BackgroundServer

    if database_url is None:
        directory = Path(tempfile.mkdtemp(prefix="mmagg-demo-"))
        database_url = f"sqlite:///{directory / 'mmagg-demo.db'}"
    db = _database(database_url)
    # The pattern the docs recommend: the (simulated) cameras get an ingest-only key, the
    # person reading the results a read key.
    api_key = db.create_key(WORKSPACE, {"ingest"})
    read_key = db.create_key(WORKSPACE, {"read"})
    from mmagg.server.alerts import AlertEngine
    from mmagg.server.monitoring_api import add_notice

    fired: list[str] = []

    def on_alert(notes: Any) -> None:
        for note in notes:
            fired.append(note.status)
            console.print(f"[bold red]{escape(describe_alert(note))}[/bold red]")

    engine = AlertEngine(db, demo_rules(seconds, frequency), interval=1.0, on_notify=on_alert)
    application = create_app(db=db, alerts=engine)
    server = BackgroundServer(application, port=port).start()
    console.print(
        f"[bold yellow]SIMULATED STREAM[/bold yellow]: {len(SOURCES)} synthetic cameras "
        f"({', '.join(s.source_id for s in SOURCES)}) at {FPS} fps with random boxes and "
        f"beta-distributed confidences; '{DRIFTING_CLASS}' confidence drops half-way. "
        "No camera, model or internet involved."
    )
    console.print(f"Backend: {server.url}  database: {database_url}")
    if serve:  # now, not after the stream: the dashboard can be watched while it fills
        console.print(f"Dashboard: [bold]{server.url}/dashboard[/bold]  (log in with the read key)")
        console.print(f"Read key (workspace '{WORKSPACE}'): [bold]{read_key}[/bold]")
        console.print(f"Ingest key (the cameras'): [bold]{api_key}[/bold]")
    try:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("streaming", total=seconds, status="")

            def on_tick(elapsed: float, frames: int, counters: Any) -> None:
                status = (
                    f"{frames * len(SOURCES)} frames · {counters.collected} predictions · "
                    f"{counters.sent} reports sent"
                )
                if counters.failed:
                    status += f" · {counters.failed} failed"
                progress.update(task, completed=elapsed, status=status)

            frames, started, middle, counters = run_stream(
                server.url,
                api_key,
                seconds=seconds,
                frequency=frequency,
                seed=seed,
                on_tick=on_tick,
            )
        ended = time.time() + 1
        overall, first, second = read_back(
            server.url, WORKSPACE, read_key, started - 1, middle, ended
        )
        result = DemoResult(
            url=server.url,
            workspace=WORKSPACE,
            api_key=api_key,
            database_url=database_url,
            frames=frames,
            started_at=started,
            drift_at=middle,
            ended_at=ended,
            counters=counters,
            stats=overall,
            first_half=first,
            second_half=second,
        )
        add_notice(application, WORKSPACE, "demo_finished", DEMO_FINISHED, model_id=MODEL_ID)
        _print_whole(_results_table(result))
        console.print(
            f"Alerts: {fired.count('firing')} fired during the run (rules: "
            f"{', '.join(r.name for r in engine.rules.rules)}; see docs/alerts.md)"
        )
        console.print(
            f"Reports sent: {counters.sent}, failed: {counters.failed}, "
            f"retried: {counters.retried}, dropped: {dict(counters.dropped) or 0}"
        )
        if counters.sent == 0:
            err_console.print("[red]error:[/red] no report reached the backend")
            raise typer.Exit(1)
        if not serve:
            console.print(
                "The backend stops with the demo: add --serve to keep the dashboard open "
                "(mmagg demo --serve)."
            )
        else:
            console.print(
                f"Serving the dashboard at [bold]{server.url}/dashboard[/bold] (key above); "
                "press Ctrl-C to stop."
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print("Stopping.")
    finally:
        server.stop()


def _register_replay() -> None:
    from mmagg.replay import replay_command

    app.command("replay")(replay_command)


_register_replay()


@app.callback()
def _global_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors (or MMAGG_DEBUG=1).")
    ] = False,
) -> None:
    """Model Monitoring Inference Aggregator: self-hosted backend, keys and demo."""
    _cli_errors.set_debug(debug)


# Last: every command above (whoever added it) says fixable mistakes in one line, exit 2.
_cli_errors.install([app, keys_app])


def main() -> None:
    """Entry point of the `mmagg` console script (and of `python -m mmagg`)."""
    app(prog_name="mmagg")


if __name__ == "__main__":
    main()
