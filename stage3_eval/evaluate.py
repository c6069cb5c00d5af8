"""Stage 3: every head in `eval.head` x every method in `eval.method`, against the target.

For each prompt (and MT-bench turn) the plain target decodes first (the baseline,
same KV-cache path, greedy at temperature 0), then every head/method pair decodes
the same prompt; timings are interleaved this way so machine load hits both alike.
Each timing is the minimum over `eval.repeats` runs, after `eval.warmup` untimed
runs. Turn 2 of an MT-bench question follows the target's own (baseline) answer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from schemas.target import load_target
from schemas.vllm_runtime import engine_python
from stage3_eval.draft_runner import DraftRunner, head_layer_ids, load_draft
from stage3_eval.offline import offline_table
from stage3_eval.prompts import load_prompts, render
from stage3_eval.report import summarize, write_report
from stage3_eval.spec_decode import DecodeSettings, generate
from stage3_eval.target_runner import TargetRunner
from stage3_eval.vllm_engine import run_vllm_eval


def settings_for(cfg, method: str) -> DecodeSettings:
    e = cfg.eval
    return DecodeSettings(method=method, draft_tokens=e.draft_tokens, top_k=e.top_k, depth=e.depth,
                          total_tokens=e.total_tokens, max_new_tokens=e.max_new_tokens,
                          temperature=e.temperature, top_p=e.top_p)


def _eos_ids(tok, model) -> set[int]:
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    e = getattr(model.config, "eos_token_id", None)
    ids |= set(e) if isinstance(e, (list, tuple)) else ({int(e)} if e is not None else set())
    return ids


def _first_mismatch(a: list[int], b: list[int]):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_eval(cfg, *, progress: bool = True, model_tok=None) -> dict:
    """Run stage 3 and write report.json/.md/.png; returns the report dict.

    model_tok: an already loaded (model, tokenizer) pair (tests, sweeps) instead of cfg.target.
    eval.engine: hf = our decoding below; vllm = the exported heads in vLLM (stage3_eval/vllm_engine.py)
    instead; both = the two on the same prompts, in one report.
    """
    e = cfg.eval
    # A missing vLLM fails here, before the target loads or anything is written.
    vllm_python = engine_python(cfg.vllm) if e.engine in ("vllm", "both") else None
    prompts = load_prompts(e.prompts, max_prompts=e.max_prompts, max_turns=e.max_turns)
    heads = cfg.heads
    if e.engine == "vllm":
        return _finish(cfg, heads, [], {}, prompts, vllm_python, progress)
    model, tok = model_tok if model_tok is not None else load_target(cfg.target)[:2]
    methods = cfg.eval_methods
    drafts = []
    for h in heads:
        d = load_draft(h, model)
        drafts.append((h, DraftRunner(d), TargetRunner(model, head_layer_ids(d))))
    base_runner = TargetRunner(model, None)
    eos = _eos_ids(tok, model)
    base_s = settings_for(cfg, "plain")
    sampling = e.temperature > 0
    gen = torch.Generator().manual_seed(e.seed)

    def timed(runner, drafter, ids, s):
        best = None
        for _ in range(e.repeats):
            r = generate(runner, drafter, ids, s, eos_ids=eos, gen=gen)
            if best is None or r.wall_s < best.wall_s:
                best = r
        return best

    # warm-up: first prompt, every configuration, untimed
    if prompts and e.warmup:
        ids = render(tok, [{"role": "user", "content": prompts[0].turns[0]}])
        for _ in range(e.warmup):
            generate(base_runner, None, ids, base_s, eos_ids=eos, gen=gen)
            for _, dr, tr in drafts:
                for m in methods:
                    generate(tr, dr, ids, settings_for(cfg, m), eos_ids=eos, gen=gen)

    records: dict[tuple[int, str], list[dict]] = {(i, m): [] for i in range(len(heads)) for m in methods}
    total = sum(len(p.turns) for p in prompts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval prompts", unit="turn")
    for p in prompts:
        messages: list[dict] = []
        for turn, text in enumerate(p.turns):
            messages.append({"role": "user", "content": text})
            ids = render(tok, messages)
            base = timed(base_runner, None, ids, base_s)
            for hi, (_, dr, tr) in enumerate(drafts):
                for m in methods:
                    r = timed(tr, dr, ids, settings_for(cfg, m))
                    match = None if sampling else (r.tokens == base.tokens)
                    records[(hi, m)].append({
                        "id": p.id, "turn": turn + 1, "new_tokens": r.new_tokens, "passes": r.forward_passes,
                        "accept_lengths": r.accept_lengths, "drafted_depths": r.drafted_depths,
                        "wall_s": r.wall_s, "base_new_tokens": base.new_tokens, "base_wall_s": base.wall_s,
                        "match": match, "first_mismatch": None if match in (None, True)
                        else _first_mismatch(r.tokens, base.tokens)})
            answer = base.tokens[:-1] if base.tokens and base.tokens[-1] in eos else base.tokens
            messages.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True).strip()})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return _finish(cfg, heads, methods, records, prompts, vllm_python, progress)


def _finish(cfg, heads, methods, records, prompts, vllm_python, progress) -> dict:
    """Summaries (HF methods, offline table, vLLM section when asked for) -> report files."""
    e = cfg.eval
    report = {
        "target": cfg.target.path,
        "prompts": list(e.prompts),
        "settings": {"max_new_tokens": e.max_new_tokens, "temperature": e.temperature, "top_p": e.top_p,
                     "draft_tokens": e.draft_tokens, "top_k": e.top_k, "depth": e.depth,
                     "total_tokens": e.total_tokens, "repeats": e.repeats, "warmup": e.warmup,
                     "max_prompts": e.max_prompts, "max_turns": e.max_turns,
                     "torch_threads": torch.get_num_threads(), "engine": e.engine},
        "heads": [],
    }
    for hi, h in enumerate(heads):
        entry = {"head": str(h), "name": Path(h).name if Path(h).name != "head" else str(h), "methods": []}
        for m in methods:
            depth = settings_for(cfg, m).max_depth
            entry["methods"].append(summarize(m, records[(hi, m)], depth))
        entry["offline"] = offline_table(h, cfg, progress=progress) if e.offline else None
        report["heads"].append(entry)
    out = Path(e.output) if e.output else Path(heads[0]) / "eval"
    if vllm_python is not None:
        report["vllm"] = run_vllm_eval(cfg, heads, prompts, out, vllm_python, progress=progress)
    paths = write_report(report, out)
    report["files"] = {k: str(v) for k, v in paths.items()}
    return report
