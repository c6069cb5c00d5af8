"""Regeneration worker that runs INSIDE the vLLM venv (data.regenerate.engine: vllm).

    python vllm_regen_worker.py REQUEST.json RESULT.json

Imports only the standard library and vLLM (with what vLLM brings: transformers);
never this project (schemas/vllm_runtime.py says why). Mirrors the HF path of
stage1_extract/regenerate.py: the same prompts (each conversation's user-turn groups,
in order, after the target's own earlier answers), the same output line per
conversation, the same stop tokens, the same cut of later turns whose history already
fills max_length. Every turn of a chunk of conversations is one `LLM.generate` call
(vLLM batches continuously inside it); after each chunk its whole lines are appended
to the output, flushed and fsynced, so a kill loses at most the chunk in flight and
leaves at most one partial last line (the parent drops it and skips written ids on
resume). Sampling uses a per-request seed (seed + hash(id) + turn): an answer does not
depend on the chunk it ran in.

Request: {"llm": {vllm.LLM kwargs}, "output": PATH, "chunk": N, "max_new_tokens", "temperature",
          "top_p", "seed", "max_length", "parent_pid",
          "items": [{"key", "system": {role, content} | null, "prompts": [[{role, content}, ...], ...]}]}
Result: {"vllm_version", "written", "generated_tokens", "generate_s", "init_s"}
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROLE_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def log(msg):
    print(f"[vllm regenerate worker] {msg}", file=sys.stderr, flush=True)


def stop_ids(model_dir, tok):
    """EOS ids of the tokenizer, config.json and generation_config.json (what HF generate stops at)."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    for name in ("config.json", "generation_config.json"):
        p = Path(model_dir) / name
        if p.is_file():
            e = json.loads(p.read_text()).get("eos_token_id")
            ids.update(int(x) for x in (e if isinstance(e, list) else [e]) if x is not None)
    return sorted(ids)


def prompt_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def request_seed(base, key, turn):
    return (base + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) + turn) % (2 ** 63)


def sampling(req, stops, seed):
    from vllm import SamplingParams

    kw = {"max_tokens": req["max_new_tokens"], "stop_token_ids": stops}
    if req["temperature"] > 0:
        kw.update(temperature=req["temperature"], top_p=req["top_p"], seed=seed)
    else:
        kw.update(temperature=0.0)
    return SamplingParams(**kw)


def answer_chunk(llm, tok, chunk, req, stops):
    """The conversations of one chunk, answered turn by turn; returns (histories, generated tokens)."""
    hist = [[it["system"]] if it["system"] else [] for it in chunk]
    live = list(range(len(chunk)))
    turn, n_tokens = 0, 0
    while live:
        ids = {}
        keep = []
        for i in live:
            hist[i].extend(chunk[i]["prompts"][turn])
            ids[i] = prompt_ids(tok, hist[i])
            # Later turns whose history already fills max_length would be cut by extraction anyway.
            if turn > 0 and len(ids[i]) >= req["max_length"]:
                del hist[i][-len(chunk[i]["prompts"][turn]):]
            else:
                keep.append(i)
        live = keep
        if not live:
            break
        outs = llm.generate([{"prompt_token_ids": ids[i]} for i in live],
                            [sampling(req, stops, request_seed(req["seed"], chunk[i]["key"], turn)) for i in live],
                            use_tqdm=False)
        for i, o in zip(live, outs):
            out = list(o.outputs[0].token_ids)
            n_tokens += len(out)
            # Decoded as the HF path decodes (the stop token, when present, is special and skipped).
            hist[i].append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=True).strip()})
        turn += 1
        live = [i for i in live if turn < len(chunk[i]["prompts"])]
    return hist, n_tokens


def main(req_path, res_path):
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM

    req = json.loads(Path(req_path).read_text())
    model_dir = req["llm"]["tokenizer"]
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=req["llm"].get("trust_remote_code", False))
    stops = stop_ids(model_dir, tok)
    t0 = time.perf_counter()
    llm = LLM(**req["llm"])
    init_s = time.perf_counter() - t0
    items, n = req["items"], req["chunk"]
    written, tokens, gen_s = 0, 0, 0.0
    with open(req["output"], "a", encoding="utf-8") as f:
        for c0 in range(0, len(items), n):
            if os.getppid() != req["parent_pid"]:  # the parent was killed: stop writing
                log("parent process is gone; stopping")
                sys.exit(2)
            chunk = items[c0:c0 + n]
            t1 = time.perf_counter()
            hist, k = answer_chunk(llm, tok, chunk, req, stops)
            gen_s += time.perf_counter() - t1
            tokens += k
            # Whole lines, one write each, then fsync: a kill leaves at most one partial trailing line.
            for it, h in zip(chunk, hist):
                conv = [{"from": ROLE_TO_SHAREGPT[m["role"]], "value": m["content"]} for m in h]
                f.write(json.dumps({"id": it["key"], "conversations": conv}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(chunk)
            log(f"{written}/{len(items)} conversations written ({tokens} tokens, {gen_s:.1f} s generating)")
    result = {"vllm_version": vllm.__version__, "written": written, "generated_tokens": tokens,
              "generate_s": gen_s, "init_s": init_s}
    tmp = Path(res_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(res_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python vllm_regen_worker.py REQUEST.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
