"""Stage 3: every head in `eval.head` x every method in `eval.method`, against the target.

For each prompt (and MT-bench turn) the plain target decodes first (the baseline,
same KV-cache path, greedy at temperature 0), then every head/method pair decodes
the same prompt; timings are interleaved this way so machine load hits both alike.
Each timing is the minimum over `eval.repeats` runs, after `eval.warmup` untimed
runs. Turn 2 of an MT-bench question follows the target's own (baseline) answer.

Lossless check (greedy). A speculative output must equal the baseline token for
token. Where they first differ, the target is run once more over the baseline
prefix and the difference is a *tie* when the target's logit for the speculative
token is within `TIE_ULPS` units in the last place (of the target's dtype, at the
top-1 logit's magnitude) of its top-1 logit: batched verification and one-token
decoding round differently in bf16 (ulp 0.125 at a logit of 20, so a tie is a gap
of <= 0.5 there; in fp32 the same rule allows ~8e-6), and a near-tied argmax may
flip. Ties are counted and listed, not failures; anything else is a failure.
Before any decoding with tree methods, the tree-verification path is checked
against sequential decoding (TargetRunner.check_tree_verify) and eval refuses to
run when they disagree.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from schemas.target import load_target
from schemas.vllm_runtime import engine_python
from stage3_eval.draft_runner import DraftRunner, head_layer_ids, load_draft
from stage3_eval.offline import offline_table
from stage3_eval.prompts import load_prompts, render
from stage3_eval.report import first_mismatch, summarize, write_report
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
    # config.json and generation_config.json may each name only some eos ids (MiniCPM4: [2, 73440])
    for e in (getattr(model.config, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids |= set(int(x) for x in e) if isinstance(e, (list, tuple)) else ({int(e)} if e is not None else set())
    return ids


TIE_ULPS = 4


def tie_tolerance(top1_logit: float, dtype: torch.dtype) -> float:
    """TIE_ULPS units in the last place of `dtype` at the magnitude of the top-1 logit."""
    mag = max(abs(float(top1_logit)), 1e-30)
    return TIE_ULPS * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(mag))


@torch.no_grad()
def mismatch_detail(runner: TargetRunner, prompt_ids: list[int], base: list[int], spec: list[int],
                    pos: int) -> dict:
    """Where spec decoding first left the baseline: the target's top-1/top-2 margin there, and tie or not."""
    d: dict = {"position": pos, "base_token": base[pos] if pos < len(base) else None,
               "spec_token": spec[pos] if pos < len(spec) else None}
    if d["base_token"] is None or d["spec_token"] is None:  # one output ended early: never a tie
        d.update(tie=False, reason="lengths differ")
        return d
    seq = torch.tensor(list(prompt_ids) + list(base[:pos]), dtype=torch.long, device=runner.device)[None]
    try:
        logits = runner.model(input_ids=seq, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    except TypeError:  # remote code without logits_to_keep
        logits = runner.model(input_ids=seq, use_cache=False).logits[0, -1].float()
    top = logits.topk(2)
    top1, top2 = (float(v) for v in top.values)
    gap = top1 - float(logits[d["spec_token"]])
    tol = tie_tolerance(top1, runner.dtype)
    d.update(top1_token=int(top.indices[0]), top1_logit=top1, top2_logit=top2, margin=top1 - top2,
             spec_token_gap=gap, tolerance=tol, tie=gap <= tol)
    return d


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


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
    gen = torch.Generator(device=base_runner.device).manual_seed(e.seed)
    tree_check = None
    if prompts and "tree" in methods:  # refuses (TargetRunError) when tree masks are not honoured
        tree_check = base_runner.check_tree_verify(render(tok, [{"role": "user", "content": prompts[0].turns[0]}]))
        for _, _, tr in drafts:  # the same model: the same mask convention
            tr.mask_convention = base_runner.mask_convention

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
                    first = None if match in (None, True) else first_mismatch(r.tokens, base.tokens)
                    records[(hi, m)].append({
                        "id": p.id, "turn": turn + 1, "new_tokens": r.new_tokens, "passes": r.forward_passes,
                        "accept_lengths": r.accept_lengths, "drafted_depths": r.drafted_depths,
                        "wall_s": r.wall_s, "base_new_tokens": base.new_tokens, "base_wall_s": base.wall_s,
                        "match": match, "first_mismatch": first,
                        "mismatch": None if first is None
                        else mismatch_detail(base_runner, ids, base.tokens, r.tokens, first)})
            answer = base.tokens[:-1] if base.tokens and base.tokens[-1] in eos else base.tokens
            messages.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True).strip()})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return _finish(cfg, heads, methods, records, prompts, vllm_python, progress,
                   target_dtype=base_runner.dtype, tree_check=tree_check, device=base_runner.device)


def _finish(cfg, heads, methods, records, prompts, vllm_python, progress, *, target_dtype=None,
            tree_check=None, device=None) -> dict:
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
    if target_dtype is not None:  # our HF decoding ran: how its lossless check counts ties
        dt = _dtype_name(target_dtype)
        report["settings"]["tie_rule"] = f"spec token's logit within {TIE_ULPS} ulp ({dt}) of the target's top-1 logit"
        report["tree_verify_check"] = tree_check
    for hi, h in enumerate(heads):
        entry = {"head": str(h), "name": Path(h).name if Path(h).name != "head" else str(h), "methods": []}
        for m in methods:
            depth = settings_for(cfg, m).max_depth
            entry["methods"].append(summarize(m, records[(hi, m)], depth))
        entry["offline"] = offline_table(h, cfg, progress=progress, device=device) if e.offline else None
        report["heads"].append(entry)
    out = Path(e.output) if e.output else Path(heads[0]) / "eval"
    if vllm_python is not None:
        report["vllm"] = run_vllm_eval(cfg, heads, prompts, out, vllm_python, progress=progress)
    paths = write_report(report, out)
    report["files"] = {k: str(v) for k, v in paths.items()}
    return report
