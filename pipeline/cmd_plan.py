"""`eagle3 plan CONFIG [--gpus N] [--nodes M] [--json]`: disk, memory and time per stage, before a job runs."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, register_user_error, user_errors
from pipeline.plan import GiB, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, Options, PlanError, make_plan, plan_lines


def register(app: typer.Typer) -> None:
    register_user_error(PlanError)

    @app.command("plan")
    @user_errors
    def plan(config: str = typer.Argument(..., help="YAML config"),
             overrides: Optional[List[str]] = OVERRIDES,
             gpus: int = typer.Option(8, "--gpus", min=1, help="GPUs per node"),
             nodes: int = typer.Option(1, "--nodes", min=1, help="nodes"),
             gpu_mem: float = typer.Option(80.0, "--gpu-mem", min=1.0, help="GiB of memory per GPU assumed"),
             mfu: float = typer.Option(DEFAULT_MFU, "--mfu", min=0.01, max=1.0, help="model FLOPs utilisation"),
             peak_tflops: float = typer.Option(DEFAULT_PEAK_TFLOPS, "--peak-tflops", help="dense bf16 TFLOP/s per GPU"),
             tokens: Optional[int] = typer.Option(None, "--tokens", help="data-set tokens (instead of counting)"),
             samples: Optional[int] = typer.Option(None, "--samples", help="data-set samples (instead of counting)"),
             target_config: Optional[str] = typer.Option(None, "--target-config",
                                                         help="the target's config.json (default: target.path's)"),
             as_json: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
        """Cache bytes, host and GPU memory per stage and a time estimate, from the config and the target's
        config.json alone (no weights); warns when something will not fit."""
        cfg = get_config(config, overrides)
        p = make_plan(cfg, Options(gpus=gpus, nodes=nodes, gpu_mem=int(gpu_mem * GiB), peak_tflops=peak_tflops,
                                   mfu=mfu, tokens=tokens, samples=samples, target_config=target_config))
        if as_json:
            out.print_json(json.dumps({**p.figures, "warnings": p.warnings}))
            return
        lines = plan_lines(p)
        w = max(len(k) for k, _ in lines)
        for k, v in lines:
            out.print(f"{k:<{w}}  {v}", highlight=False, markup=False, soft_wrap=True)
        for msg in p.warnings:
            out.print(f"WARNING: {msg}", highlight=False, markup=False, soft_wrap=True)
