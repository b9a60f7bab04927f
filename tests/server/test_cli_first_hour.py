"""A newcomer's first hour with the `mmagg` command (issue 13), driven as a person would: the
real command in a subprocess (a pipe, not a terminal), real SQLite files, real PostgreSQL,
real ports. Every fixable mistake is one line saying what to do, with exit status 2."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmagg.cli import app

PG = "127.0.0.1:5432"


Done = subprocess.CompletedProcess[str]


def mmagg(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> Done:
    return subprocess.run(
        [sys.executable, "-m", "mmagg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def refused_port() -> int:
    """A loopback port where nothing listens (bound, never listening, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_error_line(done: Done) -> str:
    """The whole of stderr, which must be exactly one `error: ...` line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return str(lines[0])


# -- 1. fixable mistakes are one line -----------------------------------------------------------


def test_a_malformed_database_url_is_one_line() -> None:
    line = one_error_line(mmagg("keys", "list", "--database-url", "notaurl"))
    assert line == (
        "error: --database-url: expected a URL like sqlite:///mmagg.db or "
        "postgresql://user@host:5432/dbname, got 'notaurl'"
    )


def test_an_unsupported_database_is_named() -> None:
    line = one_error_line(mmagg("keys", "list", "--database-url", "mysql://u@127.0.0.1/x"))
    assert line == (
        "error: --database-url: mmagg stores to sqlite or postgresql, "
        "got 'mysql' in 'mysql://u@127.0.0.1/x'"
    )


@pytest.mark.parametrize("command", [["keys", "list"], ["serve"], ["keys", "create"]])
def test_a_refusing_postgresql_says_where_and_hides_the_password(command: list[str]) -> None:
    port = refused_port()
    url = f"postgresql://bob:hunter2secret@127.0.0.1:{port}/mmagg"
    extra = ["--workspace", "w"] if command[-1] == "create" else []
    done = mmagg(*command, *extra, "--database-url", url)
    line = one_error_line(done)
    assert line == (
        f"error: PostgreSQL refused the connection at 127.0.0.1:{port}: is the server running "
        "and accepting TCP connections there? (--database-url)"
    )
    assert "hunter2secret" not in done.stdout + done.stderr


def test_a_missing_postgresql_database_says_how_to_create_it(pg_database_url: str) -> None:
    name = f"mmagg_absent_{uuid.uuid4().hex[:8]}"
    line = one_error_line(
        mmagg("keys", "list", "--database-url", f"postgresql://postgres@{PG}/{name}")
    )
    assert line == (
        f"error: PostgreSQL at {PG} has no database '{name}': create it (createdb {name}) "
        "or fix --database-url"
    )


def test_a_missing_postgresql_driver_names_the_extra(tmp_path: Path) -> None:
    # What a machine without mmagg[postgres] sees: psycopg cannot be imported.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['psycopg'] = None\nfrom mmagg.cli import main; main()",
            "keys",
            "list",
            "--database-url",
            "postgresql://u@127.0.0.1/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert one_error_line(done) == (
        "error: the PostgreSQL driver is not installed (module 'psycopg'): "
        "pip install 'mmagg[postgres]'"
    )


def test_a_driver_asked_for_by_name_is_named() -> None:
    try:
        import psycopg2  # noqa: F401

        pytest.skip("psycopg2 is installed here")
    except ImportError:
        pass
    line = one_error_line(
        mmagg("keys", "list", "--database-url", "postgresql+psycopg2://u@127.0.0.1/x")
    )
    assert line.startswith("error: the PostgreSQL driver is not installed (module 'psycopg2'): ")
    assert "pip install psycopg2-binary" in line


def test_a_sqlite_file_in_a_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "m.db"
    line = one_error_line(
        mmagg("prune", "--older-than", "1", "--database-url", f"sqlite:///{path}")
    )
    assert line == (
        f"error: cannot open the SQLite file '{path}': the folder '{path.parent}' does not exist "
        "(create it, or point --database-url elsewhere)"
    )
    assert not path.parent.exists()


def test_debug_shows_the_traceback() -> None:
    done = mmagg("--debug", "keys", "list", "--database-url", "notaurl")
    assert done.returncode not in (0, 2)
    assert "ArgumentError" in done.stderr
    assert len(done.stderr.splitlines()) > 5
    by_env = mmagg("keys", "list", "--database-url", "notaurl", env={"MMAGG_DEBUG": "1"})
    assert "ArgumentError" in by_env.stderr


def test_the_same_line_through_typer_s_runner(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "create", "--workspace", "w", "--database-url", "x"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --database-url: expected a URL like sqlite:///mmagg.db or "
        "postgresql://user@host:5432/dbname, got 'x'\n"
    )


# -- 2. serve binds first, then announces ------------------------------------------------------


def test_a_port_in_use_is_named_with_the_way_out(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = mmagg(
            "serve", "--port", str(port), "--database-url", f"sqlite:///{tmp_path / 'a.db'}"
        )
    line = one_error_line(done)
    assert line == (
        f"error: port {port} on 127.0.0.1 is already in use (another mmagg serve?): pick another "
        f"with --port {port + 1}, or --port 0 for any free port"
    )
    assert "mmagg backend on" not in done.stdout + done.stderr


@pytest.fixture
def serve_any_port(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmagg",
            "serve",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--database-url",
            f"sqlite:///{tmp_path / 's.db'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_the_announced_url_is_the_one_listening(serve_any_port: subprocess.Popen[str]) -> None:
    assert serve_any_port.stderr is not None
    first = serve_any_port.stderr.readline()
    match = re.fullmatch(
        r"mmagg backend on (http://127\.0\.0\.1:(\d+))  \(dashboard: \1/dashboard\)\n", first
    )
    assert match, first
    assert match.group(2) != "0"
    # Announced after binding and listening: the port accepts connections now, even while
    # uvicorn is still starting.
    with socket.create_connection(("127.0.0.1", int(match.group(2))), timeout=5):
        pass
    deadline = time.monotonic() + 20
    while True:
        try:
            assert httpx.get(f"{match.group(1)}/healthz", timeout=2).status_code == 200
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


# -- 5. python -m mmagg; help without <bool> ----------------------------------------------------


def test_python_dash_m_mmagg_is_the_command() -> None:
    done = mmagg("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: mmagg [OPTIONS] COMMAND [ARGS]...")
    for command in ("serve", "keys", "demo", "replay", "prune"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), command


@pytest.mark.parametrize("command", [["serve"], ["replay"], ["demo"], ["keys", "create"], []])
def test_help_shows_no_type_tag_on_flags(command: list[str]) -> None:
    done = mmagg(*command, "--help", env={"COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert "<bool>" not in done.stdout
    assert "--help" in done.stdout


# -- 6 and 9. the demo: uncut table in a pipe, no OpenCV warning, URL only when it lives --------


def test_demo_without_serve_says_add_serve_and_keeps_the_table_whole(tmp_path: Path) -> None:
    from mmagg.server.demo import MODEL_ID

    done = mmagg(
        "demo",
        "--seconds",
        "3",
        "--frequency",
        "1",
        "--database-url",
        f"sqlite:///{tmp_path / 'd.db'}",
        env={"PYTHONWARNINGS": "always", "COLUMNS": ""},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.rstrip().splitlines()[-1] == (
        "The backend stops with the demo: add --serve to keep the dashboard open "
        "(mmagg demo --serve)."
    )
    assert "/dashboard" not in out and "Read key" not in out and "Ingest key" not in out
    header = next(line for line in out.splitlines() if "Model" in line and "Class" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == [
        "Model",
        "Class",
        "Samples",
        "Predictions",
        "Avg",
        "Median",
        "1st half",
        "2nd half",
    ]
    assert f" {MODEL_ID} " in out
    assert "…" not in out
    assert "OpenCV" not in done.stderr


def test_demo_with_serve_prints_url_and_key_first(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmagg",
            "demo",
            "--serve",
            "--seconds",
            "30",
            "--frequency",
            "1",
            "--database-url",
            f"sqlite:///{tmp_path / 'd.db'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        url = key = None
        started = time.monotonic()
        while key is None:
            line = process.stdout.readline()
            assert line, (
                "demo ended early",
                lines,
                process.stderr.read() if process.stderr else "",
            )
            lines.append(line)
            if match := re.match(r"Dashboard: (http://127\.0\.0\.1:\d+)/dashboard  \(log in", line):
                url = match.group(1)
            if match := re.match(r"Read key \(workspace 'demo'\): (mmk_\S+)$", line):
                key = match.group(1)
        assert url is not None
        # The stream has 30 s to go: the dashboard is open and the key works now.
        assert time.monotonic() - started < 25
        assert not any("Read back from" in line for line in lines)
        assert httpx.get(f"{url}/dashboard", timeout=10).status_code == 200
        answer = httpx.post(f"{url}/dashboard/api/login", json={"api_key": key}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_supervision_s_opencv_warning_is_the_only_one_silenced() -> None:
    # The filter is exactly supervision's notice: another UserWarning from supervision, or the
    # same words from elsewhere, still shows.
    code = (
        "import warnings, sys\n"
        "from mmagg.server.demo import _import_supervision\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    _import_supervision()\n"
        "print(sum('OpenCV' in str(w.message) for w in seen))\n"
        "warnings.warn('OpenCV is not installed here', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    assert "OpenCV is not installed here" in done.stderr
    bare = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import supervision"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "OpenCV" in bare.stderr  # the warning exists: the check above can fail


@given(
    password=st.text(
        alphabet=st.characters(blacklist_characters="/\n\r", blacklist_categories=("Cs",)),
        min_size=6,
        max_size=30,
    ),
    user=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
)
@settings(max_examples=200, deadline=None)
def test_a_database_password_is_never_printed(password: str, user: str) -> None:
    from mmagg._cli_errors import check_database_url, redact_url

    url = f"postgresql://{user}:{password}@db.internal:5432/mmagg"
    assert password not in redact_url(url)
    assert redact_url(url) == f"postgresql://{user}:***@db.internal:5432/mmagg"
    wrong_kind = url.replace("postgresql", "mysql", 1)
    assert password not in (check_database_url(wrong_kind) or "")
