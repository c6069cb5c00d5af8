"""Rows a training rank decodes per row it trains on, against extract.chunk_rows (issue 19).

  python bench/chunk_rows.py [--cache DIR ...] [--samples 4000] [--ranks 1 8] [--quick]

A rank decodes whole inner chunks (each once an epoch, stage2_train.loader); the samples
it trains on start and end anywhere inside them, and with several ranks the neighbours
in a chunk mostly belong to other ranks. For each source, the epoch-0 order of the
trainer (stage2_train.sampler.chunk_aware_order with the train defaults, split by
train.val_fraction, stage2_train.data.rank_schedule per rank) is planned and, for each
chunk size, the rows decoded (inner chunks touched x chunk rows) are divided by the rows
trained on (the samples' rows after cropping to --max-length); printed: the mean and the
largest ratio over the ranks. Sources:
* --cache DIR: a real cache's sample lengths and shard layout (e.g. the demo's); for its
  own chunk rows the figure is also taken from the loader's own plan
  (`_Plan.row_accounting`) and must agree;
* synthetic: --samples samples of 1,024..4,096 tokens (uniform), sharded as stage 1 does
  (extract.shard_tokens 1M), the MiniCPM4-8B config's train settings (1 sample, 4096
  tokens a micro-batch).
"auto" is extract.chunk_rows' default (stage1_extract.extract.auto_chunk_rows).
--quick: 300 synthetic samples, ranks 1 and 8, and a 40-sample cache written and read by
the real loader, whose decoded chunks must match the plan (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (2048, 1024, 512, 256, 128, 64, 32)


def rank_samples(shard_of: np.ndarray, lengths: np.ndarray, ranks: int, *, val_fraction: float = 0.05,
                 micro_batch_size: int = 1, max_tokens: int = 4096, seed: int = 0) -> list[list[int]]:
    """The samples each rank trains on in epoch 0, as the trainer plans them."""
    from stage2_train.data import rank_schedule, split_indices
    from stage2_train.sampler import chunk_aware_order

    train_idx, _ = split_indices(len(lengths), val_fraction, seed)
    order = chunk_aware_order(shard_of, lengths, train_idx, micro_batch_size=micro_batch_size,
                              max_tokens=max_tokens, seed=seed, epoch=0)
    return [sorted({i for b in rank_schedule(order.batches, rank=r, world_size=ranks, grad_accum=1) for i in b})
            for r in range(ranks)]


def decode_ratio(shard_of: np.ndarray, starts: np.ndarray, lengths: np.ndarray, samples: list[int],
                 chunk_rows: int, shard_tokens: dict) -> float:
    """Rows decoded (whole inner chunks, each once) / rows trained on, for one rank's samples."""
    chunks, needed = set(), 0
    for i in samples:
        k, a, n = int(shard_of[i]), int(starts[i]), int(lengths[i])
        c = max(1, min(chunk_rows, shard_tokens[k]))  # a shard shorter than a chunk is one chunk
        chunks.update((k, j, c) for j in range(a // c, (a + n - 1) // c + 1))
        needed += n
    return sum(c for _, _, c in chunks) / max(1, needed)


def table(name: str, shard_of, starts, lengths, ranks_list, own_chunk_rows=None, crop=None) -> dict:
    from stage1_extract.extract import auto_chunk_rows

    crop_len = np.minimum(lengths, crop) if crop else lengths
    shard_tokens = {int(k): int(lengths[shard_of == k].sum()) for k in np.unique(shard_of)}
    auto = auto_chunk_rows(lengths)
    sizes = sorted(set(SIZES) | {auto} | ({own_chunk_rows} if own_chunk_rows else set()), reverse=True)
    res = {"source": name, "samples": int(len(lengths)), "mean_length": round(float(lengths.mean()), 1),
           "auto_chunk_rows": auto, "rows": []}
    print(f"\n{name}: {len(lengths)} samples, mean {lengths.mean():.0f} tokens (min {lengths.min()}, max "
          f"{lengths.max()}), {len(shard_tokens)} shards; auto chunk rows = {auto}")
    print("| chunk rows | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}: mean / max" for r in ranks_list) + " |")
    print("|---:|" + "---:|" * len(ranks_list))
    per_rank = {r: rank_samples(shard_of, crop_len, r) for r in ranks_list}
    for c in sizes:
        cells, row = [], {"chunk_rows": c, "auto": c == auto}
        for r in ranks_list:
            ratios = [decode_ratio(shard_of, starts, crop_len, s, c, shard_tokens) for s in per_rank[r] if s]
            row[f"ranks_{r}"] = {"mean": round(float(np.mean(ratios)), 3), "max": round(float(np.max(ratios)), 3)}
            cells.append(f"{np.mean(ratios):.3f} / {np.max(ratios):.3f}")
        tag = " (auto)" if c == auto else (" (this cache)" if c == own_chunk_rows else "")
        print(f"| {c}{tag} | " + " | ".join(cells) + " |")
        res["rows"].append(row)
    return res


def layout_of_cache(path: Path):
    from schemas.cache import CacheReader

    r = CacheReader(path)
    shard_of = np.array([x.shard for x in r.refs], dtype=np.int64)
    starts = np.array([x.start for x in r.refs], dtype=np.int64)
    return r, shard_of, starts, r.lengths()


def loader_check(r, shard_of, starts, lengths, ranks: int, crop=None) -> float:
    """The loader's own accounting for the cache's chunk rows (rank 0 of `ranks`)."""
    from stage2_train.loader import _Plan

    samples = rank_samples(shard_of, np.minimum(lengths, crop) if crop else lengths, ranks)[0]
    plan = _Plan(r, np.array(samples, dtype=np.int64), [[i] for i in samples], crop)
    decoded, needed = plan.row_accounting(r)
    return decoded / needed


def synthetic(n: int, seed: int = 0):
    from stage1_extract.extract import shard_starts

    lengths = np.random.default_rng(seed).integers(1024, 4097, n).astype(np.int64)
    bounds = shard_starts(lengths, 1024, 1 << 20)
    shard_of = np.zeros(n, dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard_of[a:b] = k
        starts[a:b] = np.concatenate([[0], np.cumsum(lengths[a:b])[:-1]])
    return shard_of, starts, lengths


def quick_loader_run(work: Path) -> dict:
    """A small real cache (auto chunk rows) read by the real CacheLoader: decoded chunks = the plan's."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cachefix import build_cache  # noqa: F401 - the tests' cache builder
    from schemas.cache import CacheReader
    from schemas.cache_read import ChunkedArray
    from stage2_train.loader import CacheLoader, _Plan

    cache, _ = build_cache(work / "c", n_samples=40, samples_per_shard=20, topk=4)
    r = CacheReader(cache)
    shard_of = np.array([x.shard for x in r.refs], dtype=np.int64)
    samples = rank_samples(shard_of, r.lengths(), 2, max_tokens=256)[0]
    batches = [[i] for i in samples]
    plan = _Plan(r, np.array(samples, dtype=np.int64), batches, None)
    decoded, needed = plan.row_accounting(r)
    seen = []
    orig = ChunkedArray.chunk

    def counting(self, i, **k):
        if self.name == "input_ids":
            seen.append((self.path.parent.name, i))
        return orig(self, i, **k)

    ChunkedArray.chunk = counting
    try:
        n = sum(1 for _ in CacheLoader(r, np.array(samples, dtype=np.int64), batches,
                                       np.arange(r.vocab_size, dtype=np.int64), threads=1))
    finally:
        ChunkedArray.chunk = orig
    cr = r.shards[r.shard_ids[0]].array("input_ids").chunk_rows
    got = len(seen) * cr
    print(f"\nreal loader on a 40-sample cache (chunk rows {cr}): {n} batches, decoded {len(seen)} chunks "
          f"({got} rows), the plan says {decoded} rows for {needed} trained on")
    if got != decoded or len(set(seen)) != len(seen):
        sys.exit("the loader decoded other chunks than its plan says")
    return {"chunks": len(seen), "decoded_rows": got, "needed_rows": needed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", nargs="*", default=[], help="real caches (e.g. runs/demo/cache)")
    ap.add_argument("--samples", type=int, default=4000, help="synthetic samples of 1-4k tokens")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-length", type=int, default=None, help="train.max_length crop (default: none)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"sources": []}
    n = 300 if args.quick else args.samples
    out["sources"].append(table(f"synthetic 1-4k tokens x {n}", *synthetic(n), args.ranks, crop=args.max_length))
    for c in args.cache:
        r, shard_of, starts, lengths = layout_of_cache(Path(c))
        own = r.shards[r.shard_ids[0]].array("input_ids").chunk_rows
        res = table(f"cache {c}", shard_of, starts, lengths, args.ranks, own_chunk_rows=own, crop=args.max_length)
        mine = loader_check(r, shard_of, starts, lengths, max(args.ranks), crop=args.max_length)
        sim = decode_ratio(shard_of, starts, np.minimum(lengths, args.max_length) if args.max_length else lengths,
                           rank_samples(shard_of, np.minimum(lengths, args.max_length) if args.max_length else lengths,
                                        max(args.ranks))[0], own,
                           {int(k): int(lengths[shard_of == k].sum()) for k in np.unique(shard_of)})
        print(f"loader's own plan, rank 0 of {max(args.ranks)}, chunk rows {own}: {mine:.3f} (simulated {sim:.3f})")
        res["loader_plan_rank0"] = round(mine, 4)
        out["sources"].append(res)
    if args.quick:
        with tempfile.TemporaryDirectory() as d:
            out["loader_run"] = quick_loader_run(Path(d))
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
