"""`eagle3 eval CONFIG [overrides]`: stage 3, heads against the target (offline table,
speculative decoding, speed-up, losslessness); prints the comparison table."""
from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, register_user_error, user_errors


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @user_errors
    def eval_cmd(config: str = typer.Argument(..., help="run config YAML"),
                 overrides: Optional[List[str]] = OVERRIDES,
                 threads: Optional[int] = typer.Option(
                     None, help="torch intra-op threads (default: torch's; 1 is steadiest on shared CPUs)"),
                 engine: Optional[str] = typer.Option(
                     None, help="hf | vllm | both (default: eval.engine); vllm needs `make vllm`")) -> None:
        """Evaluate heads: offline accuracy table + speculative decoding (chain/tree) vs plain greedy.

        --engine vllm runs the exported heads in vLLM (chain of eval.draft_tokens) and adds the
        engine table; --engine both puts our decoding and vLLM's side by side.
        """
        from schemas.head import HeadError
        from schemas.target import TargetError
        from schemas.vllm_runtime import VllmMissingError, VllmRunError
        from stage3_eval.draft_runner import DraftRunError
        from stage3_eval.prompts import PromptError
        from stage3_eval.target_runner import TargetRunError

        for exc in (HeadError, TargetError, PromptError, DraftRunError, TargetRunError, VllmMissingError,
                    VllmRunError):
            register_user_error(exc)
        cfg = get_config(config, list(overrides or []) + ([f"eval.engine={engine}"] if engine else []))
        import torch

        if threads:
            torch.set_num_threads(threads)
        from stage3_eval.evaluate import run_eval
        from stage3_eval.report import markdown

        report = run_eval(cfg, progress=True)
        out.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
        out.print(f"report: {report['files']['json']}", markup=False, highlight=False)
