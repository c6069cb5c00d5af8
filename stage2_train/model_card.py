"""The model card (README.md) `eagle3 export` writes beside the weights, in the Hub's format.

YAML front matter (base_model when the target is a Hub repo id, library_name, tags), then what a
user of the head needs: the target and the layer ids each engine reads, the draft vocab, the
training data (the cache's sources with their sha256, samples and tokens) and the training itself
(steps, tokens seen), the held-out offline table (acc_k, simulated τ), the latest stage-3
figures when a report of this head is found (<head>/eval*/report.json, or a sibling run
directory's), and the vLLM and SGLang commands that serve it.

Everything comes from files the pipeline wrote (the head's config.json and its `training`
block, metrics.jsonl, the cache's cache.json and shard.json files, stage 3's report.json); a
missing one leaves its section out rather than failing the export. A README.md this tool did not
write (no CARD_MARK) is never overwritten: the card goes to MODEL_CARD.md then.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import yaml

from schemas.head import POSITION_RULE_KEY

CARD_MARK = "<!-- written by eagle3 export: edits are lost on the next export -->"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TAGS = ["eagle3", "speculative-decoding", "draft-model", "vllm", "sglang"]


# --------------------------------------------------------------------------- reading what the pipeline wrote


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cache_facts(cache: Optional[str]) -> dict:
    """Target, data sources, samples and tokens of the cache a head was trained on ({} if unreadable)."""
    if not cache:
        return {}
    meta = _json(Path(cache) / "cache.json")
    if meta is None:
        return {}
    samples = tokens = loss_tokens = 0
    for shard in sorted((Path(cache) / "shards").glob("*.zarr")):
        info = _json(shard / "shard.json") or {}
        samples += int(info.get("samples", 0))
        tokens += int(info.get("tokens", 0))
        loss_tokens += int(info.get("loss_tokens", 0))
    return {"target": meta.get("target") or {}, "sources": (meta.get("data") or {}).get("sources") or [],
            "samples": samples, "tokens": tokens, "loss_tokens": loss_tokens, "max_length": meta.get("max_length")}


def trained_tokens(head_dir: Path) -> Optional[int]:
    """Tokens of every training step logged in the head's metrics.jsonl (None without it)."""
    p = head_dir / "metrics.jsonl"
    if not p.is_file():
        return None
    total = 0
    for line in p.read_text().splitlines():
        try:
            total += int(json.loads(line).get("tokens") or 0)
        except (ValueError, AttributeError):
            continue
    return total


def latest_report(head_dir: Path) -> Optional[tuple[Path, dict]]:
    """The newest stage-3 report.json that evaluated this head: under the head, or one level beside it."""
    me = head_dir.resolve()
    cands = list(head_dir.glob("eval*/report.json")) + list(head_dir.parent.glob("*/report.json"))
    best = None
    for p in cands:
        rep = _json(p)
        if not rep or not any(Path(h.get("head", "")).resolve() == me for h in rep.get("heads", [])):
            continue
        if best is None or p.stat().st_mtime > best[0].stat().st_mtime:
            best = (p, rep)
    return best


# --------------------------------------------------------------------------- the card


def base_model(target_path: Optional[str]) -> Optional[str]:
    """A Hub repo id ("org/name") the target was loaded from; None for local files and directories."""
    if not target_path or Path(target_path).exists() or not HUB_ID.match(target_path):
        return None
    return target_path


def front_matter(target_path: Optional[str]) -> str:
    meta: dict = {}
    bm = base_model(target_path)
    if bm:
        meta["base_model"] = bm
    meta.update(library_name="vllm", tags=TAGS, pipeline_tag="text-generation")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def offline_table(heldout: dict) -> list[str]:
    acc = heldout.get("acc") or []
    loss = heldout.get("loss") or []
    alpha = heldout.get("alpha")  # heads trained before alpha was logged have none
    lines = ["| TTT step k | acc_k | alpha_k | loss_k |" if alpha else "| TTT step k | acc_k | loss_k |",
             "|---:|---:|---:|---:|" if alpha else "|---:|---:|---:|"]
    for k, a in enumerate(acc):
        al = f" {_f(alpha[k] if k < len(alpha) else None)} |" if alpha else ""
        lines.append(f"| {k} | {a:.3f} |{al} {_f(loss[k] if k < len(loss) else None)} |")
    lines.append(f"\nSimulated acceptance length τ = 1 + Σ_k Π_j≤k acc_j = **{_f(heldout.get('simulated_tau'))}** "
                 f"({heldout.get('num_samples', '?')} held-out samples, teacher-forced).")
    if alpha:
        lines.append(f"At T = 1: τ = 1 + Σ_k Π_j≤k alpha_j = **{_f(heldout.get('simulated_tau_t1'))}**, alpha_k = "
                     "Σ_v min(p, q) over the target's cached top-K (a lower bound of the acceptance).")
    return lines


