"""The `eagle3` command line (DESIGN.md section 6).

Each group of commands lives in its own module with a `register(app)` function;
this file only assembles them.
"""
from __future__ import annotations

import os
from typing import Optional

import typer

# wandb never sends anything unless the user chose a mode.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Offline EAGLE-3 draft-head training with a feature cache.",
                  pretty_exceptions_enable=False)


@app.callback()
def _launcher_options(
    local_rank: Optional[int] = typer.Option(
        None, "--local_rank", "--local-rank", hidden=True,
        help="set by the deepspeed launcher (python -m pipeline.cli --local_rank=N train ...); "
             "the same as the LOCAL_RANK environment variable, which wins when both are given"),
) -> None:
    """Offline EAGLE-3 draft-head training with a feature cache."""
    note_local_rank(local_rank)


def note_local_rank(local_rank: Optional[int]) -> None:
    """Launchers pass --local_rank before (deepspeed) or after the command; LOCAL_RANK is what the stages read."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def _register_all() -> None:
    from pipeline import cmd_config, cmd_data, cmd_eval, cmd_extract, cmd_plan, cmd_run, cmd_shards, cmd_train

    for mod in (cmd_config, cmd_data, cmd_extract, cmd_shards, cmd_train, cmd_eval, cmd_run, cmd_plan):
        mod.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
