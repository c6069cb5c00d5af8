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
Sampling (every T > 0 of `eval.temperatures`): token identity means nothing there; the
lossless column is the sampling check of stage3_eval/sampling_check.py instead (from the first
`eval.lossless_prefixes` prompts, `eval.lossless_runs` seeded runs each: the tokens after the
first follow the target's distribution, chi-square test at level 1e-3, with its power). The
baseline at temperature T is plain sampling at T on the same path, so speed-ups compare like
with like.
Before any decoding with tree methods, the tree-verification path is checked
against sequential decoding (TargetRunner.check_tree_verify) and eval refuses to
run when they disagree.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from schemas.dirkind import ensure_writable, mark
from schemas.target import load_target
from schemas.vllm_runtime import engine_python
from stage3_eval.draft_runner import DraftRunner, head_layer_ids, load_draft
from stage3_eval.offline import offline_table
from stage3_eval.prompts import load_prompts, render
from stage3_eval.report import first_mismatch, summarize, write_report
from stage3_eval.sampling_check import sampling_check
from stage3_eval.spec_decode import DecodeSettings, generate
from stage3_eval.target_runner import TargetRunner
from stage3_eval.vllm_engine import run_vllm_eval


def settings_for(cfg, method: str, temperature: float | None = None) -> DecodeSettings:
    e = cfg.eval
    return DecodeSettings(method=method, draft_tokens=e.draft_tokens, top_k=e.top_k, depth=e.depth,
                          total_tokens=e.total_tokens, max_new_tokens=e.max_new_tokens,
                          temperature=cfg.eval_temperatures[0] if temperature is None else temperature,
                          top_p=e.top_p)


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
    out = check_eval_output(cfg)  # before the target loads: a wrong eval.output costs nothing
    if e.engine == "vllm":
        return _finish(cfg, heads, [], {}, prompts, vllm_python, progress, out=out)
    model, tok = model_tok if model_tok is not None else load_target(cfg.target)[:2]
    methods = cfg.eval_methods
    drafts = []
    for h in heads:
        d = load_draft(h, model)
        drafts.append((h, DraftRunner(d), TargetRunner(model, head_layer_ids(d))))
    base_runner = TargetRunner(model, None)
    eos = _eos_ids(tok, model)
    temps = cfg.eval_temperatures
    gen = torch.Generator(device=base_runner.device).manual_seed(e.seed)
    tree_check = None
    if prompts and "tree" in methods:  # refuses (TargetRunError) when tree masks are not honoured
        tree_check = base_runner.check_tree_verify(render(tok, [{"role": "user", "content": prompts[0].turns[0]}]))
        for _, _, tr in drafts:  # the same model: the same mask convention
            tr.mask_convention = base_runner.mask_convention
    run = _Decoding(cfg, tok, eos, gen, base_runner, drafts, methods)
    if prompts and e.warmup:
        run.warm_up(prompts[0])
    total = sum(len(p.turns) for p in prompts) * len(temps)
    bar = _bar(progress, total, "eval prompts", "turn")
    records: dict[tuple[int, str, float], list[dict]] = {}
    for T in temps:
        for p in prompts:
            run.conversation(p, T, records, bar)
    if bar is not None:
        bar.close()
    checks = _sampling_checks(cfg, tok, drafts, methods, prompts, progress)
    return _finish(cfg, heads, methods, records, prompts, vllm_python, progress, out=out,
                   target_dtype=base_runner.dtype, tree_check=tree_check, checks=checks,
                   device=base_runner.device)


def _bar(progress: bool, total: int, desc: str, unit: str):
    if not progress or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


class _Decoding:
    """The baseline and every head/method on the same prompts, interleaved (module docstring)."""

    def __init__(self, cfg, tok, eos, gen, base_runner, drafts, methods):
        self.cfg, self.tok, self.eos, self.gen = cfg, tok, eos, gen
        self.base_runner, self.drafts, self.methods = base_runner, drafts, methods

    def timed(self, runner, drafter, ids, s):
        best = None
        for _ in range(self.cfg.eval.repeats):
            r = generate(runner, drafter, ids, s, eos_ids=self.eos, gen=self.gen)
            if best is None or r.wall_s < best.wall_s:
                best = r
        return best

    def warm_up(self, prompt):
        """First prompt, every configuration, untimed."""
        ids = render(self.tok, [{"role": "user", "content": prompt.turns[0]}])
        for _ in range(self.cfg.eval.warmup):
            for T in self.cfg.eval_temperatures:
                generate(self.base_runner, None, ids, settings_for(self.cfg, "plain", T), eos_ids=self.eos,
                         gen=self.gen)
                for _, dr, tr in self.drafts:
                    for m in self.methods:
                        generate(tr, dr, ids, settings_for(self.cfg, m, T), eos_ids=self.eos, gen=self.gen)

    def conversation(self, p, T: float, records: dict, bar) -> None:
        """Every turn of prompt p at temperature T; turn t+1 follows the baseline's answer to turn t."""
        messages: list[dict] = []
        for turn, text in enumerate(p.turns):
            messages.append({"role": "user", "content": text})
            ids = render(self.tok, messages)
            base = self.timed(self.base_runner, None, ids, settings_for(self.cfg, "plain", T))
            for hi, (_, dr, tr) in enumerate(self.drafts):
                for m in self.methods:
                    r = self.timed(tr, dr, ids, settings_for(self.cfg, m, T))
                    records.setdefault((hi, m, T), []).append(self.record(p, turn, ids, r, base, T))
            answer = base.tokens[:-1] if base.tokens and base.tokens[-1] in self.eos else base.tokens
            messages.append({"role": "assistant",
                             "content": self.tok.decode(answer, skip_special_tokens=True).strip()})
            if bar is not None:
                bar.update(1)

    def record(self, p, turn: int, ids, r, base, T: float) -> dict:
        match = None if T > 0 else (r.tokens == base.tokens)
        first = None if match in (None, True) else first_mismatch(r.tokens, base.tokens)
        return {"id": p.id, "turn": turn + 1, "new_tokens": r.new_tokens, "passes": r.forward_passes,
                "accept_lengths": r.accept_lengths, "drafted_depths": r.drafted_depths,
                "wall_s": r.wall_s, "base_new_tokens": base.new_tokens, "base_wall_s": base.wall_s,
                "match": match, "first_mismatch": first,
                "mismatch": None if first is None
                else mismatch_detail(self.base_runner, ids, base.tokens, r.tokens, first)}


def _sampling_checks(cfg, tok, drafts, methods, prompts, progress) -> dict:
    """(head, method, T) -> the sampling lossless check, for every T > 0 (eval.lossless_runs > 0)."""
    e = cfg.eval
    temps = [T for T in cfg.eval_temperatures if T > 0]
    if not (temps and prompts and e.lossless_runs):
        return {}
    prefixes = [render(tok, [{"role": "user", "content": p.turns[0]}]) for p in prompts[:e.lossless_prefixes]]
    bar = _bar(progress, len(drafts) * len(methods) * len(temps) * len(prefixes) * e.lossless_runs,
               "sampling lossless check", "run")
    out = {}
    for hi, (_, dr, tr) in enumerate(drafts):
        for m in methods:
            for T in temps:
                out[(hi, m, T)] = sampling_check(tr, dr, prefixes, settings_for(cfg, m, T), runs=e.lossless_runs,
                                                 tokens=e.lossless_tokens, seed=e.seed,
                                                 progress=(bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    return out


def check_eval_output(cfg) -> Path:
    """eval.output (default <head>/eval) must be new, empty or an earlier eval output (schemas.dirkind):
    never a model, a cache, a head or a directory of someone else's files. Nothing is created yet."""
    out = Path(cfg.eval.output) if cfg.eval.output else Path(cfg.heads[0]) / "eval"
    ensure_writable(out, ("missing", "empty", "eval"), "eval.output",
                    hint="Set eval.output to a new or empty directory (or an earlier eval output).")
    return out


def open_eval_output(out: Path) -> Path:
    """Asked again (the directory may have changed while the target ran), then created and marked as an
    eval output: the next eval may write there, nothing else will."""
    ensure_writable(out, ("missing", "empty", "eval"), "eval.output",
                    hint="Set eval.output to a new or empty directory (or an earlier eval output).")
    mark(out, "eval", "eagle3 eval")
    return out


def _finish(cfg, heads, methods, records, prompts, vllm_python, progress, *, out: Path, target_dtype=None,
            tree_check=None, checks=None, device=None) -> dict:
    """Summaries (HF methods, offline table, vLLM section when asked for) -> report files."""
    e = cfg.eval
    report = {
        "target": cfg.target.path,
        "prompts": list(e.prompts),
        "settings": {"max_new_tokens": e.max_new_tokens, "temperature": cfg.eval_temperatures[0],
                     "temperatures": cfg.eval_temperatures, "top_p": e.top_p,
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
        for T in (cfg.eval_temperatures if methods else []):
            for m in methods:
                row = summarize(m, records.get((hi, m, T), []), settings_for(cfg, m, T).max_depth)
                row["temperature"] = T
                check = (checks or {}).get((hi, m, T))
                if check is not None:  # sampling: the lossless column is the distribution test
                    row["sampling_check"] = check
                    row["lossless"] = check["pass"]
                entry["methods"].append(row)
        entry["offline"] = offline_table(h, cfg, progress=progress, device=device) if e.offline else None
        report["heads"].append(entry)
    open_eval_output(out)
    if vllm_python is not None:
        report["vllm"] = run_vllm_eval(cfg, heads, prompts, out, vllm_python, progress=progress)
    paths = write_report(report, out)
    report["files"] = {k: str(v) for k, v in paths.items()}
    return report
