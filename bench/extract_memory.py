"""Peak host memory of `eagle3 extract` against the shard size, side by side in one run (issue 19).

  python bench/extract_memory.py [--before DIR] [--quick] [--json OUT]

A random target shaped like MiniCPM4-8B where host memory is concerned: hidden size 4096
(a row of features is 3 x 4096 bf16 + top-64 ids and log-probs = 24,960 bytes, as for
MiniCPM4-8B), but 2 thin decoder layers (4 heads, MLP 256) and a 4,096-token vocabulary
so that it runs on 2 CPU cores; fp32. 64 samples x 512 tokens (data.max_length 512,
drop_tail), `max_tokens_per_batch` 4096 (the batches are the same whatever the shard
size). `python -m pipeline.cli extract` runs in a fresh process once with 8 and once with
64 samples a shard; its peak RSS is the kernel's (os.wait4 ru_maxrss). The difference is
what a shard's size costs in host memory: before issue 19 the whole shard's features
(64 x 512 x 24,960 bytes = 0.82 GB), then its compressed chunks, were held.

--before DIR runs the same commands with the code in DIR as well (PYTHONPATH=DIR), e.g.
main at c96fae6:  mkdir /tmp/e3-c96fae6 && git -C /work/main archive c96fae6 | tar -x -C /tmp/e3-c96fae6
--quick: hidden 256, 16 samples x 64 tokens, 2 vs 16 samples a shard (the test suite runs it).
Each run's cache is checked (shards committed, samples) before its figure is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_target(out: Path, hidden: int, vocab: int, seed: int = 0) -> Path:
    """A random Llama with MiniCPM4-8B's hidden size, 2 thin layers, and the tests' tiny BPE + chat template."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch
    import transformers as tf

    from tiny import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=128 if hidden >= 512 else 32,
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def build_data(path: Path, n: int, words_per_answer: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog what is capital of france paris answer help poem sea sky".split()
    with open(path, "w") as f:
        for i in range(n):
            conv = [{"from": "human", "value": " ".join(rnd.choices(words, k=12))},
                    {"from": "gpt", "value": " ".join(rnd.choices(words, k=words_per_answer))}]
            f.write(json.dumps({"id": f"m{i}", "conversations": conv}) + "\n")
    return path


def write_config(path: Path, target: Path, data: Path, cache: Path, *, per_shard: int, max_length: int,
                 batch_tokens: int) -> Path:
    """Only keys that the code before issue 19 knows too (configs are validated strictly)."""
    import yaml

    path.write_text(yaml.safe_dump({
        "target": {"path": str(target), "dtype": "float32", "device": "cpu"},
        "data": {"train": [str(data)], "max_length": max_length, "truncation": "drop_tail"},
        "extract": {"cache": str(cache), "layers": [0, 1, 2], "topk": 64, "samples_per_shard": per_shard,
                    "max_tokens_per_batch": batch_tokens}}))
    return path


def peak_rss(code: Path, config: Path, log: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one `extract` process running the code in `code`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "SLURM_ARRAY_TASK_ID")}
    env.update(PYTHONPATH=str(code), EAGLE3_CPU_BF16="0", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", str(config), "--no-progress"],
                             cwd=code, env=env, stdout=err, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"extract failed ({code}): see {log}\n" + log.read_text()[-3000:])
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def check_cache(cache: Path, samples: int, per_shard: int) -> None:
    meta = json.loads((cache / "cache.json").read_text())
    shards = sorted(p for p in (cache / "shards").iterdir() if (p / "shard.json").is_file())
    got = sum(json.loads((p / "shard.json").read_text())["samples"] for p in shards)
    want_shards = -(-samples // per_shard)
    if got != samples or len(shards) != want_shards or meta["data"]["num_samples"] != samples:
        sys.exit(f"{cache}: {len(shards)} shards / {got} samples, expected {want_shards} / {samples}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="a checkout of the code to compare with (e.g. main at c96fae6)")
    ap.add_argument("--quick", action="store_true", help="hidden 256, 16 samples x 64 tokens (seconds)")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    q = args.quick
    hidden, vocab, n, max_len = (256, 512, 16, 64) if q else (4096, 4096, 64, 512)
    small, large = (2, 16) if q else (8, 64)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-extract-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    target = build_target(work / "target", hidden, vocab)
    data = build_data(work / "data.jsonl", n, words_per_answer=3 * max_len)
    row_kb = (3 * hidden * 2 + 64 * 6) / 1024
    print(f"target: hidden {hidden}, 2 thin layers, vocab {vocab}; {n} samples x {max_len} tokens; "
          f"{row_kb:.2f} KB of features a token; a {large}-sample shard holds "
          f"{large * max_len * row_kb / 1024:.0f} MB of them", flush=True)
    codes = [("after", ROOT)] + ([("before", Path(args.before).resolve())] if args.before else [])
    rows = []
    for label, code in codes:
        for per_shard in (small, large):
            cache = work / f"cache-{label}-{per_shard}"
            shutil.rmtree(cache, ignore_errors=True)
            cfg = write_config(work / f"{label}-{per_shard}.yaml", target, data, cache, per_shard=per_shard,
                               max_length=max_len, batch_tokens=small * max_len)
            rss, wall = peak_rss(code, cfg, work / f"{label}-{per_shard}.log")
            check_cache(cache, n, per_shard)
            rows.append({"code": label, "samples_per_shard": per_shard, "peak_rss_mb": round(rss, 1),
                         "wall_s": round(wall, 1)})
            print(f"{label:>6}: {per_shard:>3} samples a shard: peak RSS {rss:,.0f} MB ({wall:.0f}s)", flush=True)
    res = {"hidden_size": hidden, "samples": n, "tokens_per_sample": max_len, "feature_kb_per_token": round(row_kb, 2),
           "runs": rows, "difference_mb": {}}
    print(f"\n| code | {small} samples a shard | {large} samples a shard | difference |\n|---|---:|---:|---:|")
    for label, _ in codes:
        a = next(r["peak_rss_mb"] for r in rows if r["code"] == label and r["samples_per_shard"] == small)
        b = next(r["peak_rss_mb"] for r in rows if r["code"] == label and r["samples_per_shard"] == large)
        res["difference_mb"][label] = round(b - a, 1)
        print(f"| {label} | {a:,.0f} MB | {b:,.0f} MB | {b - a:+,.0f} MB |")
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
