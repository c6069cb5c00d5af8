"""Why HF regeneration is slow on a GPU: ms per generated step of `model.generate` (the call
stage1_extract/regenerate.py makes) on a random SmolLM2-135M-shaped target, by batch size.

  python bench/regen_profile.py [--device cuda] [--new 128] [--batches 32,128,256] [--profile]
                                [--slab] [--dtype bfloat16] [--rounds 2]

Random weights never emit the stop token, so every row generates --new tokens (min_new_tokens):
steps are counted exactly. Prompts are left padded to a common width, lengths uniform in
[64, --max-prompt], as in a regeneration batch. --profile prints torch.profiler's top ops of a
short run at the largest batch (CPU time first: a host-bound loop shows there). --slab times
the same batches with regeneration's preallocated KV cache (stage1_extract/kv_slab.py) beside
transformers' DynamicCache, alternating --rounds times, and checks that both generate the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stage1_extract.kv_slab import slab_cache  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True)


def build(device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SMOLLM2, attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def batch(b: int, max_prompt: int, device: str, gen: torch.Generator):
    lens = torch.randint(64, max_prompt + 1, (b,), generator=gen)
    width = int(lens.max())
    ids = torch.randint(100, 49000, (b, width), generator=gen)
    att = torch.zeros((b, width), dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        att[i, width - n:] = 1
        ids[i, :width - n] = 0
    return ids.to(device), att.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_generate(model, b: int, new: int, max_prompt: int, device: str, slab: bool = False, **kw):
    """(ms per generated step (prefill included, as a regeneration batch pays it), the tokens)."""
    ids, att = batch(b, max_prompt, device, torch.Generator().manual_seed(b))
    args = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2,
                temperature=None, top_p=None, top_k=None, **kw)
    if slab:
        args["cache"] = slab_cache(model.config, ids.shape[1] + new)
    with torch.no_grad():
        model.generate(input_ids=ids[:, -64:], attention_mask=att[:, -64:], **{**args, "max_new_tokens": 4,
                                                                              "min_new_tokens": 4, "cache": None})
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=att, **args)
        sync(device)
    assert out.shape[1] == ids.shape[1] + new
    return (time.perf_counter() - t0) * 1000 / new, out


def slab_line(model, b: int, a) -> str:
    """DynamicCache vs the slab cache, alternated a.rounds times; best of each; same tokens required."""
    dyn, sl = [], []
    for _ in range(a.rounds):
        ms_d, out_d = time_generate(model, b, a.new, a.max_prompt, a.device)
        ms_s, out_s = time_generate(model, b, a.new, a.max_prompt, a.device, slab=True)
        if not torch.equal(out_d, out_s):
            raise SystemExit(f"regen_profile: batch {b}: the slab cache generated other tokens")
        dyn.append(ms_d)
        sl.append(ms_s)
    d, s = min(dyn), min(sl)
    return (f"batch {b:4d}: DynamicCache {d:7.2f} ms/step {b * 1000 / d:7.0f} tok/s | slab {s:7.2f} ms/step "
            f"{b * 1000 / s:7.0f} tok/s | {d / s:.2f}x, same tokens")


def main() -> int:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--batches", default="32,128,256")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--static", action="store_true", help="also cache_implementation=static")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--slab", action="store_true", help="DynamicCache vs the preallocated slab cache")
    ap.add_argument("--rounds", type=int, default=2, help="--slab: alternated rounds (best of each)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype) if a.dtype else torch.bfloat16 if a.device == "cuda" else torch.float32
    model = build(a.device, dtype, a.attn)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {a.device}, {dtype}, {a.attn}, "
          f"{a.new} new tokens, prompts 64..{a.max_prompt}", flush=True)
    for b in [int(x) for x in a.batches.split(",")]:
        if a.slab:
            print(slab_line(model, b, a), flush=True)
            continue
        ms, _ = time_generate(model, b, a.new, a.max_prompt, a.device)
        line = f"batch {b:4d}: {ms:7.2f} ms/step, {b * 1000 / ms:9.0f} tok/s"
        if a.static:
            ms_s, _ = time_generate(model, b, a.new, a.max_prompt, a.device, cache_implementation="static")
            line += f" | static cache {ms_s:7.2f} ms/step, {b * 1000 / ms_s:9.0f} tok/s"
        print(line, flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        b = int(a.batches.split(",")[-1])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with profile(activities=acts) as prof:
            time_generate(model, b, 16, a.max_prompt, a.device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        if a.device == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
