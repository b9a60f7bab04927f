"""Mistakes a person can fix, said in one line by every `mmagg` command (exit status 2).

A wrong `--database-url`, a database driver that is not installed, a database server that
refuses, a port that is taken: each becomes one line on stderr that says what is wrong and
what to do next, instead of a traceback. `mmagg --debug ...` (or `MMAGG_DEBUG=1`) lets the
original exception and its traceback through.

Example:
    >>> describe_error(ModuleNotFoundError("No module named 'psycopg'", name="psycopg"),
    ...                "postgresql://me@db.internal/mmagg")
    "the PostgreSQL driver is not installed (module 'psycopg'): pip install 'mmagg[postgres]'"
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ERROR_EXIT", "describe_error", "install", "redact_url", "set_debug"]

ERROR_EXIT = 2
SUPPORTED_DATABASES = ("sqlite", "postgresql")
EXAMPLE_URLS = "sqlite:///mmagg.db or postgresql://user@host:5432/dbname"

# Driver module -> what to install. psycopg is mmagg's own extra; the rest are named so the
# message is true even for a URL that asks for another driver explicitly.
_DRIVER_PACKAGES = {
    "psycopg": "pip install 'mmagg[postgres]'",
    "psycopg_binary": "pip install 'mmagg[postgres]'",
    "psycopg2": "pip install psycopg2-binary (or use postgresql+psycopg:// with mmagg[postgres])",
    "pg8000": "pip install pg8000",
    "asyncpg": "pip install asyncpg",
    "sqlalchemy": "pip install 'mmagg[server]'",
}

F = TypeVar("F", bound=Callable[..., Any])

_debug = False


def set_debug(value: bool) -> None:
    """Let exceptions through with their traceback (`mmagg --debug`)."""
    global _debug
    _debug = value


def debugging() -> bool:
    """Whether `--debug` or `MMAGG_DEBUG=1` asked for tracebacks."""
    return _debug or os.environ.get("MMAGG_DEBUG", "").strip().lower() in ("1", "true", "yes")


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, safe to print.

    Example:
        >>> redact_url("postgresql://bob:s3cret@db:5432/x")
        'postgresql://bob:***@db:5432/x'
        >>> redact_url("postgresql://bob:p@ss@db/x")  # an unescaped @ in the password
        'postgresql://bob:***@db/x'
        >>> redact_url("sqlite:///mmagg.db")
        'sqlite:///mmagg.db'
    """
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^/]*@", r"\1:***@", url)


def _parsed(url: str | None) -> Any:
    if not url:
        return None
    try:
        import sqlalchemy as sa

        from mmagg.server.tables import normalize_url

        return sa.make_url(normalize_url(url))
    except Exception:
        return None


def check_database_url(url: str) -> str | None:
    """Why `url` cannot be mmagg's database, or `None` when its form is right.

    Example:
        >>> check_database_url("notaurl")
        "--database-url: expected a URL like sqlite:///mmagg.db or postgresql://user@host:5432/dbname, got 'notaurl'"
        >>> check_database_url("mysql://u@h/db")
        "--database-url: mmagg stores to sqlite or postgresql, got 'mysql' in 'mysql://u@h/db'"
        >>> check_database_url("sqlite:///mmagg.db") is None
        True
    """  # noqa: E501
    try:
        import sqlalchemy as sa

        from mmagg.server.tables import normalize_url
    except ImportError:
        return None  # the command says which extra to install
    try:
        parsed = sa.make_url(normalize_url(url))
    except Exception:
        return f"--database-url: expected a URL like {EXAMPLE_URLS}, got {redact_url(url)!r}"
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_DATABASES:
        return (
            f"--database-url: mmagg stores to {' or '.join(SUPPORTED_DATABASES)}, "
            f"got {backend!r} in {redact_url(url)!r}"
        )
    return None


def _where(parsed: Any) -> str:
    host = parsed.host or "localhost"
    port = parsed.port or 5432
    return f"{host}:{port}"


