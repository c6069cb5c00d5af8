"""`eagle3 config show CONFIG [overrides]`: print the effective, validated config."""
from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, user_errors
from schemas.config import dump_config


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Show and check run configs.", no_args_is_help=True)

    @config_app.command("show")
    @user_errors
    def show(config: str = typer.Argument(..., help="YAML config"),
             overrides: Optional[List[str]] = OVERRIDES) -> None:
        """Print the effective config (defaults filled in, overrides applied) as YAML."""
        out.print(dump_config(get_config(config, overrides)), end="", highlight=False, markup=False)

    app.add_typer(config_app, name="config")
