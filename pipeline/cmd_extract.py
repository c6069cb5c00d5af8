"""`eagle3 extract CONFIG [overrides] [--worker r/W] [--eval]`: stage 1, one worker.

Many workers: `torchrun --nproc_per_node N -m pipeline.cli extract CONFIG` (RANK /
WORLD_SIZE), a Slurm array (SLURM_ARRAY_TASK_ID / _COUNT), or `--worker r/W` by hand.
Each worker writes the shards k with k mod W == r; committed shards are skipped.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, register_user_error, user_errors


def register(app: typer.Typer) -> None:
    from schemas.cache import CacheError
    from schemas.target import TargetError
    from stage1_extract.extract import ExtractError
    from stage1_extract.workers import WorkerError
    from stage1_extract.writer import WriterError

    for exc in (CacheError, TargetError, ExtractError, WorkerError, WriterError):
        register_user_error(exc)
    try:  # data errors name FILE:LINE already
        from stage1_extract.conversations import DataError
        from stage1_extract.tokenize import TemplateError

        register_user_error(DataError)
        register_user_error(TemplateError)
    except ImportError:  # pragma: no cover - data modules are optional at import time
        pass

    @app.command("extract")
    @user_errors
    def extract(config: str = typer.Argument(..., help="YAML run config"),
                overrides: Optional[List[str]] = OVERRIDES,
                worker: Optional[str] = typer.Option(
                    None, "--worker", help="r/W: extract shards k with k mod W == r "
                    "(default: torchrun RANK/WORLD_SIZE, a Slurm array task, or 0/1)"),
                eval_split: bool = typer.Option(False, "--eval", help="extract data.eval into the eval cache"),
                progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar")) -> None:
        """Stage 1: run the target over the data and write the feature cache (extract.cache)."""
        from pipeline.run import answered_config
        from stage1_extract.extract import run_extract

        cfg = get_config(config, overrides)
        if not eval_split:
            cfg = answered_config(cfg, config)
        path = run_extract(cfg, worker=worker, which="eval" if eval_split else "train", progress=progress,
                           summary=True)
        out.print(str(path), highlight=False, markup=False)
