"""The `midas-recon` group and how every command fails.

Exit codes scripts can trust: 0 success, 1 the job ran and found a failure, 2 bad usage or
configuration. Errors are one readable line on stderr, never a traceback, never a secret.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError, SQLAlchemyError

from worker.config import ConfigError, Settings, get_settings
from worker.logs import redact, register_settings_secrets

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(Exception):
    """Bad input from the person at the keyboard (a file, an argument): exit 2."""


class JobFailed(Exception):
    """The job ran and found a failure (a run incomplete, a Midas error): exit 1."""


def fail(message: str, code: int) -> NoReturn:
    # Through redaction like every log line: a driver's or a library's text may quote a
    # password, a token or a key the project never put there itself.
    click.echo(f"midas-recon: {redact(message)}", err=True)
    sys.exit(code)


def settings() -> Settings:
    """The settings (their secrets registered for redaction), or exit 2 with the reason."""
    try:
        loaded = get_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    register_settings_secrets(loaded)
    return loaded


def handle_errors(fn: F) -> F:
    """Turn the project's exceptions into one line and the right exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from worker.midas.errors import MidasError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, UsageError) as exc:
            fail(str(exc), EXIT_USAGE)
        except (JobFailed, MidasError) as exc:
            fail(str(exc), EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="midas-recon")
def cli() -> None:
    """Reconcile WeChat Midas coin balances against the game's own ledger.

    Configuration comes from environment variables (see README). Exit codes: 0 success,
    1 the job ran and found a failure, 2 bad usage or configuration.
    """


@contextmanager
def database_errors() -> Iterator[None]:
    """One line for a database problem; the driver's first line, never the SQL parameters."""
    try:
        yield
    except (OperationalError, ProgrammingError, InterfaceError) as exc:
        raise UsageError(
            f"database unavailable or not migrated ({_first_line(exc)}); check DATABASE_URL "
            "and run `midas-recon db upgrade`"
        ) from None
    except SQLAlchemyError as exc:
        raise JobFailed(f"database error ({_first_line(exc)})") from None


def _first_line(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_date(value: str, option: str = "--date") -> dt.date:
    """A date option's value (YYYY-MM-DD), or UsageError naming the option."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} {value!r} is not a date (YYYY-MM-DD)") from None


def broker(send: Callable[[], None]) -> Callable[[], None]:
    """`send` (through worker.dispatch, whose app is built from this environment), for
    `after_commit`: a broker that cannot be reached is one line."""

    def sending() -> None:
        try:
            send()
        except Exception as exc:  # noqa: BLE001  (redis and kombu raise many kinds; one line)
            raise UsageError(f"cannot reach Redis at REDIS_URL ({type(exc).__name__})") from None

    return sending


def table(header: Sequence[str], rows: list[list[str]]) -> str:
    """Rows under a header, columns padded to their widest cell."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_option(help: str, *, choices: Sequence[str] = ("table", "json")) -> Callable[[F], F]:
    """`--format` (as `fmt`), table by default: the same option on every listing command."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help=help,
    )


def limit_option(default: int, *, most: int, help: str) -> Callable[[F], F]:
    """`--limit`, 1 to `most`: how many rows a listing prints."""
    return click.option(
        "--limit", type=click.IntRange(1, most), default=default, show_default=True, help=help
    )
