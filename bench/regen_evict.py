"""HF regeneration with and without evicting the rows that have stopped
(stage1_extract/regenerate.decode_evicting), on the real target and the demo's prompts.

  python bench/regen_evict.py [--config configs/demo.yaml] [--prompts 150] [--new 320] [--every 32]
                              [--rounds 2] [--quick]

Both sides run regeneration's own `_generate` on the first user turns of the config's first
--prompts conversations, in one batch: "one call" is a single generate over all rows (every row
runs to the batch's longest answer), "evict" generates --every tokens at a time and drops the
stopped rows between calls. The sides alternate --rounds times (best of each) and must write the
same answers. Prints answer tokens per second and decode slots per answer token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schemas.config import load_config  # noqa: E402
from stage1_extract import regenerate  # noqa: E402


def first_turns(path: str, n: int) -> list[list[dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            rec = json.loads(line)
            msgs = rec.get("conversations") or rec.get("messages")
            m = next(x for x in msgs if (x.get("from") or x.get("role")) in ("human", "user"))
            out.append([{"role": "user", "content": m.get("value") or m.get("content")}])
    return out


def slots(lengths: list[int], every: int) -> int:
    """Decode slots a batch spends: all rows alive at the start of each chunk run the chunk."""
    total, t, alive = 0, 0, list(lengths)
    while alive:
        steps = min(every, max(alive) - t)
        total += len(alive) * steps
        t += steps
        alive = [n for n in alive if n > t]
    return total


def run(model, tok, prompts, cfg, every: int) -> tuple[float, list[str]]:
    regenerate.EVICT_EVERY = every
    t0 = time.perf_counter()
    answers = regenerate._generate(model, tok, prompts, cfg, seed=0)
    return time.perf_counter() - t0, answers


def main() -> int:
    from schemas.target import load_target

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--prompts", type=int, default=150)
    ap.add_argument("--new", type=int, default=320)
    ap.add_argument("--every", type=int, default=regenerate.EVICT_EVERY)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 24 tokens, eviction every 4, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.new, a.every, a.rounds = 8, 24, 4, 1
    cfg = load_config(a.config)
    r = cfg.data.regenerate.model_copy(update={"max_new_tokens": a.new, "temperature": 0.0})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"regenerate": r})})
    model, tok, _ = load_target(cfg.target)
    prompts = first_turns(cfg.data.train[0], a.prompts)
    print(f"{cfg.target.path} ({next(model.parameters()).dtype}), {len(prompts)} prompts x {a.new} tokens, "
          f"one batch, eviction every {a.every}", flush=True)
    best = {"one call": float("inf"), "evict": float("inf")}
    answers = {}
    for _ in range(a.rounds):
        for side, every in (("one call", a.new), ("evict", a.every)):
            s, answers[side] = run(model, tok, prompts, cfg, every)
            best[side] = min(best[side], s)
    if answers["one call"] != answers["evict"]:
        diff = sum(x != y for x, y in zip(answers["one call"], answers["evict"]))
        raise SystemExit(f"regen_evict: eviction changed {diff} of {len(prompts)} answers")
    lengths = [min(a.new, len(tok(x, add_special_tokens=False)["input_ids"]) + 1) for x in answers["evict"]]
    n = sum(lengths)
    for side, every in (("one call", a.new), ("evict", a.every)):
        print(f"{side:9s}: {best[side]:7.1f} s  {n / best[side]:6.0f} answer tok/s  "
              f"{slots(lengths, every) / n:.2f} decode slots per answer token", flush=True)
    print(f"eviction: {best['one call'] / best['evict']:.2f}x, {len(prompts)}/{len(prompts)} answers identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
