"""Loader benchmark (issue 12) on a synthetic cache written by this script.

    python bench/bench_loader.py [--hidden 576 4096] [--tokens 40000] [--threads 1 2]

For each hidden size H it writes a cache with realistic rows (bf16 hidden states of
Gaussian activations with a few outliers, K=64 sorted top-K log-probs, 3 layers,
zstd level 1, 2,048-row chunks, sample lengths 64..2,048) and measures, one process,
page cache warm, OMP_NUM_THREADS=1:
* memcpy: the same rows copied from in-memory arrays into batch buffers (upper bound);
* chunk decode: every inner chunk of every row array decoded and crc32c-checked once
  (`ChunkedArray.chunk`), one thread;
* loader (`stage2_train.loader.CacheLoader`, the training path): full collated batches
  (padding, teacher rebuilt) in the chunk-aware order, with 1 and 2 decode threads;
  decoded MB/s counts the stored row bytes of the tokens delivered;
* per-sample reads (`CacheReader.sample`, the edbc6e1 training path's access pattern)
  over a random order, for comparison (a few hundred samples);
* integrity cost: the same loader on a copy written without chunk checksums;
* trainer-never-waits: steps/s of an emulated GPU step (sleep of tokens / --gpu-tok-s,
  default 20,000 tokens/s: the issue's upper estimate for one H100 training the 8B
  head) fed by the loader vs by the same batches held in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from schemas.cache import CACHE_JSON, EMBED_FILE, SCHEMA_ID, CacheReader, build_manifest, write_shard  # noqa: E402
from schemas.cache_check import target_file_checksums  # noqa: E402
from stage2_train.loader import FIELDS, CacheLoader  # noqa: E402
from stage2_train.sampler import chunk_aware_order  # noqa: E402

K, VOCAB, LAYERS = 64, 32000, [2, 15, 27]
LAST_CPU = 0.0  # CPU seconds (all threads of this process) of the last timed run


def synth_shard(rng: np.random.Generator, lengths: np.ndarray, H: int) -> dict:
    T = int(lengths.sum())
    hid = rng.standard_normal((T, 3, H), dtype=np.float32) * np.array([0.5, 2.0, 8.0], np.float32)[None, :, None]
    hid[:, :, rng.integers(0, H, 4)] *= 30.0  # a few outlier channels, as in real residual streams
    hb = torch.from_numpy(hid).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    lp = np.sort(-rng.exponential(2.0, (T, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    lp -= np.log(np.exp(lp).sum(1, keepdims=True) * 1.05)
    ids = rng.integers(0, VOCAB, (T, K)).astype(np.int32)
    return {"input_ids": rng.integers(0, VOCAB, T).astype(np.int32),
            "loss_mask": (rng.random(T) < 0.6).astype(np.uint8), "hidden": hb, "topk_ids": ids,
            "topk_logprobs": lp.astype(np.float16), "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "token_counts": np.ones(VOCAB, np.int64)}


def write_cache(root: Path, H: int, tokens: int, per_shard: int, seed: int, old_layout: bool = False) -> Path:
    """A synthetic cache of about `tokens` tokens (old_layout: zarr's writer, no chunk checksums)."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    (root / "target").mkdir(parents=True)
    (root / "target" / "config.json").write_text(json.dumps({"hidden_size": H, "vocab_size": VOCAB}))
    # The frozen embedding every reader checks for (schemas.cache_check), random bf16.
    save_file({"weight": torch.from_numpy(rng.standard_normal((VOCAB, H), dtype=np.float32)).to(torch.bfloat16)},
              str(root / "target" / EMBED_FILE))
    lengths = np.clip(rng.lognormal(6.0, 0.8, 10 ** 6).astype(np.int64), 64, 2048)
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    k = n = 0
    while n < len(lengths):
        ln = lengths[n:n + per_shard]
        arrays = synth_shard(rng, ln, H)
        arrays["sample_index"] = np.arange(n, n + len(ln), dtype=np.int64)
        if old_layout:
            _old_write_shard()(root, k, arrays, compressor="zstd", chunk_rows=2048)
        else:
            write_shard(root, k, arrays, compressor="zstd", chunk_rows=2048)
        n += len(ln)
        k += 1
    meta = {"schema": SCHEMA_ID, "target": {"hidden_size": H, "vocab_size": VOCAB, "num_hidden_layers": 32},
            "layers": LAYERS, "topk": K, "num_shards": k, "samples_per_shard": per_shard, "hidden_dtype": "bfloat16",
            "data": {"num_samples": int(len(lengths))},
            "target_files": target_file_checksums(root / "target")}
    (root / CACHE_JSON).write_text(json.dumps(meta))
    build_manifest(root)
    return root


def _old_write_shard():
    """write_shard of edbc6e1 (zarr's writer: no per-chunk checksum), for the integrity-cost A/B."""
    import subprocess
    import types

    src = subprocess.run(["git", "show", "edbc6e1:schemas/cache.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    mod = types.ModuleType("old_cache")
    sys.modules["old_cache"] = mod
    exec(compile(src, "edbc6e1:schemas/cache.py", "exec"), mod.__dict__)  # noqa: S102 - our own history
    return mod.write_shard


def row_bytes(H: int) -> int:
    return 4 + 1 + 3 * H * 2 + K * 4 + K * 2


def order_for(r: CacheReader, mbs: int, max_tokens: int):
    shard_of = np.array([x.shard for x in r.refs])
    return chunk_aware_order(shard_of, r.lengths(), np.arange(len(r)), micro_batch_size=mbs, max_tokens=max_tokens,
                             seed=0, epoch=0)


def bench_memcpy(r: CacheReader, order, reps: int = 3) -> float:
    """Seconds to copy the batches' rows from in-memory arrays into padded batch buffers (best of reps)."""
    rows = {k: r.shards[k].rows(0, r.shards[k].info["tokens"], FIELDS) for k in r.shard_ids}
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        for b in order.batches:
            L = max(r.refs[i].length for i in b)
            bufs = {f: np.empty((len(b), L, *rows[r.shard_ids[0]][f].shape[1:]), rows[r.shard_ids[0]][f].dtype)
                    for f in FIELDS}
            for j, i in enumerate(b):
                ref = r.refs[i]
                for f in FIELDS:
                    bufs[f][j, :ref.length] = rows[ref.shard][f][ref.start:ref.start + ref.length]
        best = min(best, time.perf_counter() - t)
    return best


def bench_decode(r: CacheReader) -> float:
    t = time.perf_counter()
    global LAST_CPU
    c0 = time.process_time()
    for sh in r.shards.values():
        for f in FIELDS:
            a = sh.array(f)
            for c in range(a.n_chunks):
                a.chunk(c)
    LAST_CPU = time.process_time() - c0
    return time.perf_counter() - t


def bench_loader(r: CacheReader, order, threads: int) -> float:
    global LAST_CPU
    t2d = np.arange(VOCAB)
    t = time.perf_counter()
    c0 = time.process_time()
    n = 0
    for b in CacheLoader(r, order.arrivals, order.batches, t2d, threads=threads, pin_memory=False):
        n += b["tokens"]
    LAST_CPU = time.process_time() - c0
    return time.perf_counter() - t


def bench_crc_only(r: CacheReader) -> float:
    """CPU seconds of the crc32c checks alone over every stored chunk (the bytes the loader checks)."""
    from schemas.cache_read import _crc32c

    blobs = []
    for sh in r.shards.values():
        for f in FIELDS:
            a = sh.array(f)
            idx = a._read_index()
            data = a.file.read_bytes()
            blobs += [data[int(o):int(o) + int(n)] for o, n in idx[:a.n_chunks]]
    c0 = time.process_time()
    for b in blobs:
        _crc32c(b)
    return time.process_time() - c0


def bench_per_sample(r: CacheReader, n: int) -> tuple[float, int]:
    idx = np.random.default_rng(0).permutation(len(r))[:n]
    from schemas import cache_read

    cache_read._LRU.clear()
    t = time.perf_counter()
    tok = 0
    for i in idx:
        tok += len(r.sample(int(i))["input_ids"])
    return time.perf_counter() - t, tok


def bench_never_waits(r: CacheReader, threads: int, gpu_tok_s: float, warmup: int = 32) -> dict:
    """steps/s of a sleep-emulated GPU step fed by the loader vs by the same batches in memory.

    MiniCPM4-8B's train config: one sample per micro-batch, at most 4,096 tokens. The first
    `warmup` steps (one length-sorting window: the loader's start-up fill, once per epoch)
    are not timed, from memory or from the cache.
    """
    t2d = np.arange(VOCAB)
    shard_of = np.array([x.shard for x in r.refs])
    order = chunk_aware_order(shard_of, r.lengths(), np.arange(len(r)), micro_batch_size=1, max_tokens=4096,
                              seed=0, epoch=0, shuffle_buffer=16)
    mem = list(CacheLoader(r, order.arrivals, order.batches, t2d, threads=threads, pin_memory=False))
    warmup = min(warmup, len(order.batches) // 2)  # a small (--quick) cache has fewer batches

    def run(batches) -> float:
        it = iter(batches)
        for _ in range(warmup):
            time.sleep(next(it)["tokens"] / gpu_tok_s)
        t = time.perf_counter()
        for b in it:
            time.sleep(b["tokens"] / gpu_tok_s)
        return time.perf_counter() - t

    t_mem = run(mem)
    t_cache = run(CacheLoader(r, order.arrivals, order.batches, t2d, threads=threads, pin_memory=False))
    n = len(order.batches) - warmup
    return {"steps": n, "memory_steps_per_s": n / t_mem, "cache_steps_per_s": n / t_cache,
            "cache_over_memory": t_mem / t_cache, "emulated_gpu_tokens_per_s": gpu_tok_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--tokens", type=int, default=40000, help="tokens of each synthetic cache")
    ap.add_argument("--per-shard", type=int, default=16, help="samples per shard")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--per-sample", type=int, default=100, help="random per-sample reads timed (0: skip)")
    ap.add_argument("--gpu-tok-s", type=float, default=20000.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (the test suite runs this)")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.tokens, a.per_shard, a.threads, a.micro_batch = [64], 3000, 4, [1], 4
        a.max_tokens, a.per_sample = 1024, 8
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    report: dict = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    for H in a.hidden:
        root = write_cache(work / f"h{H}", H, a.tokens, a.per_shard, seed=H)
        r = CacheReader(root)
        order = order_for(r, a.micro_batch, a.max_tokens)
        T = int(r.lengths().sum())
        mb = T * row_bytes(H) / 1e6
        res: dict = {"tokens": T, "row_bytes": row_bytes(H), "stored_MB": round(mb, 1),
                     "disk_MB": round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6, 1)}
        bench_decode(r)  # warm the page cache
        t = bench_memcpy(r, order)
        res["memcpy"] = {"MB_per_s": mb / t, "tokens_per_s": T / t}
        t = bench_decode(r)
        res["chunk_decode_1thread"] = {"MB_per_s": mb / t, "tokens_per_s": T / t, "MB_per_cpu_s": mb / LAST_CPU}
        for th in a.threads:
            best = (1e9, 1e9)
            for _ in range(2):
                t = bench_loader(r, order, th)
                best = min(best, (t, LAST_CPU))
            t, cpu = best
            res[f"loader_{th}threads"] = {"MB_per_s": mb / t, "tokens_per_s": T / t, "MB_per_cpu_s": mb / cpu,
                                          "tokens_per_cpu_s": T / cpu}
        if a.per_sample:
            t, tok = bench_per_sample(r, min(a.per_sample, len(r)))
            res["per_sample_reads"] = {"MB_per_s": tok * row_bytes(H) / t / 1e6, "tokens_per_s": tok / t}
        old = write_cache(work / f"h{H}-nocrc", H, a.tokens, a.per_shard, seed=H, old_layout=True)
        r_old = CacheReader(old)
        bench_decode(r_old)
        th = 1
        o_old = order_for(r_old, a.micro_batch, a.max_tokens)
        new, old_ = [], []
        for _ in range(3):  # alternating A/B: drifting background load hits both alike; CPU seconds compared
            bench_loader(r, order, th)
            new.append(LAST_CPU)
            bench_loader(r_old, o_old, th)
            old_.append(LAST_CPU)
        crc_s = bench_crc_only(r)
        res["integrity_cost"] = {"loader_cpu_s_with_crc": min(new), "loader_cpu_s_without": min(old_),
                                 "overhead": min(new) / min(old_) - 1.0, "crc32c_cpu_s": crc_s,
                                 "crc32c_share_of_loader_cpu": crc_s / min(new)}
        res["never_waits"] = bench_never_waits(r, max(a.threads), a.gpu_tok_s)
        report[f"H{H}"] = res
        shutil.rmtree(old, ignore_errors=True)
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1, default=float))
    print("\n| H | path | MB/s (decoded rows) | tokens/s | MB per CPU-second |\n|---|---|---:|---:|---:|")
    for H in a.hidden:
        res = report[f"H{H}"]
        for k, v in res.items():
            if isinstance(v, dict) and "MB_per_s" in v:
                print(f"| {H} | {k} | {v['MB_per_s']:,.0f} | {v['tokens_per_s']:,.0f} | "
                      f"{v.get('MB_per_cpu_s', float('nan')):,.0f} |")
        ic, nw = res["integrity_cost"], res["never_waits"]
        print(f"| {H} | crc32c: loader CPU with/without {100 * ic['overhead']:+.1f}%, crc alone "
              f"{100 * ic['crc32c_share_of_loader_cpu']:.1f}% of loader CPU | | |")
        print(f"| {H} | emulated GPU ({a.gpu_tok_s:,.0f} tok/s) steps/s cache/memory | "
              f"{nw['cache_over_memory']:.3f} | |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