def _database_problem(error: Exception, url: str | None) -> str | None:
    """One line for an error raised while opening or using the database."""
    import sqlalchemy as sa

    parsed = _parsed(url)
    shown = redact_url(url) if url else "the database"
    if isinstance(error, sa.exc.ArgumentError) and "URL" in str(error):
        return f"--database-url: expected a URL like {EXAMPLE_URLS}, got {shown!r}"
    if isinstance(error, sa.exc.NoSuchModuleError):
        return f"--database-url: unknown database kind in {shown!r}; use {EXAMPLE_URLS}"
    if not isinstance(error, sa.exc.DBAPIError):
        return None
    reason = str(getattr(error, "orig", None) or error)
    lowered = reason.lower()
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if "unable to open database file" in lowered:
            if not path.parent.is_dir():
                return (
                    f"cannot open the SQLite file {str(path)!r}: the folder "
                    f"{str(path.parent)!r} does not exist (create it, or point --database-url "
                    "elsewhere)"
                )
            return (
                f"cannot open the SQLite file {str(path)!r}: not writable here "
                "(check the file's and folder's permissions, or point --database-url elsewhere)"
            )
        if "not a database" in lowered:
            return f"{str(path)!r} is not a SQLite database: point --database-url at another file"
        first = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
        return f"SQLite {str(path)!r}: {first}"
    if parsed is not None and parsed.get_backend_name() == "postgresql":
        where = _where(parsed)
        if "connection refused" in lowered:
            return (
                f"PostgreSQL refused the connection at {where}: is the server running and "
                "accepting TCP connections there? (--database-url)"
            )
        if "password authentication failed" in lowered or "no password supplied" in lowered:
            return (
                f"PostgreSQL at {where} did not accept user {parsed.username or '(none)'!r}: "
                "check the user and password in --database-url"
            )
        match = re.search(r'database "([^"]+)" does not exist', reason)
        if match:
            return (
                f"PostgreSQL at {where} has no database {match.group(1)!r}: "
                f"create it (createdb {match.group(1)}) or fix --database-url"
            )
        if "could not translate host name" in lowered or "name or service not known" in lowered:
            return f"PostgreSQL host {parsed.host!r} is unknown: fix the host in --database-url"
        if "timeout" in lowered or "timed out" in lowered:
            return f"PostgreSQL at {where} did not answer in time: is the host reachable?"
        detail = _last_meaningful_line(reason)
        return f"cannot use PostgreSQL at {where}: {detail}"
    detail = _last_meaningful_line(reason)
    return f"cannot use {shown}: {detail}"


def _last_meaningful_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("(Background on this error")]
    return lines[0] if lines else "unknown error"


def describe_error(error: BaseException, database_url: str | None = None) -> str | None:
    """One line for a mistake a person can fix, or `None` for anything else (a bug)."""
    try:
        from mmagg.server.runner import BindError
    except ImportError:  # no server extra: nothing here can have been raised by it
        pass
    else:
        if isinstance(error, BindError):
            return str(error)
    if isinstance(error, ModuleNotFoundError):
        module = (error.name or "").split(".")[0]
        if module in ("psycopg", "psycopg2", "pg8000", "asyncpg", "psycopg_binary"):
            install = _DRIVER_PACKAGES[module]
            return f"the PostgreSQL driver is not installed (module {module!r}): {install}"
        if module in _DRIVER_PACKAGES:
            return f"{module} is not installed: {_DRIVER_PACKAGES[module]}"
        return None
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return None
    if isinstance(error, Exception):
        return _database_problem(error, database_url)
    return None


def _wrap(callback: F) -> F:
    if getattr(callback, "_mmagg_friendly", False):
        return callback

    @functools.wraps(callback)
    def command(*args: Any, **kwargs: Any) -> Any:
        url = kwargs.get("database_url")
        if isinstance(url, str) and not debugging():
            problem = check_database_url(url)
            if problem is not None:
                fail(problem)
        try:
            return callback(*args, **kwargs)
        except Exception as error:
            if debugging() or _is_click_control(error):
                raise
            message = describe_error(error, url if isinstance(url, str) else None)
            if message is None:
                raise
            fail(_scrub(message, url))

    command._mmagg_friendly = True  # type: ignore[attr-defined]
    return command  # type: ignore[return-value]


def _is_click_control(error: Exception) -> bool:
    """`typer.Exit`, usage errors and Ctrl-C aborts: click's own way out, never translated."""
    import click

    return isinstance(error, (click.exceptions.Exit, click.ClickException, click.Abort))


def _scrub(message: str, url: object) -> str:
    """`message` without the database password, even where a driver quoted it."""
    password = getattr(_parsed(url) if isinstance(url, str) else None, "password", None)
    if isinstance(password, str) and password:
        message = message.replace(password, "***")
    return message


def fail(message: str) -> None:
    """Print `error: message` as one line on stderr and exit with status 2."""
    import typer

    one_line = " ".join(message.split())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    raise typer.Exit(ERROR_EXIT)


def install(apps: Iterable[Any]) -> None:
    """Wrap every command of the given Typer apps (call once all commands are registered)."""
    for typer_app in apps:
        for info in typer_app.registered_commands:
            if info.callback is not None:
                info.callback = _wrap(info.callback)
