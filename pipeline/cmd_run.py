"""`eagle3 run`, `regenerate`, `submit`, `sweep`, `jobs status`: the end-to-end commands."""
from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, console, get_config, out, register_user_error, user_errors


def _log(msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)


def _register_errors() -> None:
    # Known failures print one clear line, not a traceback.
    from schemas.cache import CacheError
    from schemas.head import HeadError
    from schemas.target import TargetError
    from schemas.vllm_runtime import VllmMissingError, VllmRunError
    from stage1_extract.regenerate import RegenerateError

    from pipeline.submit import SubmitError

    for e in (CacheError, HeadError, TargetError, RegenerateError, SubmitError, VllmMissingError, VllmRunError):
        register_user_error(e)
    for mod, name in (("stage1_extract.conversations", "DataError"), ("stage1_extract.extract", "ExtractError"),
                      ("stage1_extract.workers", "WorkerError"), ("stage2_train.trainer", "TrainError"),
                      ("stage2_train.run_state", "RunStateError")):
        try:
            register_user_error(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass


def register(app: typer.Typer) -> None:
    _register_errors()

    @app.command("run")
    @user_errors
    def run(config: str = typer.Argument(..., help="YAML config"),
            overrides: Optional[List[str]] = OVERRIDES,
            stages: Optional[str] = typer.Option(None, help="comma-separated subset: regenerate,extract,train,eval"),
            no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars")) -> None:
        """All stages locally: regenerate (if enabled) -> extract -> train -> eval.

        A stage already done under the same settings is skipped, so running again after
        a crash continues where it stopped. Ends with a summary (cache, per-position
        table, τ, speed-up, lossless check), also in <run dir>/pipeline.json.
        """
        from pipeline.run import format_summary, run_pipeline

        cfg = get_config(config, overrides)
        summary = run_pipeline(cfg, progress=not no_progress,
                               stages=[s.strip() for s in stages.split(",")] if stages else None, log=_log)
        out.print(format_summary(summary), highlight=False, markup=False, soft_wrap=True)

    @app.command("regenerate")
    @user_errors
    def regenerate(config: str = typer.Argument(..., help="YAML config"),
                   overrides: Optional[List[str]] = OVERRIDES,
                   no_progress: bool = typer.Option(False, "--no-progress")) -> None:
        """Replace every assistant turn of data.train with the target's own answer (resumable)."""
        from stage1_extract.regenerate import run_regenerate

        cfg = get_config(config, overrides)
        p = run_regenerate(cfg, progress=not no_progress)
        n = sum(1 for line in p.open() if line.strip())
        out.print(f"{n} conversations in {p}", highlight=False, markup=False)

    @app.command("submit")
    @user_errors
    def submit(config: str = typer.Argument(..., help="YAML config"),
               overrides: Optional[List[str]] = OVERRIDES,
               executor: Optional[str] = typer.Option(None, help="slurm | local (default: jobs.executor)"),
               dry_run: bool = typer.Option(False, "--dry-run", help="print the generated job scripts, submit nothing")) -> None:
        """The stages as batch jobs: stage 1 as an array (one task per GPU), stage 2 after every
        stage-1 task succeeded (afterok), stage 3 after stage 2. Job ids: <run dir>/jobs/jobs.json."""
        from pipeline.submit import submit as do_submit

        cfg = get_config(config, overrides)
        printer = (lambda s: out.print(s, highlight=False, markup=False, soft_wrap=True)) if dry_run else _log
        do_submit(cfg, executor=executor, dry_run=dry_run, log=printer)

    @app.command("sweep")
    @user_errors
    def sweep(config: str = typer.Argument(..., help="YAML config with a sweep: section"),
              overrides: Optional[List[str]] = OVERRIDES,
              executor: Optional[str] = typer.Option(None, help="local (in sequence, default) | slurm (a job array)"),
              dry_run: bool = typer.Option(False, "--dry-run", help="with --executor slurm: print the job scripts"),
              no_progress: bool = typer.Option(False, "--no-progress")) -> None:
        """Train one head per point of sweep.grid from the same cache; print the comparison table."""
        from pipeline.sweep import run_sweep, submit_sweep

        cfg = get_config(config, overrides)
        ex = executor or cfg.jobs.executor
        if ex == "slurm" or dry_run:
            printer = (lambda s: out.print(s, highlight=False, markup=False, soft_wrap=True)) if dry_run else _log
            submit_sweep(cfg, executor=ex, dry_run=dry_run, log=printer)
            return
        table = run_sweep(cfg, progress=not no_progress, log=_log)
        out.print(table["markdown"], highlight=False, markup=False, soft_wrap=True)

    jobs_app = typer.Typer(help="Submitted batch jobs.", no_args_is_help=True)

    @jobs_app.command("status")
    @user_errors
    def status(run: str = typer.Argument(..., help="run dir (runs/NAME), its config, or a jobs.json")) -> None:
        """Each stage's jobs, their states (squeue / sacct / scontrol) and log paths."""
        from rich.table import Table

        from pipeline.submit import job_status

        rows = job_status(run)
        t = Table("stage", "job", "state", "stdout", "stderr")
        for r in rows:
            t.add_row(r["stage"], r["job"], r["state"], r["stdout"], r["stderr"])
        out.print(t)

    app.add_typer(jobs_app, name="jobs")
