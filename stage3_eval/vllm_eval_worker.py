"""Stage-3 worker that runs INSIDE the vLLM venv: the target and exported heads in vLLM's offline API.

    python vllm_eval_worker.py REQUEST.json RESULT.json

Imports only the standard library and vLLM (with what vLLM brings: transformers);
never this project, whose environment it does not share (schemas/vllm_runtime.py).

Request: {"llm": {vllm.LLM kwargs}, "heads": [{"name", "dir"}], "draft_tokens": k,
          "max_new_tokens", "temperatures": [T, ...], "top_p", "seed", "warmup",
          "prompts": [{"id", "turns": [text, ...]}]}
1. The target alone decodes every prompt, turn by turn, one request at a time (timed), at
   each temperature (0 = greedy; else sampling with top_p and the request's seed);
   turn t+1 is asked after the target's own answer to turn t, as in stage 3's HF path.
2. Per head: vLLM with speculative_config {method eagle3, num_speculative_tokens k}
   decodes the same prompt ids at the same temperatures, one request at a time; vLLM's
   spec-decode counters (drafts, draft tokens, accepted tokens per position) are read
   around each request.
Result: {"vllm_version", "baseline": {"init_s", "runs": [{"id", "turn", "temperature", "prompt_ids",
         "tokens", "wall_s"}]}, "heads": [{"name", "dir", "init_s", "runs": [{"id", "turn",
         "temperature", "tokens", "wall_s", "drafts", "draft_tokens", "accepted", "accepted_per_pos"}]}]}
"""
import gc
import json
import sys
import time
from pathlib import Path

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def log(msg):
    print(f"[vllm eval worker] {msg}", file=sys.stderr, flush=True)


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


def render(tok, messages):
    """Same as stage3_eval.prompts.render: template text, then ids without extra special tokens."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def spec_counters(llm):
    from vllm.v1.metrics.reader import Counter, Vector

    out = {name: 0 for name in SPEC_COUNTERS}
    out[PER_POS] = []
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in out:
            out[m.name] += m.value
        elif isinstance(m, Vector) and m.name == PER_POS:
            prev = out[PER_POS]
            out[PER_POS] = [a + b for a, b in zip(m.values, prev)] if prev else list(m.values)
    return out


def close(llm):
    """Stop the engine process now (frees its KV cache before the next LLM starts, on a GPU too)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    gc.collect()


def timed_generate(llm, ids, sp):
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
    return list(out[0].outputs[0].token_ids), time.perf_counter() - t0


def run_baseline(req, sps, tok, stops):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**req["llm"])
    init_s = time.perf_counter() - t0
    runs = []
    first = True
    for T, sp in sps.items():
        for p in req["prompts"]:
            messages = []
            for turn, text in enumerate(p["turns"]):
                messages.append({"role": "user", "content": text})
                ids = render(tok, messages)
                if first:
                    for _ in range(req["warmup"]):
                        timed_generate(llm, ids, sp)
                    first = False
                tokens, wall = timed_generate(llm, ids, sp)
                runs.append({"id": p["id"], "turn": turn + 1, "temperature": T, "prompt_ids": ids, "tokens": tokens,
                             "wall_s": wall})
                answer = tokens[:-1] if tokens and tokens[-1] in stops else tokens
                messages.append({"role": "assistant",
                                 "content": tok.decode(answer, skip_special_tokens=True).strip()})
            log(f"baseline: prompt {p['id']} at T={T} done")
    close(llm)
    return {"init_s": init_s, "runs": runs}


def run_head(req, head, sps, prompt_runs):
    from vllm import LLM

    spec = {"method": "eagle3", "model": head["dir"], "num_speculative_tokens": req["draft_tokens"]}
    t0 = time.perf_counter()
    llm = LLM(**req["llm"], speculative_config=spec)
    init_s = time.perf_counter() - t0
    if prompt_runs:
        for _ in range(req["warmup"]):
            timed_generate(llm, prompt_runs[0]["prompt_ids"], sps[prompt_runs[0]["temperature"]])
    runs = []
    for b in prompt_runs:
        before = spec_counters(llm)
        tokens, wall = timed_generate(llm, b["prompt_ids"], sps[b["temperature"]])
        after = spec_counters(llm)
        per_pos = [a - (before[PER_POS][i] if i < len(before[PER_POS]) else 0)
                   for i, a in enumerate(after[PER_POS])]
        runs.append({"id": b["id"], "turn": b["turn"], "temperature": b["temperature"], "tokens": tokens,
                     "wall_s": wall,
                     "drafts": after[SPEC_COUNTERS[0]] - before[SPEC_COUNTERS[0]],
                     "draft_tokens": after[SPEC_COUNTERS[1]] - before[SPEC_COUNTERS[1]],
                     "accepted": after[SPEC_COUNTERS[2]] - before[SPEC_COUNTERS[2]],
                     "accepted_per_pos": per_pos})
    log(f"head {head['name']}: {len(runs)} turns done")
    close(llm)
    return {"name": head["name"], "dir": head["dir"], "init_s": init_s, "runs": runs}


def main(req_path, res_path):
    import vllm
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    req = json.loads(Path(req_path).read_text())
    model_dir = req["llm"]["tokenizer"]
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=req["llm"].get("trust_remote_code", False))
    stops = stop_ids(model_dir, tok)
    sps = {}  # temperature -> SamplingParams
    for T in req["temperatures"]:
        kw = {"max_tokens": req["max_new_tokens"], "stop_token_ids": stops, "seed": req["seed"]}
        kw.update(temperature=T, top_p=req["top_p"]) if T > 0 else kw.update(temperature=0.0)
        sps[T] = SamplingParams(**kw)
    base = run_baseline(req, sps, tok, stops)
    heads = [run_head(req, h, sps, base["runs"]) for h in req["heads"]]
    result = {"vllm_version": vllm.__version__, "stop_token_ids": stops, "baseline": base, "heads": heads}
    tmp = Path(res_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(res_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python vllm_eval_worker.py REQUEST.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
