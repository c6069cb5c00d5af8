"""Answer regeneration: the target writes its own answers (EAGLE-3 / SpecForge practice).

Every assistant turn of every conversation is replaced, in order, by the target's
answer to the conversation so far; prompt-only records (user turns only) get an
answer after each user turn. Acceptance rises when the head learns the target's
own style rather than the style of whoever wrote the data set.

The hf engine generates in left-padded batches of data.regenerate.batch_size rows; every
EVICT_EVERY tokens the rows that have stopped leave the batch and its KV cache (decode_evicting),
so a batch costs what its answers cost rather than batch rows x its longest answer.

The output is a ShareGPT JSONL ({"id", "conversations": [{"from", "value"}]}),
written one whole conversation per line, flushed and fsynced after each batch.
A re-run appends: ids already in the file are skipped, and a trailing partial
line left by a killed process is dropped first, so a conversation is never
duplicated or lost.

data.regenerate.engine: vllm runs the same plan through vLLM's offline batch API in the
engine venv (stage1_extract/vllm_regen_worker.py, schemas/vllm_runtime.py): the worker
appends the same lines in chunks of batch_size conversations, with the same resume rules.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from schemas.config import RunConfig

ROLE_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
META_SUFFIX = ".meta.json"
VLLM_WORKER = Path(__file__).with_name("vllm_regen_worker.py")
# Settings that change what the answers are: resuming under different ones would mix two data sets.
META_KEYS = ("target", "max_new_tokens", "temperature", "top_p", "seed")
EVICT_EVERY = 32  # tokens generated between two evictions of the rows that have stopped (decode_evicting)
# On a GPU a decode step of HF generate is host-bound: ~75 ms for SmolLM2 on an H200 at 32 and at
# 256 rows alike (bench/regen_profile.py), so a small batch leaves the GPU idle.
GPU_MIN_BATCH = 64


class RegenerateError(ValueError):
    pass


@dataclass
class _Item:
    key: str                 # output id (unique)
    prompts: list[list[dict]]  # the user-turn groups, each a list of messages preceding one answer
    system: Optional[dict]


def default_output(cfg: RunConfig) -> Path:
    """data.regenerate.output, or <run dir>/regenerated.jsonl (run dir = the cache's parent)."""
    if cfg.data.regenerate.output:
        return Path(cfg.data.regenerate.output)
    return Path(cfg.extract.cache).parent / "regenerated.jsonl"


def _split_turns(messages: list[dict]) -> tuple[Optional[dict], list[list[dict]]]:
    """(leading system message, prompt groups). Original assistant turns are dropped; every user
    turn (with any non-user message before it) is one group, answered once -- so prompt-only
    records with several user turns in a row get an answer after each."""
    system = None
    groups: list[list[dict]] = []
    cur: list[dict] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            system = {"role": "system", "content": m["content"]}
        elif role == "assistant":
            continue
        else:
            cur.append({"role": role, "content": m["content"]})
            if role == "user":
                groups.append(cur)
                cur = []
    return system, groups


def _unique_keys(convs) -> list[str]:
    """Stable output ids: the record's id, else FILE:LINE; repeated ids get '#2', '#3', ..."""
    seen: dict[str, int] = {}
    keys = []
    for c in convs:
        base = str(c.id) if c.id not in (None, "") else f"{Path(c.source).name}:{c.line}"
        n = seen.get(base, 0) + 1
        seen[base] = n
        keys.append(base if n == 1 else f"{base}#{n}")
    return keys


def scan_output(path: Path, *, repair: bool = True) -> set[str]:
    """Ids already written; drops a trailing partial line (a killed writer) when `repair`."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        data = data[:cut]
    ids: set[str] = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ids.add(str(rec["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RegenerateError(f"{path}:{n}: id: not a regenerated conversation ({e}); "
                                  f"delete the file or choose another data.regenerate.output") from None
    return ids


def _meta(cfg: RunConfig) -> dict:
    r = cfg.data.regenerate
    return {"target": cfg.target.path, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
            "top_p": r.top_p, "seed": r.seed}


def _check_meta(out: Path, cfg: RunConfig) -> None:
    _same_settings(out, cfg)
    mp = out.with_name(out.name + META_SUFFIX)
    mp.parent.mkdir(parents=True, exist_ok=True)
    mp.write_text(json.dumps(_meta(cfg), indent=2) + "\n")


def _same_settings(out: Path, cfg: RunConfig) -> None:
    """Refuse an output written with other settings (target, max_new_tokens, sampling)."""
    mp = out.with_name(out.name + META_SUFFIX)
    if mp.is_file() and out.exists():
        have, want = json.loads(mp.read_text()), _meta(cfg)
        diff = [f"{k}: {have.get(k)!r} -> {want[k]!r}" for k in META_KEYS if have.get(k) != want[k]]
        if diff:
            raise RegenerateError(
                f"{out} was written with other settings ({'; '.join(diff)}); delete it or set "
                f"data.regenerate.output to a new file")


def pending(cfg: RunConfig) -> tuple[Path, int, int]:
    """(output path, conversations in the input, conversations still to write) without loading the target."""
    items, out, done = _plan(cfg, repair=False)
    _same_settings(out, cfg)
    return out, len(items), sum(1 for it in items if it.key not in done)



def _plan(cfg: RunConfig, *, repair: bool):
    from stage1_extract.conversations import load_conversations

    if not cfg.data.train:
        raise RegenerateError("data.train is empty: nothing to regenerate")
    convs, _stats = load_conversations(list(cfg.data.train), on_error=cfg.data.on_error,
                                       max_samples=cfg.data.max_samples, num_proc=cfg.data.num_proc,
                                       require_assistant=False)
    items = []
    for key, c in zip(_unique_keys(convs), convs):
        system, groups = _split_turns(c.messages)
        if groups:  # a record without any user turn has nothing to answer
            items.append(_Item(key, groups, system))
    out = default_output(cfg)
    check_output(out, cfg)
    done = scan_output(out, repair=repair)
    return items, out, done


def check_output(out: Path, cfg: RunConfig) -> None:
    """The output is a new file or one this command wrote (its .meta.json beside it): never an input file,
    a directory, or someone else's file (a resumed run truncates a trailing partial line)."""
    for p in [*cfg.data.train, *cfg.data.eval]:
        q = Path(p).expanduser()
        if out.exists() and q.exists() and os.path.samefile(out, q) or out.resolve() == q.resolve():
            raise RegenerateError(f"data.regenerate.output {out} is the input file {p} of data.train/data.eval: "
                                  "regenerating into it would read its own ids as done and write nothing. "
                                  "Set data.regenerate.output to a new file")
    if out.is_dir():
        raise RegenerateError(f"data.regenerate.output {out} is a directory; give a .jsonl file path")
    if out.is_file() and out.stat().st_size and not out.with_name(out.name + META_SUFFIX).is_file():
        raise RegenerateError(f"data.regenerate.output {out} exists and was not written by eagle3 regenerate "
                              f"(no {out.name}{META_SUFFIX} beside it); refusing to append to it. "
                              "Set data.regenerate.output to a new file")


def batch_note(device: str, batch_size: int) -> Optional[str]:
    """The hint printed when the hf engine runs on a GPU with a batch far too small for it."""
    if device.startswith("cuda") and batch_size < GPU_MIN_BATCH:
        return (f"[regenerate] data.regenerate.batch_size={batch_size} on {device}: a decode step costs about "
                f"the same at 32 and 256 rows there (host-bound), so most of the GPU waits; use hundreds "
                f"(bench/regen_profile.py)")
    return None


def _to_sharegpt(key: str, messages: list[dict]) -> dict:
    return {"id": key, "conversations": [{"from": ROLE_TO_SHAREGPT[m["role"]], "value": m["content"]}
                                         for m in messages]}


def _stop_ids(tok, model) -> list[int]:
    ids = set()
    # MiniCPM4 stops at </s> and <|im_end|>: the tokenizer names one, config.json both, and
    # generation_config.json may name either; every source counts.
    for v in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def _prompt_len(tok, messages: list[dict]) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _generate(model, tok, prompts: list[list[dict]], cfg: RunConfig, seed: int) -> list[str]:
    """Batched generation over chat prompts, LEFT padded so every row ends at its prompt end."""
    import torch

    from stage1_extract.kv_slab import slab_cache

    r = cfg.data.regenerate
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else _stop_ids(tok, model)[0]
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    att = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        att[i, width - len(e):] = 1
    dev = next(model.parameters()).device
    kw = dict(max_new_tokens=r.max_new_tokens, pad_token_id=pad, eos_token_id=_stop_ids(tok, model),
              cache=slab_cache(model.config, width + r.max_new_tokens))  # no torch.cat per token
    if r.temperature > 0:
        torch.manual_seed(seed)
        kw.update(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        new = decode_evicting(model, ids.to(dev), att.to(dev), kw)
    return [tok.decode(g, skip_special_tokens=True).strip() for g in new.cpu()]


def decode_evicting(model, ids, att, kw: dict):
    """model.generate(input_ids=ids, attention_mask=att, **kw) over a left-padded batch, EVICT_EVERY
    tokens at a time: between calls the rows that have stopped (kw["eos_token_id"]) leave the batch and
    the KV cache (kw["cache"]), so they cost no more compute. Returns [B, kw["max_new_tokens"]]: each
    input row's new tokens, kw["pad_token_id"] after its stop, as one generate call returns them.

    A batch otherwise runs every row to its longest answer: on the demo's prompts 1.53 decode slots
    per answer token against 1.04 with eviction every 32 tokens (bench/regen_evict.py)."""
    import torch

    max_new = kw["max_new_tokens"]
    out = torch.full((ids.shape[0], max_new), kw["pad_token_id"], dtype=torch.long, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)  # the input row of each row still decoding
    stops = torch.tensor(kw["eos_token_id"], dtype=torch.long, device=ids.device)
    made = 0
    while made < max_new and len(rows):
        step = min(EVICT_EVERY, max_new - made)
        gen = model.generate(input_ids=ids, attention_mask=att, **{**kw, "max_new_tokens": step})
        new = gen[:, ids.shape[1]:]
        out[rows, made:made + new.shape[1]] = new
        made += new.shape[1]
        ids, att = gen, torch.cat((att, att.new_ones(new.shape)), dim=1)
        live = ~torch.isin(new, stops).any(dim=1)
        if not bool(live.all()):  # one host sync per EVICT_EVERY tokens
            keep = live.nonzero().squeeze(1)
            ids, att, rows = ids[keep], att[keep], rows[keep]
            kw["cache"].batch_select_indices(keep)
    return out


def run_regenerate(cfg: RunConfig, *, progress: bool = True) -> Path:
    """Regenerate the assistant turns of data.train; returns the output JSONL (resumes an existing one)."""
    from tqdm.auto import tqdm

    # A missing vLLM fails here, before anything is read, repaired or written.
    vllm_python = _engine_python(cfg) if cfg.data.regenerate.engine == "vllm" else None
    items, out, done = _plan(cfg, repair=True)
    todo = [it for it in items if it.key not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_meta(out, cfg)
    if not todo:
        if not out.exists():  # touching an existing file would change its mtime for no reason
            out.touch()
        return out
    if vllm_python is not None:
        _regenerate_vllm(cfg, todo, out, vllm_python, progress=progress)
        return out

    from schemas.target import load_target

    model, tok, _ = load_target(cfg.target)
    r = cfg.data.regenerate
    note = batch_note(str(next(model.parameters()).device), r.batch_size)
    if note:
        print(note, flush=True)
    max_len = cfg.data.max_length
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="regenerate", unit="conv",
               disable=not progress, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:
        for b0 in range(0, len(todo), r.batch_size):
            batch = todo[b0:b0 + r.batch_size]
            hist = [[it.system] if it.system else [] for it in batch]
            live = list(range(len(batch)))
            turn = 0
            while live:
                for i in live:
                    hist[i].extend(batch[i].prompts[turn])
                # Later turns whose history already fills data.max_length would be cut by extraction anyway.
                if turn > 0:
                    keep = []
                    for i in live:
                        n = _prompt_len(tok, hist[i])
                        if n < max_len:
                            keep.append(i)
                        else:
                            del hist[i][-len(batch[i].prompts[turn]):]
                    live = keep
                    if not live:
                        break
                seed = r.seed + int(hashlib.sha256(batch[0].key.encode()).hexdigest()[:8], 16) + turn
                answers = _generate(model, tok, [hist[i] for i in live], cfg, seed)
                for i, a in zip(live, answers):
                    hist[i].append({"role": "assistant", "content": a})
                turn += 1
                live = [i for i in live if turn < len(batch[i].prompts)]
            # Whole lines, one write each, flushed: a kill leaves at most one partial trailing line.
            for it, h in zip(batch, hist):
                f.write(json.dumps(_to_sharegpt(it.key, h), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return out


def _engine_python(cfg: RunConfig) -> Path:
    from schemas.vllm_runtime import engine_python

    return engine_python(cfg.vllm)


def _regenerate_vllm(cfg: RunConfig, todo: list[_Item], out: Path, python: Path, *, progress: bool) -> dict:
    """The pending conversations through vLLM; the worker appends to `out` chunk by chunk."""
    from schemas.target import converted_dir
    from schemas.vllm_runtime import llm_kwargs, run_worker

    r = cfg.data.regenerate
    target = converted_dir(cfg.target)
    request = {"llm": llm_kwargs(cfg, target, seed=r.seed), "output": str(out.resolve()), "chunk": r.batch_size,
               "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
               "seed": r.seed, "max_length": cfg.data.max_length,
               "items": [{"key": it.key, "system": it.system, "prompts": it.prompts} for it in todo]}
    log = out.with_name(out.name + ".vllm.log")
    if progress:
        print(f"[regenerate] vLLM: {len(todo)} conversations, target {target}; log {log}", flush=True)
    res = run_worker(VLLM_WORKER, request, python, log)
    if progress:
        tps = res["generated_tokens"] / res["generate_s"] if res["generate_s"] else float("nan")
        print(f"[regenerate] vLLM wrote {res['written']} conversations, {res['generated_tokens']} tokens "
              f"in {res['generate_s']:.1f} s ({tps:.1f} tokens/s; engine start {res['init_s']:.1f} s)", flush=True)
    return res
