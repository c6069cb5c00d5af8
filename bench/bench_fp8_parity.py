"""Quality parity of fp8 features: the same head trained from a bf16 and an fp8 cache.

    python bench/bench_fp8_parity.py --bf16 DIR/cache --fp8 DIR/cache [--steps 200]

Both caches must hold the same samples of the same target (bench_extract.py
--hidden-dtype bf16|fp8 --workdir ... writes them). Same seed, split, steps and
hyper-parameters; prints held-out acc_k per k from each, |Δacc_k|, their mean over k and
the simulated acceptance length τ of each (goal: mean |Δacc_k| <= 0.01, τ within 1%).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(cache: str, out: Path, a) -> dict:
    from schemas.config import load_config
    from stage2_train.trainer import run_train

    cfg = load_config(raw={"name": "parity", "target": {"path": "unused"},
                           "train": {"cache": cache, "output": str(out), "draft_vocab_size": a.draft_vocab,
                                     "ttt_length": a.ttt, "lr": a.lr, "max_steps": a.steps, "seed": a.seed,
                                     "micro_batch_size": a.micro_batch, "max_tokens_per_batch": a.max_tokens,
                                     "val_fraction": 0.1, "eval_every": a.steps, "save_every": a.steps,
                                     "warmup_ratio": 0.05,
                                     "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json")}})
    head = run_train(cfg, restart=True, progress=False)
    return json.loads((Path(head) / "config.json").read_text())["training"]["heldout"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", default=None, help="bf16 cache (required unless --quick)")
    ap.add_argument("--fp8", default=None, help="fp8 cache of the same samples (required unless --quick)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft-vocab", type=int, default=8000)
    ap.add_argument("--ttt", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="two tiny caches made here, 4 steps (the test suite)")
    a = ap.parse_args()
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import tiny_cache

        work = Path(tempfile.mkdtemp(prefix="fp8_parity_quick_"))
        a.bf16, a.fp8 = str(tiny_cache(work, 12)), str(tiny_cache(work, 12, hidden_dtype="fp8"))
        a.steps, a.draft_vocab, a.ttt, a.micro_batch, a.max_tokens = 4, 64, 3, 2, 512
    if not (a.bf16 and a.fp8):
        ap.error("--bf16 and --fp8 are required (or --quick)")
    work = Path(tempfile.mkdtemp(prefix="fp8-parity-"))
    res = {k: train(getattr(a, k), work / k, a) for k in ("bf16", "fp8")}
    acc = {k: res[k]["acc"] for k in res}
    d = [abs(x - y) for x, y in zip(acc["bf16"], acc["fp8"])]
    tau = {k: res[k]["simulated_tau"] for k in res}
    out = {"steps": a.steps, "seed": a.seed, "acc_bf16": acc["bf16"], "acc_fp8": acc["fp8"], "abs_delta_acc": d,
           "mean_abs_delta_acc": sum(d) / len(d), "tau_bf16": tau["bf16"], "tau_fp8": tau["fp8"],
           "tau_rel_diff": tau["fp8"] / tau["bf16"] - 1.0}
    print("| k | acc bf16 | acc fp8 | abs Δ |\n|---|---:|---:|---:|")
    for k, (x, y, z) in enumerate(zip(acc["bf16"], acc["fp8"], d)):
        print(f"| {k} | {x:.4f} | {y:.4f} | {z:.4f} |")
    print(f"mean |Δacc_k| = {out['mean_abs_delta_acc']:.4f}; simulated τ bf16 {tau['bf16']:.4f}, "
          f"fp8 {tau['fp8']:.4f} ({100 * out['tau_rel_diff']:+.2f}%)")
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