def stage3_table(path: Path, rep: dict, head_dir: Path) -> list[str]:
    me = head_dir.resolve()
    head = next(h for h in rep["heads"] if Path(h.get("head", "")).resolve() == me)
    prompts = ", ".join(Path(p).name for p in rep.get("prompts", [])) or "?"
    lines = [f"From `{path}` (prompts: {prompts}; {rep.get('settings', {}).get('max_new_tokens', '?')} new tokens "
             f"a prompt):", "",
             "| method | prompts | τ (mean acceptance length) | speed-up | lossless |", "|---|---:|---:|---:|---|"]
    for m in head.get("methods", []):
        ll = {True: "yes", False: "no", None: "n/a"}.get(m.get("lossless"), "?")
        lines.append(f"| {m['method']} | {m.get('num_prompts', '?')} | {_f(m.get('tau'))} | "
                     f"{_f(m.get('speedup'), '{:.2f}×')} | {ll} |")
    for h in (rep.get("vllm") or {}).get("heads", []):
        lines.append(f"| chain, vLLM {rep['vllm'].get('version', '')} | {h.get('num_prompts', '?')} | "
                     f"{_f(h.get('mean_acceptance_length'))} | {_f(h.get('speedup'), '{:.2f}×')} | "
                     f"{'yes' if h.get('identical') else 'no'} |")
    return lines


def serve_commands(target: str, export_dir: Path, k: int = 3) -> list[str]:
    spec = json.dumps({"method": "eagle3", "model": str(export_dir), "num_speculative_tokens": k})
    return ["vLLM:", "", "```bash", f"vllm serve {target} --speculative-config '{spec}'", "```", "",
            "SGLang:", "", "```bash",
            f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 \\",
            f"    --speculative-draft-model-path {export_dir} --speculative-num-steps {k} \\",
            f"    --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}", "```"]


# train.layer_init as the head recorded it (auto is resolved before training: stage2_train/start.py)
START = {"target": "decoder layer started from the target's last layer", "random": "started from scratch"}


def model_card(config: dict, head_dir: str | Path, export_dir: str | Path) -> str:
    """The README.md text for an export of `head_dir` (config: the exported config.json)."""
    head_dir, export_dir = Path(head_dir), Path(export_dir)
    tr = config.get("training") or {}
    cache = cache_facts(tr.get("cache"))
    tgt = cache.get("target") or {}
    target = tgt.get("path") or config.get("target_model_type") or "TARGET"
    ex = config.get("export") or {}
    hf_ids = ex.get("hf_hidden_states_layer_ids") or (config.get("eagle_config") or {}).get("hf_hidden_states_layer_ids")
    lines = [front_matter(tgt.get("path")), CARD_MARK, "", f"# EAGLE-3 draft head for `{target}`", "",
             "A one-layer EAGLE-3 draft head for speculative decoding, trained offline by eagle3 from a "
             "feature cache of the target (stage 1 extracts, stage 2 trains). The target verifies every "
             "drafted token: what is generated is the target's own output.", "",
             "| | |", "|---|---|",
             f"| target | `{target}` ({tgt.get('model_type', config.get('target_model_type', '?'))}, "
             f"{config.get('target_num_hidden_layers', tgt.get('num_hidden_layers', '?'))} layers, "
             f"hidden {config.get('target_hidden_size', '?')}) |",
             f"| layer ids (HF hidden_states indices) | {hf_ids} |",
             f"| … as vLLM reads them / as SGLang reads them | {ex.get('vllm_layer_ids')} / {ex.get('sglang_layer_ids')} |",
             f"| draft vocab | {config.get('draft_vocab_size')} tokens"
             + (f" (cover {tr['vocab_coverage']:.1%} of the training answers' tokens)" if tr.get("vocab_coverage") else "")
             + " |",
             f"| TTT length, rotary rule | {tr.get('ttt_length', '?')}, {config.get(POSITION_RULE_KEY, '?')} |",
             f"| weights dtype | {config.get('torch_dtype', '?')} |", ""]
    lines += ["## Training data", ""]
    if cache:
        lines.append(f"Cache `{tr.get('cache')}`: {cache['samples']:,} conversations, {cache['tokens']:,} tokens "
                     f"({cache['loss_tokens']:,} answer tokens), max length {cache.get('max_length')}. Sources:")
        lines += [""] + [f"* `{s.get('path')}` (sha256 `{s.get('sha256')}`)" for s in cache["sources"]]
    else:
        lines.append(f"Cache `{tr.get('cache', '?')}` (not readable from here: its sources are not listed).")
    seen = trained_tokens(head_dir)
    lines += ["", f"Training: {tr.get('total_steps', '?')} steps (kept: step {tr.get('best_step', tr.get('final_step', '?'))})"
              + (f", {seen:,} tokens seen" if seen else "") + f", lr {tr.get('lr', '?')}, "
              f"compute dtype {tr.get('compute_dtype', '?')}, {START.get(tr.get('layer_init'), 'start not recorded')}, "
              f"cache id `{tr.get('cache_id', '?')}`.", ""]
    if tr.get("heldout"):
        lines += ["## Held-out accuracy (offline)", ""] + offline_table(tr["heldout"]) + [""]
    found = latest_report(head_dir)
    if found:
        lines += ["## Speculative decoding with the target (stage 3)", ""] + stage3_table(*found, head_dir) + [""]
    # engines load a Hub id or an HF directory; a .gguf / pkg: target is served from its converted dir
    served = target if base_model(target) or Path(target).is_dir() else (tgt.get("hf_dir") or target)
    lines += ["## Serving", ""] + serve_commands(served, export_dir) + [""]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path, head_dir: str | Path, config: dict) -> Path:
    """Write the card into the export directory (atomically); returns its path."""
    out = Path(export_dir)
    path = out / "README.md"
    if path.exists() and CARD_MARK not in path.read_text(errors="replace"):
        path = out / "MODEL_CARD.md"        # a README.md someone else wrote stays as it is
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model_card(config, head_dir, out))
    os.replace(tmp, path)
    return path
