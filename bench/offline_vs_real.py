"""Does the offline table predict real speculative decoding? One head, several prompt sets.

    python bench/offline_vs_real.py [CONFIG] [--head DIR] [--sets eval,mtbench,gsm8k] [--out DIR]
    python bench/offline_vs_real.py --quick     # a random tiny target and head (seconds; the test suite)

For each set the target first writes its own greedy answers to the set's first turns (`eagle3
regenerate`, eval.max_new_tokens long, the length stage 3 decodes), they are extracted into a
cache of their own (`eagle3 extract`), and one `eagle3 eval` with that cache as extract.eval_cache
puts the teacher-forced simulated τ on those very answers beside the real chain τ on the same
prompts. Where the two agree, the held-out table measures what decoding gets, and a gap between the
training run's held-out τ and a set's real τ is the set's distance from the training data, not a
fault of the decoder.

Sets: eval = the config's eval.prompts (at most eval.max_prompts); mtbench = the 80 MT-bench first
turns; gsm8k = the 20 GSM8K questions bench/quality.py holds out (the last rows of train.jsonl).
--prompts N keeps the first N of each. Writes <out>/offline_vs_real.{md,json}; each set's answers,
cache and stage-3 report stay in <out>/<set>/ and a re-run reuses the finished answers and cache.
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

SETS = ("eval", "mtbench", "gsm8k")


def quick_config(work: Path) -> Path:
    """A whole-pipeline config on a random tiny target (bench/quick.py), 3 eval prompts of 8 tokens."""
    from quick import tiny_inputs

    target, data = tiny_inputs(work, n=16)
    raw = {"name": "offline-vs-real-quick", "target": {"path": str(target), "dtype": "float32", "device": "cpu"},
           "data": {"train": [str(data)], "max_length": 96,
                    "regenerate": {"max_new_tokens": 8, "output": str(work / "regenerated.jsonl")}},
           "extract": {"cache": str(work / "cache"), "samples_per_shard": 8, "topk": 8},
           "train": {"output": str(work / "head"), "draft_vocab_size": 64, "ttt_length": 3, "val_fraction": 0.25,
                     "max_tokens_per_batch": 512, "save_every": 1000, "eval_every": 1000, "lr": 3e-3,
                     "max_steps": 3, "deepspeed": str(ROOT / "configs" / "deepspeed" / "cpu_fp32.json")},
           "eval": {"prompts": [str(data)], "max_prompts": 3, "max_new_tokens": 8, "draft_tokens": 3}}
    p = work / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def set_prompts(name: str, cfg) -> list[tuple[str, str]]:
    """The set's (id, first turn) pairs. MT-bench comes from bench/quality.py, round-robin over its 8
    categories (the file lists them category by category, so --prompts N keeps every category)."""
    if name == "eval":
        from stage3_eval.prompts import load_prompts

        return [(p.id, p.turns[0]) for p in load_prompts(list(cfg.eval.prompts), max_prompts=cfg.eval.max_prompts)]
    from quality import DATA, GSM8K_EVAL, MT_EVAL, mt_bench_first_turns

    src = DATA / ("mt_bench/question.jsonl" if name == "mtbench" else "gsm8k/train.jsonl")
    if not src.is_file():
        raise SystemExit(f"offline_vs_real: set {name} needs {src} (the project's shared data)")
    if name == "mtbench":
        return [(r["id"], r["prompt"]) for r in mt_bench_first_turns(MT_EVAL)]
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()][-GSM8K_EVAL:]
    return [(f"gsm8k-eval-{i}", r["question"]) for i, r in enumerate(rows)]


def write_set(dest: Path, prompts: list[tuple[str, str]]) -> tuple[Path, Path]:
    """(conversations file for regeneration, prompt file for stage 3): the same first turns, in order."""
    dest.mkdir(parents=True, exist_ok=True)
    conv, ask = dest / "conversations.jsonl", dest / "prompts.jsonl"
    conv.write_text("".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": t}]}) + "\n"
                            for i, t in prompts))
    ask.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in prompts))
    return conv, ask


def cli(*args: str, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL if quiet else None)
    if r.returncode != 0:
        raise SystemExit(f"offline_vs_real: `{' '.join(args[:2])}` failed (rc {r.returncode})")


def measure_set(config: Path, cfg, head: str, name: str, out: Path, n: int | None, quiet: bool) -> dict:
    """Regenerate, extract and evaluate one set; its row of the table."""
    prompts = set_prompts(name, cfg)[:n]
    dest = out / name
    conv, ask = write_set(dest, prompts)
    tokens = cfg.eval.max_new_tokens
    data = [f"data.train=[{conv}]", f"data.max_samples={len(prompts)}", "data.regenerate.enabled=true",
            f"data.regenerate.output={dest / 'regenerated.jsonl'}", f"data.regenerate.max_new_tokens={tokens}",
            f"data.regenerate.batch_size={min(len(prompts), 128)}", f"extract.cache={dest / 'cache'}"]
    cli("regenerate", str(config), *data, "--no-progress", quiet=quiet)
    cli("extract", str(config), *data, "--no-progress", quiet=quiet)
    cli("eval", str(config), *data, f"eval.head={head}", f"extract.eval_cache={dest / 'cache'}",
        f"eval.prompts=[{ask}]", f"eval.max_prompts={len(prompts)}", "eval.max_turns=1", "eval.method=[chain]",
        f"eval.output={dest / 'eval'}", quiet=quiet)
    h = json.loads((dest / "eval" / "report.json").read_text())["heads"][0]
    m, off = h["methods"][0], h["offline"]
    return {"set": name, "prompts": len(prompts), "max_new_tokens": tokens, "chain": cfg.eval.draft_tokens,
            "answer_tokens": m["new_tokens"], "real_tau": m["tau"], "simulated_tau": off["simulated_tau"],
            "acc": off["acc"], "acceptance_by_depth": m["acceptance_by_depth"], "speedup": m["speedup"],
            "lossless": m["lossless"], "report": str(dest / "eval" / "report.md")}


def markdown(rows: list[dict], head: str, held_out: dict | None) -> str:
    lines = [f"# Offline (teacher-forced on the target's own answers) against real chain τ: {head}", "",
             "| set | prompts | tokens each | chain | real τ | simulated τ | simulated - real | acc_k (offline) |"
             " speed-up | lossless |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['prompts']} | {r['max_new_tokens']} | {r['chain']} | {r['real_tau']:.3f} | "
                     f"{r['simulated_tau']:.3f} | {r['simulated_tau'] - r['real_tau']:+.3f} | "
                     f"{' '.join(f'{a:.3f}' for a in r['acc'])} | {r['speedup']:.2f}× | "
                     f"{'yes' if r['lossless'] else 'NO'} |")
    if held_out:
        lines += ["", f"The head's own held-out split (its training data's distribution): simulated τ "
                      f"{held_out['simulated_tau']:.3f}, acc_k {' '.join(f'{a:.3f}' for a in held_out['acc'])}."]
    return "\n".join(lines) + "\n"


def held_out_table(head: str) -> dict | None:
    """The held-out figures training recorded for the kept head (config.json training.heldout)."""
    p = Path(head) / "config.json"
    held = json.loads(p.read_text()).get("training", {}).get("heldout") if p.is_file() else None
    return held if held and "simulated_tau" in held else None


def set_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(SETS)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="the run's YAML config (target, eval settings; required unless --quick)")
    ap.add_argument("--head", default=None, help="head dir (default: train.output)")
    ap.add_argument("--sets", type=set_names, default="eval,mtbench,gsm8k", help=f"comma-separated, of {', '.join(SETS)}")
    ap.add_argument("--prompts", type=int, default=None, help="at most N prompts of each set")
    ap.add_argument("--out", default=None, help="output dir (default: <head>-offline-vs-real)")
    ap.add_argument("--quick", action="store_true", help="tiny random target, a 3-step head, 3 prompts of 8 tokens")
    a = ap.parse_args()
    if a.quick:
        with tempfile.TemporaryDirectory(prefix="offline-vs-real-") as work:
            config = quick_config(Path(work))
            cli("run", str(config), "--stages", "extract,train", "--no-progress", quiet=True)
            return compare(config, a, ["eval"], quiet=True)
    if not a.config:
        ap.error("give the run's CONFIG (or --quick)")
    return compare(Path(a.config), a, a.sets, quiet=False)


def compare(config: Path, a, sets: list[str], *, quiet: bool) -> int:
    from schemas.config import load_config

    cfg = load_config(config)
    head = a.head or cfg.train.output
    if not (Path(head) / "config.json").is_file():
        raise SystemExit(f"offline_vs_real: no head at {head} (train one, or give --head)")
    out = Path(a.out) if a.out else Path(str(head).rstrip("/") + "-offline-vs-real")
    rows = [measure_set(config, cfg, head, s, out, a.prompts, quiet) for s in sets]
    md = markdown(rows, head, held_out_table(head))
    (out / "offline_vs_real.json").write_text(json.dumps({"head": str(head), "rows": rows}, indent=2))
    (out / "offline_vs_real.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
