"""Shared CLI plumbing: config loading and turning known errors into clean exits."""
from __future__ import annotations

import functools
import sys
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from schemas.config import ConfigError, RunConfig, load_config
from schemas.dirkind import UnsafeDirError
from schemas.disk import DiskFullError, exception_chain, is_disk_full
from schemas.finite import NonFiniteError
from schemas.locks import LockBusy

console = Console(stderr=True)
out = Console()

# Errors whose message is the whole story for a user: print it, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, LockBusy, DiskFullError,
                                                UnsafeDirError, NonFiniteError)


def register_user_error(exc: type[BaseException]) -> None:
    global USER_ERRORS
    if exc not in USER_ERRORS:
        USER_ERRORS = (*USER_ERRORS, exc)


def user_errors(fn: Callable) -> Callable:
    """Decorator for commands: known errors -> 'error: ...' on stderr, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:  # type: ignore[misc]
            # escape: messages hold brackets (data.train=[x.jsonl], conversations[1]) that rich would eat as markup
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - a full disk anywhere is a user's problem, not a traceback
            if not is_disk_full(e):
                raise
            where = next((x.filename for x in exception_chain(e) if getattr(x, "filename", None)), None)
            console.print(f"[bold red]error:[/] no space left on device{escape(f' while writing {where}') if where else ''}"
                          f" ({escape(str(e))}); free some space and run the same command again",
                          highlight=False, markup=True, soft_wrap=True)
            sys.exit(1)

    return wrapper


def get_config(path: str, overrides: list[str] | None) -> RunConfig:
    return load_config(path, overrides or [])


OVERRIDES = typer.Argument(None, help="dotted key=value overrides, e.g. train.lr=3e-4")
