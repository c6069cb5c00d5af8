"""Stage 3 in vLLM (eval.engine: vllm | both): the exported heads served by vLLM's offline `LLM` API.

The target (a GGUF target: its cached HF conversion, schemas/target.py) and each head,
exported as vLLM reads it, run in the engine venv through stage3_eval/vllm_eval_worker.py
(schemas/vllm_runtime.py says why a separate venv). Chain drafting of `eval.draft_tokens`
at each of `eval.temperatures` (0 = greedy; the baseline is vLLM at the same temperature),
one request at a time like our HF path, so tokens/s are latency figures comparable with it;
one row per head and temperature. vLLM counts, per draft, how many draft positions were
accepted (`vllm:spec_decode_num_accepted_tokens_per_pos`); from those counts:
* acceptance_per_pos[d-1] = P(at least d tokens accepted) per draft (vLLM's convention),
* accept_length_hist and acceptance_by_depth (P(depth d accepted | depth d-1 accepted)),
  the conventions of our HF report, so both engines plot and tabulate alike,
* mean_acceptance_length = 1 + accepted / drafts.
Token identity (T = 0): every turn's speculative output must equal vLLM's own greedy output.
"""
from __future__ import annotations

import json
from pathlib import Path

from schemas.target import converted_dir
from schemas.vllm_runtime import engine_dtype, llm_kwargs, run_worker
from stage3_eval.prompts import EvalPrompt
from stage3_eval.report import first_mismatch, speed_fields

WORKER = Path(__file__).with_name("vllm_eval_worker.py")


def export_for_vllm(head_dir: str | Path, out_dir: str | Path, dtype: str) -> Path:
    """The head as vLLM loads it: top-level eagle_aux_hidden_state_layer_ids = HF hidden_states indices.

    The one call into stage 2's export; adapt here when the export format changes.
    """
    from stage2_train.export import export_head

    return export_head(head_dir, "vllm", out_dir, dtype=dtype)


def head_name(head: str | Path) -> str:
    return Path(head).name if Path(head).name != "head" else str(head)


def run_vllm_eval(cfg, heads: list[str], prompts: list[EvalPrompt], out_dir: Path, python: Path, *,
                  progress: bool = True) -> dict:
    """Export the heads, run the worker, summarize; returns the report's "vllm" section."""
    e = cfg.eval
    target = converted_dir(cfg.target)
    dtype = engine_dtype(cfg.target)
    exports = []
    for i, h in enumerate(heads):
        exports.append({"name": head_name(h), "dir": str(export_for_vllm(h, out_dir / "vllm_heads" / f"{i}", dtype))})
    request = {"llm": llm_kwargs(cfg, target, seed=e.seed), "heads": exports, "draft_tokens": e.draft_tokens,
               "max_new_tokens": e.max_new_tokens, "temperatures": cfg.eval_temperatures, "top_p": e.top_p,
               "seed": e.seed, "warmup": e.warmup,
               "prompts": [{"id": p.id, "turns": p.turns} for p in prompts]}
    log = out_dir / "vllm.log"
    if progress:
        print(f"[eval] vLLM: target {target}, {len(heads)} head(s); log {log}", flush=True)
    res = run_worker(WORKER, request, python, log)
    (out_dir / "vllm_raw.json").write_text(json.dumps(res))  # every token and prompt id, for checks
    base = res["baseline"]["runs"]

    def at(runs, T):
        return [r for r in runs if r["temperature"] == T]

    return {
        "version": res["vllm_version"], "target_dir": str(target), "dtype": dtype, "method": "chain",
        "draft_tokens": e.draft_tokens, "log": str(log), "raw": str(out_dir / "vllm_raw.json"),
        "baseline_init_s": res["baseline"]["init_s"],
        "heads": [{"head": str(h), "name": head_name(h), "export": x["dir"], "init_s": r["init_s"], "temperature": T,
                   **summarize_engine(at(base, T), at(r["runs"], T), e.draft_tokens, T > 0)}
                  for h, x, r in zip(heads, exports, res["heads"]) for T in cfg.eval_temperatures],
    }


def counts_to_hist(drafts: int, accepted_per_pos: list[int]) -> list[int]:
    """Drafts that accepted exactly 0..k tokens, from 'drafts that accepted position i' counts."""
    k = len(accepted_per_pos)
    at_least = [drafts] + list(accepted_per_pos) + [0]  # at_least[d]: drafts with >= d accepted
    return [at_least[d] - at_least[d + 1] for d in range(k + 1)]


def summarize_engine(base_runs: list[dict], spec_runs: list[dict], k: int, sampling: bool) -> dict:
    """One vLLM head row from the worker's per-turn runs (baseline and speculative, same order)."""
    drafts = sum(r["drafts"] for r in spec_runs)
    accepted = sum(r["accepted"] for r in spec_runs)
    per_pos = [sum(r["accepted_per_pos"][i] if i < len(r["accepted_per_pos"]) else 0 for r in spec_runs)
               for i in range(k)]
    at_least = [drafts] + per_pos
    new = sum(len(r["tokens"]) for r in spec_runs)
    base_new = sum(len(r["tokens"]) for r in base_runs)
    spec_s = sum(r["wall_s"] for r in spec_runs)
    base_s = sum(r["wall_s"] for r in base_runs)
    mism = [] if sampling else [
        {"id": s["id"], "turn": s["turn"], "first_mismatch": first_mismatch(s["tokens"], b["tokens"])}
        for b, s in zip(base_runs, spec_runs) if s["tokens"] != b["tokens"]]
    return {
        "num_prompts": len({r["id"] for r in spec_runs}),
        "num_turns": len(spec_runs),
        "new_tokens": new,
        "drafts": drafts,
        "draft_tokens": sum(r["draft_tokens"] for r in spec_runs),
        "accepted": accepted,
        "accepted_per_pos": per_pos,
        "acceptance_per_pos": [a / drafts if drafts else None for a in per_pos],
        "acceptance_by_depth": [at_least[d] / at_least[d - 1] if at_least[d - 1] else None
                                for d in range(1, k + 1)],
        "accept_length_hist": counts_to_hist(drafts, per_pos),
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        **speed_fields(base_new, base_s, new, spec_s),
        "identical": None if sampling else not mism,
        "mismatched_prompts": mism,
        "per_prompt": [{"id": s["id"], "turn": s["turn"], "new_tokens": len(s["tokens"]), "drafts": s["drafts"],
                        "accepted": s["accepted"], "wall_s": s["wall_s"], "base_wall_s": b["wall_s"],
                        "match": None if sampling else s["tokens"] == b["tokens"]}
                       for b, s in zip(base_runs, spec_runs)],
    }
