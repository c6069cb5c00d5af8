"""Training-step throughput (issue 13): the TTT step in fp32 vs bf16 autocast, offline vs online.

  python bench/bench_train_step.py --cache runs/demo/cache [--steps 4] [--rounds 2] [--threads 2]

One process, the same batches (train.micro_batch_size rows, chunk-aware order) for every variant,
alternated round by round so that a shared machine's load hits all alike:
* step fp32      ttt_forward + backward + AdamW, fp32 weights, no autocast (train.compute_dtype=float32);
* step bf16      the same under bf16 autocast (train.compute_dtype=bfloat16: what `auto` picks on
                 CUDA and on CPUs with native bf16);
* online         the target resident: its forward (output_hidden_states, top-K log-probs, the
                 teacher rebuilt) and then the bf16 step, i.e. what a trainer without the cache does
                 on every step of every epoch. The target runs in the fast dtype too.
Prints tokens/s per variant, the bf16/fp32 ratio and offline/online steps/s, and per-position
accuracy after the steps (the two precisions must learn alike).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_train import make_model, online_batches  # noqa: E402
from schemas.cache import CacheReader  # noqa: E402
from stage2_train.data import make_train_loader  # noqa: E402
from stage2_train.losses import ttt_forward  # noqa: E402
from stage2_train.precision import compute_context  # noqa: E402
from stage2_train.sampler import chunk_aware_order  # noqa: E402
from stage2_train.vocab import build_draft_vocab  # noqa: E402


def steps(model, opt, batches, ttt, amp) -> tuple[float, int, list]:
    """(seconds, tokens, acc_k of the last batch) for one pass over `batches`."""
    dev = torch.device("cpu")
    t, tok = time.perf_counter(), 0
    for b in batches:
        with compute_context(dev, amp):
            o = ttt_forward(model, b, ttt)
        o.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok += int(b["tokens"])
    return time.perf_counter() - t, tok, (o.correct / o.counted.clamp_min(1)).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--draft-vocab", type=int, default=8000)
    ap.add_argument("--ttt", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-online", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    reader = CacheReader(a.cache)
    vocab = build_draft_vocab(reader.token_counts(), a.draft_vocab)
    lengths = np.minimum(reader.lengths(), a.max_length)
    order = chunk_aware_order(np.array([x.shard for x in reader.refs]), lengths, np.arange(len(reader)),
                              micro_batch_size=a.micro_batch, max_tokens=a.max_tokens, seed=0, epoch=0)
    need = a.steps * a.rounds
    if len(order.batches) < need:
        raise SystemExit(f"{a.cache}: {len(order.batches)} batches, {need} needed (lower --steps/--rounds)")
    batches = list(make_train_loader(reader, order.arrivals, order.batches[:need], vocab.target_to_draft(),
                                     a.max_length, num_workers=0, threads=1))
    variants = {"step fp32": None, "step bf16": torch.bfloat16}
    models = {k: make_model(reader, vocab, a.draft_vocab) for k in variants}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    tmodel = None
    if not a.no_online:
        from schemas.config import TargetConfig
        from schemas.target import load_target

        tmodel, _, _ = load_target(TargetConfig(path=reader.meta["target"]["path"], device="cpu"))
        variants["online"] = torch.bfloat16
        models["online"], opts["online"] = models["step bf16"], opts["step bf16"]
    tot = {k: [0.0, 0] for k in variants}
    acc = {}
    steps(models["step fp32"], opts["step fp32"], batches[:1], a.ttt, None)  # warm-up (allocator, oneDNN)
    for r in range(a.rounds):
        block = batches[r * a.steps:(r + 1) * a.steps]
        for name, amp in variants.items():
            if name == "online":
                t0 = time.perf_counter()
                gen = online_batches(tmodel, reader.layers, reader.topk, vocab.target_to_draft(), block)
                dt, tok, acc[name] = steps(models[name], opts[name], gen, a.ttt, amp)
                dt = time.perf_counter() - t0
            else:
                dt, tok, acc[name] = steps(models[name], opts[name], block, a.ttt, amp)
            tot[name][0] += dt
            tot[name][1] += tok
    rep = {"cache": a.cache, "threads": torch.get_num_threads(), "load1": os.getloadavg()[0],
           "steps": need, "micro_batch": a.micro_batch,
           "target_dtype": str(next(tmodel.parameters()).dtype) if tmodel is not None else None,
           "tokens_per_s": {k: v[1] / v[0] for k, v in tot.items()},
           "steps_per_s": {k: need / v[0] for k, v in tot.items()}, "acc_last_batch": acc}
    t = rep["tokens_per_s"]
    rep["bf16_over_fp32"] = t["step bf16"] / t["step fp32"]
    if "online" in t:
        rep["offline_over_online"] = t["step bf16"] / t["online"]
        rep["offline_fp32_over_online"] = t["step fp32"] / t["online"]
    print(json.dumps(rep, indent=1))
    print("\n| variant | tokens/s | steps/s |\n|---|---:|---:|")
    for k in variants:
        print(f"| {k} | {t[k]:,.0f} | {rep['steps_per_s'][k]:.3f} |")
    print(f"\nbf16 / fp32 step: {rep['bf16_over_fp32']:.2f}x"
          + (f"; offline / online (bf16 step): {rep['offline_over_online']:.2f}x" if "online" in t else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
