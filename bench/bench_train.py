"""Stage-2 benchmark (DESIGN.md section 7): training from the cache, loader speed, offline vs online.

    python bench/bench_train.py --cache runs/demo/cache [--steps 300] [--target-path pkg:...]

1. a real training run (`run_train`, DeepSpeed, CPU) for --steps steps: held-out per-position
   acc/loss (mean ± std) and simulated acceptance length;
2. loader throughput alone (tokens/s, MB/s of stored row bytes) from the zarr cache vs the same
   rows from np.memmap files, raw rows and fully collated batches (teacher rebuilt);
3. train steps/s reading from the cache (the training loader: chunk-aware order, decode
   threads) vs the same batches held in memory, with the real CPU step and with a GPU step
   emulated by a sleep of tokens / --gpu-tok-s (default 20,000 tokens/s: the upper estimate
   for one H100 training the MiniCPM4-8B head, issue 12);
4. train steps/s offline (cache) vs online (target forward + top-k + draft step on the same batches);
5. eval: the held-out evaluation (`evaluate_model`, forward only) over the whole cache at several
   padded-token budgets per batch (--eval-tokens), alternated --rounds times, bf16 compute where the
   CPU has it natively; the metrics must agree.
Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schemas.cache import ROW_ARRAYS, CacheReader  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.head import make_head_config  # noqa: E402
from stage2_train.data import BatchDataset, collate, make_batches, make_loader, make_train_loader  # noqa: E402
from stage2_train.sampler import chunk_aware_order  # noqa: E402
from stage2_train.losses import ttt_forward  # noqa: E402
from stage2_train.model import Eagle3Draft  # noqa: E402
from stage2_train.objectives import raw_teacher  # noqa: E402
from stage2_train.teacher import build_teacher  # noqa: E402
from stage2_train.vocab import build_draft_vocab  # noqa: E402


def row_bytes(reader: CacheReader) -> int:
    H, K = reader.hidden_size, reader.topk
    return 4 + 1 + 3 * H * 2 + K * 4 + K * 2


def dump_memmaps(reader: CacheReader, d: Path) -> tuple[dict, np.ndarray]:
    """The cache's rows as one raw .npy memmap per array (the uncompressed baseline)."""
    n = len(reader)
    T = int(reader.lengths().sum())
    offs = np.zeros(n + 1, dtype=np.int64)
    mm = {}
    s0 = reader.sample(0)
    for f in ROW_ARRAYS:
        mm[f] = np.lib.format.open_memmap(d / f"{f}.npy", mode="w+", dtype=s0[f].dtype, shape=(T, *s0[f].shape[1:]))
    pos = 0
    for i in range(n):
        s = reader.sample(i)
        ln = len(s["input_ids"])
        for f in ROW_ARRAYS:
            mm[f][pos:pos + ln] = s[f]
        offs[i + 1] = pos = pos + ln
    for f in ROW_ARRAYS:
        mm[f].flush()
    return {f: np.load(d / f"{f}.npy", mmap_mode="r") for f in ROW_ARRAYS}, offs


class MemmapDataset(torch.utils.data.Dataset):
    def __init__(self, mm, offs, batches, t2d_map, max_length):
        self.mm, self.offs, self.batches, self.map, self.max_length = mm, offs, batches, t2d_map, max_length

    def __len__(self):
        return len(self.batches)

    def sample(self, i):
        a, b = self.offs[i], self.offs[i + 1]
        return {f: np.array(self.mm[f][a:b]) for f in ROW_ARRAYS}

    def __getitem__(self, j):
        return collate([self.sample(i) for i in self.batches[j]], self.map, self.max_length)


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def drop_page_cache_hint(path: Path) -> None:
    # Best effort: without root we cannot drop caches; both sides then read from the page cache.
    pass


def bench_loader(reader, batches, vocab, max_length, mm, offs, workers: int) -> dict:
    tokens = int(sum(min(reader.refs[i].length, max_length) for b in batches for i in b))
    rb = row_bytes(reader)
    res = {}
    idx = [i for b in batches for i in b]
    dt, _ = timed(lambda: [reader.sample(i) for i in idx])
    res["cache_rows"] = dt
    ds_mm = MemmapDataset(mm, offs, batches, vocab.target_to_draft(), max_length)
    dt, _ = timed(lambda: [ds_mm.sample(i) for i in idx])
    res["memmap_rows"] = dt
    ds = BatchDataset(reader, batches, vocab.target_to_draft(), max_length)
    dt, _ = timed(lambda: [b for b in make_loader(ds, workers)])
    res["cache_batches"] = dt
    dt, _ = timed(lambda: [b for b in make_loader(ds_mm, workers)])
    res["memmap_batches"] = dt
    arrivals = np.array([i for b in batches for i in b])  # read order = batch order (no shuffle buffer)
    dt, _ = timed(lambda: [b for b in make_train_loader(reader, arrivals, batches, vocab.target_to_draft(),
                                                        max_length, threads=2)])
    res["chunk_loader_batches"] = dt
    tot = sum(reader.refs[i].length for i in idx)
    return {k: {"s": v, "tokens_per_s": tokens / v, "MB_per_s": tot * rb / v / 1e6} for k, v in res.items()}


