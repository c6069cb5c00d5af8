"""CLI commands of this group (filled in by the issue that builds them)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
