"""fp32 vs bf16 per pipeline stage on the same inputs (issue 13): regenerate, extract, train, eval.

  python bench/stage_dtypes.py [--prompts 24] [--steps 30] [--eval-prompts 3] [--stages regenerate,extract,train,eval]

Runs `eagle3 run configs/demo.yaml` once per dtype with target.dtype and train.compute_dtype set to
it (everything else equal: the same prompts, answer budget, cache layout, steps and eval prompts),
then prints the seconds of each stage from the pipeline's markers and the bf16/fp32 ratios, plus
what each run produced (tokens regenerated and cached, held-out acc_0, τ and speed-up).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("regenerate", "extract", "train", "eval")


def run(dtype: str, root: Path, a) -> dict:
    d = root / dtype
    shutil.rmtree(d, ignore_errors=True)
    ov = [f"name=dt-{dtype}", f"target.dtype={dtype}", f"train.compute_dtype={dtype}",
          f"data.max_samples={a.prompts}", f"data.regenerate.output={d}/regenerated.jsonl",
          f"extract.cache={d}/cache", f"train.output={d}/head", f"train.max_steps={a.steps}",
          f"train.eval_every={a.steps}", f"eval.max_prompts={a.eval_prompts}", "eval.offline=false", *a.extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml", "--no-progress",
                    "--stages", a.stages, *ov], cwd=ROOT, env=env, check=True)
    marks = {json.loads(p.read_text())["stage"]: json.loads(p.read_text()) for p in (d / ".pipeline").glob("*.json")}
    rp = d / "head" / "eval" / "report.json"
    rep = json.loads(rp.read_text()) if rp.is_file() else {"heads": [{"methods": []}]}
    return {"seconds": {s: marks[s]["seconds"] for s in STAGES if s in marks},
            "methods": {m["method"]: {"tau": m["tau"], "speedup": m["speedup"], "lossless": m["lossless"],
                                      "baseline_tokens_per_s": m["baseline_tokens_per_s"]}
                        for m in rep["heads"][0]["methods"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-prompts", type=int, default=3)
    ap.add_argument("--run-root", default="runs/stage-dtypes")
    ap.add_argument("--stages", default="regenerate,extract,train,eval", help="pipeline stages to run and time")
    ap.add_argument("--quick", action="store_true", help="a tiny random target, 2 prompts, 2 steps (the test suite)")
    a = ap.parse_args()
    a.extra = []
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import tiny_inputs

        target, _ = tiny_inputs(ROOT / a.run_root / "inputs")
        a.prompts, a.steps, a.eval_prompts = 2, 2, 1
        a.extra = [f"target.path={target}", "data.regenerate.max_new_tokens=8", "eval.max_new_tokens=8",
                   "train.draft_vocab_size=64", "extract.max_tokens_per_batch=1024"]
    root = (ROOT / a.run_root).resolve()
    res = {dt: run(dt, root, a) for dt in ("float32", "bfloat16")}
    print("\n| stage | fp32 s | bf16 s | fp32 / bf16 |\n|---|---:|---:|---:|")
    for s in STAGES:
        f, b = res["float32"]["seconds"].get(s), res["bfloat16"]["seconds"].get(s)
        if f and b:
            print(f"| {s} | {f:.1f} | {b:.1f} | {f / b:.2f}x |")
    for dt, r in res.items():
        print(f"{dt}: " + "; ".join(f"{k} τ {v['tau']:.3f}, baseline {v['baseline_tokens_per_s']:.1f} tok/s, "
                                    f"speed-up {v['speedup']:.2f}x, lossless {v['lossless']}"
                                    for k, v in r["methods"].items()))
    (root / "stage_dtypes.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