def make_model(reader, vocab, N, seed=0):
    torch.manual_seed(seed)
    cfg = make_head_config(reader.target_config(), draft_vocab_size=N, layer_ids=reader.layers,
                           overrides={"embed_scale": float(reader.meta.get("embed_scale", 1.0) or 1.0)})
    m = Eagle3Draft(cfg, reader.load_embedding())
    m.set_vocab_map(torch.from_numpy(vocab.d2t), torch.from_numpy(vocab.t2d))
    return m


def train_steps(model, batches_iter, n, ttt):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t = time.perf_counter()
    for _ in range(n):
        b = next(batches_iter)
        o = ttt_forward(model, b, ttt)
        o.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return n / (time.perf_counter() - t)


def _skip_first(batches):
    """Iterator past the first batch (its wait is the same from memory and from the cache)."""
    it = iter(batches)
    next(it)
    return it


def emulated_steps(batches_iter, n, gpu_tok_s):
    """steps/s of a GPU step emulated by a sleep (the GIL is free, as during a CUDA step)."""
    t = time.perf_counter()
    for _ in range(n):
        b = next(batches_iter)
        time.sleep(b["tokens"] / gpu_tok_s)
    return n / (time.perf_counter() - t)


def online_batches(target_model, layers, K, t2d_map, cache_batches):
    """The same batches computed by the target on the fly: hidden states + top-k, then the teacher."""
    for b in cache_batches:
        ids, valid = b["input_ids"], b["valid"]
        with torch.no_grad():
            out = target_model(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
            hs = torch.cat([out.hidden_states[i] for i in layers], dim=-1).to(torch.bfloat16)
            lp = torch.log_softmax(out.logits.float(), -1)
            tv, ti = lp.topk(K, dim=-1)
        B, L = ids.shape
        t_idx, t_prob, t_top1 = (np.zeros((B, L, K), np.int64), np.zeros((B, L, K), np.float32),
                                 np.full((B, L), -1, np.int64))
        t_valid, t_logp = np.zeros((B, L, K), bool), np.zeros((B, L, K), np.float32)
        for r in range(B):
            lp16 = tv[r].numpy().astype(np.float16)
            t_idx[r], t_prob[r], t_top1[r] = build_teacher(ti[r].numpy(), lp16, t2d_map)
            _, t_valid[r], t_logp[r] = raw_teacher(ti[r].numpy(), lp16, t2d_map)
        yield {**b, "hidden": hs, "t_idx": torch.from_numpy(t_idx), "t_prob": torch.from_numpy(t_prob),
               "t_top1": torch.from_numpy(t_top1), "t_valid": torch.from_numpy(t_valid),
               "t_logp": torch.from_numpy(t_logp)}


def bench_eval(model, reader, budgets: list[int], rounds: int, ttt: int, max_length: int) -> dict:
    """Seconds of one evaluation of every sample per padded-token budget (best of `rounds`, alternated)."""
    from stage2_train.evaluate import evaluate_model
    from stage2_train.precision import resolve_compute_dtype

    amp = resolve_compute_dtype("auto", torch.device("cpu"), "float32")
    idx = np.arange(len(reader))
    best = {b: float("inf") for b in budgets}
    metrics = {}
    for _ in range(rounds):
        for b in budgets:
            t = time.perf_counter()
            metrics[b] = evaluate_model(model, reader, idx, ttt_length=ttt, max_tokens=b, max_length=max_length,
                                        compute_dtype=amp)
            best[b] = min(best[b], time.perf_counter() - t)
    ref = metrics[budgets[0]]
    for b in budgets[1:]:  # another batching is another padding: the same numbers up to rounding
        np.testing.assert_allclose(metrics[b]["acc"], ref["acc"], atol=2e-3)
        np.testing.assert_allclose(metrics[b]["loss"], ref["loss"], rtol=1e-2)
    tokens = ref["num_tokens"]
    return {str(b): {"s": best[b], "tokens_per_s": tokens / best[b], "simulated_tau": metrics[b]["simulated_tau"]}
            for b in budgets} | {"tokens": tokens, "compute_dtype": str(amp)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="the cache to read (required unless --quick)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the real run (0: skip)")
    ap.add_argument("--output", default=None, help="head dir of the real run (default: a temp dir)")
    ap.add_argument("--draft-vocab", type=int, default=8000)
    ap.add_argument("--ttt", type=int, default=7)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--speed-steps", type=int, default=20, help="steps timed for the steps/s ratios")
    ap.add_argument("--workers", type=int, default=0, help="train.num_workers (0: the chunk loader's threads)")
    ap.add_argument("--target-path", default=None, help="target for the online comparison (default: from cache.json)")
    ap.add_argument("--parts", default="train,loader,speed,online",
                    help="comma-separated subset of train,loader,speed,online,eval")
    ap.add_argument("--eval-tokens", default="16384,2048", help="eval: padded tokens per batch to compare")
    ap.add_argument("--rounds", type=int, default=4, help="speed: alternate memory/cache blocks this many times")
    ap.add_argument("--threads", type=int, default=2, help="loader decode threads (train.loader_threads)")
    ap.add_argument("--gpu-tok-s", type=float, default=20000.0, help="emulated GPU step: sleep tokens / this")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="a tiny cache extracted here, a few steps (the test suite)")
    a = ap.parse_args()
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import tiny_inputs, tiny_cache

        work = Path(tempfile.mkdtemp(prefix="bench_train_quick_"))
        a.cache = str(tiny_cache(work, 12))
        a.target_path = str(tiny_inputs(work)[0])
        a.steps, a.draft_vocab, a.ttt, a.micro_batch, a.max_tokens, a.max_length = 4, 64, 3, 2, 512, 128
        a.speed_steps, a.rounds, a.eval_tokens = 2, 1, "2048,256"
    if not a.cache:
        ap.error("--cache is required (or --quick)")

    reader = CacheReader(a.cache)
    report: dict = {"cache": a.cache, "samples": len(reader), "tokens": int(reader.lengths().sum())}
    vocab = build_draft_vocab(reader.token_counts(), a.draft_vocab)
    report["vocab_coverage"] = vocab.coverage

    parts = set(a.parts.split(","))
    # 1. the real training run
    if a.steps and "train" in parts:
        from stage2_train.trainer import run_train

        out = a.output or tempfile.mkdtemp(prefix="bench_train_")
        cfg = load_config(raw={"name": "bench", "target": {"path": "unused"},
                               "train": {"cache": a.cache, "output": out, "draft_vocab_size": a.draft_vocab,
                                         "ttt_length": a.ttt, "lr": a.lr, "max_steps": a.steps,
                                         "micro_batch_size": a.micro_batch, "max_tokens_per_batch": a.max_tokens,
                                         "max_length": a.max_length, "val_fraction": 0.1,
                                         "eval_every": max(1, a.steps // 3), "save_every": a.steps,
                                         "warmup_ratio": 0.05, "num_workers": a.workers,
                                         "deepspeed": str(Path(__file__).resolve().parents[1]
                                                          / "configs/deepspeed/cpu_fp32.json")}})
        dt, head = timed(lambda: run_train(cfg, restart=True, progress=True))
        hc = json.loads((Path(head) / "config.json").read_text())
        report["train_run"] = {"steps": a.steps, "seconds": dt, "steps_per_s": a.steps / dt,
                               "heldout": hc["training"].get("heldout"), "best_step": hc["training"].get("best_step"),
                               "head": str(head)}

    # 2. loader throughput: zarr cache vs np.memmap of the same rows
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - a.workers))
    batches = make_batches(np.minimum(reader.lengths(), a.max_length), range(len(reader)),
                           micro_batch_size=a.micro_batch, max_tokens=a.max_tokens, seed=0, epoch=0)
    if "loader" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_mm_") as td:
            mm, offs = dump_memmaps(reader, Path(td))
            report["loader"] = bench_loader(reader, batches, vocab, a.max_length, mm, offs, a.workers)
            del mm

    # 3. steps/s: from the cache (DataLoader) vs the same batches in memory, alternating blocks so
    #    that drifting background load on a shared machine hits both sides alike
    model = make_model(reader, vocab, a.draft_vocab)
    order = chunk_aware_order(np.array([x.shard for x in reader.refs]), np.minimum(reader.lengths(), a.max_length),
                              np.arange(len(reader)), micro_batch_size=a.micro_batch, max_tokens=a.max_tokens,
                              seed=0, epoch=0)
    n = min(a.speed_steps, len(order.batches) // a.rounds - 1)

    def cache_loader(bl):
        return make_train_loader(reader, order.arrivals, bl, vocab.target_to_draft(), a.max_length,
                                 num_workers=0, threads=a.threads)

    if parts & {"speed", "online"}:
        # one extra batch per block: the first batch of a fresh loader is awaited in either case
        blocks = [order.batches[r * (n + 1):(r + 1) * (n + 1)] for r in range(a.rounds)]
        mems = [list(cache_loader(bl)) for bl in blocks]
        train_steps(model, iter(mems[0][:2]), 2, a.ttt)  # warm-up
    if "speed" in parts:
        t_mem = t_cache = e_mem = e_cache = 0.0
        for r in range(a.rounds):  # alternating blocks: drifting load hits both sides alike
            t_mem += n / train_steps(model, _skip_first(mems[r]), n, a.ttt)
            t_cache += n / train_steps(model, _skip_first(cache_loader(blocks[r])), n, a.ttt)
            e_mem += n / emulated_steps(_skip_first(mems[r]), n, a.gpu_tok_s)
            e_cache += n / emulated_steps(_skip_first(cache_loader(blocks[r])), n, a.gpu_tok_s)
        report["steps_per_s"] = {"memory": n * a.rounds / t_mem, "cache": n * a.rounds / t_cache,
                                 "cache_over_memory": t_mem / t_cache, "steps": n * a.rounds,
                                 "emulated_gpu_tok_s": a.gpu_tok_s, "emulated_memory": n * a.rounds / e_mem,
                                 "emulated_cache": n * a.rounds / e_cache, "emulated_cache_over_memory": e_mem / e_cache,
                                 "loader_threads": a.threads, "load_avg": os.getloadavg()}
    report.setdefault("steps_per_s", {})

    # 4. offline vs online (target resident, forward on every step)
    try:
        if "online" not in parts:
            raise RuntimeError("not requested")
        mem = mems[0]
        from schemas.config import TargetConfig
        from schemas.target import load_target

        tpath = a.target_path or reader.meta["target"].get("path")
        tmodel, _, _ = load_target(TargetConfig(path=tpath, dtype="float32", device="cpu"))
        tmodel.eval()
        gen = online_batches(tmodel, reader.layers, reader.topk, vocab.target_to_draft(), mem)
        next(gen)
        sps_online = train_steps(model, online_batches(tmodel, reader.layers, reader.topk,
                                                       vocab.target_to_draft(), mem), n, a.ttt)
        sps_off = train_steps(model, iter(mem), n, a.ttt)
        report["steps_per_s"].update(offline_same_batches=sps_off, online=sps_online,
                                     offline_over_online=sps_off / sps_online)
    except Exception as e:  # noqa: BLE001 - the target may be absent where only the cache is
        report["steps_per_s"]["online_error"] = f"{type(e).__name__}: {e}"

    if "eval" in parts:
        report["eval"] = bench_eval(model.eval(), reader, [int(b) for b in a.eval_tokens.split(",")], a.rounds,
                                    a.ttt, a.max_length)

    print(json.dumps(report, indent=1, default=float))
    print("\n| measure | value |\n|---|---:|")
    for k, v in report.get("loader", {}).items():
        print(f"| loader {k} | {v['tokens_per_s']:.0f} tok/s, {v['MB_per_s']:.1f} MB/s |")
    S = report["steps_per_s"]
    if "memory" in S:
        print(f"| steps/s memory / cache (CPU step) | {S['memory']:.3f} / {S['cache']:.3f} "
              f"(ratio {S['cache_over_memory']:.3f}) |")
        print(f"| steps/s memory / cache (GPU step emulated, {S['emulated_gpu_tok_s']:,.0f} tok/s) | "
              f"{S['emulated_memory']:.3f} / {S['emulated_cache']:.3f} (ratio {S['emulated_cache_over_memory']:.3f}) |")
    if "online" in S:
        print(f"| steps/s online (target resident) | {S['online']:.3f} (offline/online {S['offline_over_online']:.2f}) |")
    for b, v in report.get("eval", {}).items():
        if isinstance(v, dict):
            print(f"| eval, {b} padded tokens per batch | {v['s']:.2f} s, {v['tokens_per_s']:.0f} tok/s |")
    if "train_run" in report and report["train_run"]["heldout"]:
        from stage2_train.evaluate import metrics_table

        print(metrics_table(report["train_run"]["heldout"], f"held-out, best step {report['train_run']['best_step']}"))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
