"""`eagle3 train` (stage 2) and `eagle3 export` (a servable head for SGLang / vLLM)."""
from __future__ import annotations

from pathlib import Path
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
        local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                                 help="set by launchers; LOCAL_RANK wins when both are given"),
    ):
        """Stage 2: train a draft head from the cache (one process, or under torchrun / the deepspeed launcher).

        Resumes from the latest checkpoint in train.output unless --restart. Many GPUs:
        `deepspeed --num_gpus 8 --module pipeline.cli train CONFIG` or
        `torchrun --nproc_per_node 8 -m pipeline.cli train CONFIG`.
        """
        from pipeline.cli import note_local_rank

        note_local_rank(local_rank)
        _register_errors()
        _train(config, overrides, restart, not no_progress)

    @app.command("export")
    def export(
        head: str = typer.Argument(..., help="trained head directory (config.json + model.safetensors)"),
        out_dir: str = typer.Argument(..., metavar="OUT", help="directory to write"),
        to: Optional[str] = typer.Option(None, "--to", help="leave out: the export serves both SGLang and vLLM "
                                         "('sglang'/'vllm' are accepted and give the same directory); "
                                         "'speculators': the speculators library's layout, for vLLM only"),
        dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32"),
        verifier: Optional[str] = typer.Option(None, "--verifier", help="--to speculators: the target model "
                                               "(path or hub id) that `vllm serve OUT` will run"),
        speculative_tokens: int = typer.Option(3, "--speculative-tokens", help="--to speculators: tokens per draft"),
        force: bool = typer.Option(False, "--force", help="overwrite a non-empty OUT holding an earlier export "
                                   "(a directory holding a model is never written into)"),
    ):
        """Write HEAD as a checkpoint that SGLang and vLLM both serve (layer ids for each engine)."""
        _register_errors()
        _export(head, to, out_dir, dtype, verifier, speculative_tokens, force)


@user_errors
def _train(config: str, overrides, restart: bool, progress: bool) -> None:
    from stage2_train.run_state import check_output_dir
    from stage2_train.trainer import run_train

    cfg = get_config(config, overrides)
    check_output_dir(Path(cfg.train.output))  # a model's directory or a file: one line, before any work
    head = run_train(cfg, restart=restart, progress=progress)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        out.print(f"head written to {head}")


@user_errors
def _export(head: str, to: Optional[str], out_dir: str, dtype: str, verifier: Optional[str],
            speculative_tokens: int, force: bool = False) -> None:
    from schemas.head import check_export_dir
    from stage2_train.export import export_head

    check_export_dir(out_dir, force)  # a non-empty OUT only with --force; a model's directory never
    to = to.lower() if to else None
    p = export_head(head, to, out_dir, dtype=dtype, verifier=verifier, speculative_tokens=speculative_tokens)
    if to == "speculators":
        out.print(f"exported {head} to {p} in the speculators layout (vLLM: `vllm serve {p}` runs {verifier})")
        return
    if to:
        out.print(f"note: --to {to} is no longer needed: the export is the same for SGLang and vLLM")
    out.print(f"exported {head} to {p} (serves in SGLang and vLLM)")
