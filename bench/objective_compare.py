"""The four training objectives (train.loss: ce, tv, lk_alpha, lk_lambda) from one cache, equal steps.

    python bench/objective_compare.py CONFIG --steps 2000 [--eval] [--out DIR] [--objectives ce,lk_alpha]
                                      [--mt-bench N] [--temperatures 0,1]
    python bench/objective_compare.py --quick         # a tiny target and cache, 3 steps each (seconds)

Writes a sweep config beside the output (CONFIG with sweep.grid = {train.loss: [...]} and
train.max_steps = --steps for every head), runs `python -m pipeline.cli sweep` on it (one cache,
extracted once if missing; each objective's head in <out>/loss-<name>; finished heads are kept
and not retrained), then prints, per objective, from the held-out split: acc_k, alpha_k (the
expected acceptance at T = 1, a lower bound from the cached top-K; [alpha_hi_k] its upper bound),
the simulated τ greedy (from acc) and at T = 1 (from alpha), and with --eval the measured τ and
speed-up of stage 3 at every eval.temperatures entry. objective_compare.json holds the numbers.
--mt-bench N evaluates on N MT-bench first turns instead of the config's eval prompts, taken
round-robin over the 8 categories (the file lists them category by category, so its first N would
be writing and role-play only); --temperatures sets eval.temperatures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

OBJECTIVES = ("ce", "tv", "lk_alpha", "lk_lambda")


def quick_config(work: Path) -> Path:
    """A whole-pipeline config on a random tiny target (bench/quick.py)."""
    from quick import tiny_inputs

    target, data = tiny_inputs(work, n=16)
    raw = {"name": "objective-compare-quick", "target": {"path": str(target), "dtype": "float32", "device": "cpu"},
           "data": {"train": [str(data)], "max_length": 96},
           "extract": {"cache": str(work / "cache"), "samples_per_shard": 8, "topk": 8},
           "train": {"output": str(work / "head"), "draft_vocab_size": 64, "ttt_length": 3, "val_fraction": 0.25,
                     "max_tokens_per_batch": 512, "save_every": 1000, "eval_every": 1000, "lr": 3e-3,
                     "deepspeed": str(ROOT / "configs" / "deepspeed" / "cpu_fp32.json")}}
    p = work / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def mt_bench_first_turns(dest: Path, n: int) -> Path:
    """N MT-bench first turns, round-robin over the categories, as an eval prompts file."""
    from quality import DATA, mt_bench_first_turns

    src = DATA / "mt_bench" / "question.jsonl"
    if not src.exists():
        raise SystemExit(f"--mt-bench: {src} is missing (the project's shared data)")
    rows = mt_bench_first_turns(n)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return dest


def sweep_config(config: Path, out: Path, objectives: list[str], steps: int, evaluate: bool,
                 mt_bench: int | None = None, temperatures: list[float] | None = None) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw.setdefault("train", {})["max_steps"] = steps
    out.mkdir(parents=True, exist_ok=True)
    ev = raw.setdefault("eval", {}) or {}
    raw["eval"] = ev
    if mt_bench:
        ev.update(prompts=[str(mt_bench_first_turns(out.parent / f"{out.name}.mt_bench.jsonl", mt_bench))],
                  max_prompts=mt_bench, max_turns=1)
    if temperatures:
        ev["temperatures"] = temperatures
    raw["sweep"] = {"grid": {"train.loss": objectives}, "eval": evaluate, "output": str(out)}
    p = out.parent / f"{out.name}.sweep.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def run_sweep(cfg: Path, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", str(cfg)] + ([] if progress else ["--no-progress"])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, env=env, check=True)  # in the caller's directory: the config's relative paths hold


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def table(rows: list[dict]) -> str:
    """Markdown: per objective, acc_k / alpha_k [alpha_hi_k] per position, simulated τ, measured τ."""
    measured = sorted({k for r in rows for k in r if k.startswith("tau_")})
    S = max((len(r.get("acc") or []) for r in rows), default=0)
    head = ["objective", *[f"acc_{k} / α_{k} [α_hi]" for k in range(S)], "sim τ greedy", "sim τ T=1",
            *[f"τ {k[4:]}" for k in measured], *[f"speed-up {k[4:]}" for k in measured]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc, al, hi = r.get("acc") or [], r.get("alpha") or [], r.get("alpha_hi") or []
        cells = [f"{acc[k]:.3f} / {al[k]:.3f} [{hi[k]:.3f}]" if k < len(acc) and k < len(al) else "–"
                 for k in range(S)]
        lines.append("| " + " | ".join([str(r["train.loss"]), *cells, _f(r.get("simulated_tau")),
                                        _f(r.get("simulated_tau_t1")), *[_f(r.get(k)) for k in measured],
                                        *[_f(r.get("speedup_" + k[4:]), "{:.2f}×") for k in measured]]) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="the run's YAML config (its cache; required unless --quick)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per objective (the same for all)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated train.loss values")
    ap.add_argument("--eval", action="store_true", help="also run stage 3 on every head (eval.temperatures)")
    ap.add_argument("--out", default=None, help="sweep dir (default: <train.output>-objectives)")
    ap.add_argument("--mt-bench", type=int, metavar="N", default=None,
                    help="evaluate on N MT-bench first turns, all categories round-robin (implies --eval)")
    ap.add_argument("--temperatures", default=None, help="eval.temperatures, comma-separated (e.g. 0,1)")
    ap.add_argument("--quick", action="store_true", help="tiny target and cache, 3 steps each")
    args = ap.parse_args()
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        ap.error(f"--objectives: unknown {', '.join(bad)}; choose from {', '.join(OBJECTIVES)}")
    if args.mt_bench is not None and args.mt_bench <= 0:
        ap.error("--mt-bench: give a positive number of prompts")
    args.eval = args.eval or bool(args.mt_bench)
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else None
    except ValueError:
        ap.error(f"--temperatures: comma-separated numbers, got {args.temperatures!r}")
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="objective-compare-") as work:  # nothing left behind
            return compare(quick_config(Path(work)), args, objectives, 3)
    if not args.config:
        ap.error("give the run's CONFIG (or --quick)")
    return compare(Path(args.config), args, objectives, args.steps)


def compare(config: Path, args, objectives: list[str], steps: int) -> int:
    from schemas.config import load_config

    out = Path(args.out) if args.out else Path(load_config(config).train.output.rstrip("/") + "-objectives")
    cfg = sweep_config(config, out, objectives, steps, args.eval, args.mt_bench, args.temperatures)
    run_sweep(cfg, progress=not args.quick)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    md = (f"# Objectives, {steps} steps each, one cache (held-out split; α = Σ min(p, q) over the cached "
          f"top-K, a lower bound of the acceptance at T = 1)\n\n" + table(rows))
    (out / "objective_compare.json").write_text(json.dumps({"steps": steps, "rows": rows}, indent=2, default=str))
    (out / "objective_compare.md").write_text(md)
    print(md)
    missing = [r["train.loss"] for r in rows if r.get("alpha") is None]
    if missing:
        print(f"no held-out metrics for: {', '.join(missing)} (no held-out split, or not finished)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
