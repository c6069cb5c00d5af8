"""`eagle3 train` (stage 2) and `eagle3 export` (a servable head for SGLang / vLLM)."""
from __future__ import annotations

from typing import Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, register_user_error, user_errors


def _register_errors() -> None:
    from schemas.cache import CacheError
    from schemas.head import HeadError
    from stage2_train.run_state import RunStateError
    from stage2_train.trainer import TrainError
    from stage2_train.vocab import VocabError

    for exc in (CacheError, HeadError, TrainError, VocabError, RunStateError):
        register_user_error(exc)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: str = typer.Argument(..., help="run config (YAML)"),
        overrides: Optional[list[str]] = OVERRIDES,
        restart: bool = typer.Option(False, "--restart", help="ignore checkpoints in train.output and start over"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    ):
        """Stage 2: train a draft head from the cache (one process, or under torchrun / the deepspeed launcher).

        Resumes from the latest checkpoint in train.output unless --restart.
        """
        _register_errors()
        _train(config, overrides, restart, not no_progress)

    @app.command("export")
    def export(
        head: str = typer.Argument(..., help="trained head directory (config.json + model.safetensors)"),
        out_dir: str = typer.Argument(..., metavar="OUT", help="directory to write"),
        to: str = typer.Option(..., "--to", help="serving engine: sglang or vllm"),
        dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32"),
        force: bool = typer.Option(False, "--force", help="overwrite a non-empty OUT holding an earlier export "
                                   "(a directory holding a model is never written into)"),
    ):
        """Write HEAD as a checkpoint for an engine, in the engine's layer-id convention."""
        _register_errors()
        _export(head, to, out_dir, dtype, force)


@user_errors
def _train(config: str, overrides, restart: bool, progress: bool) -> None:
    from stage2_train.trainer import run_train

    cfg = get_config(config, overrides)
    head = run_train(cfg, restart=restart, progress=progress)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        out.print(f"head written to {head}")


@user_errors
def _export(head: str, to: str, out_dir: str, dtype: str, force: bool = False) -> None:
    from schemas.head import check_export_dir
    from stage2_train.export import export_head

    check_export_dir(out_dir, force)  # a non-empty OUT only with --force; a model's directory never
    p = export_head(head, to.lower(), out_dir, dtype=dtype)
    out.print(f"exported {head} for {to} to {p}")
