"""The published result of bench/quality.py: one json + md + png that a later run can be compared with.

    report = build_report(run, head, command=..., config=..., sizes=..., evals=..., sweep=...)
    paths = write_report(report, run, head, out_dir, stem)   # out_dir/stem.{json,md,png}

The json holds everything the md and png show, plus what makes the run reproducible and
comparable: the exact command, the git commit, the final config (text and sha256), the sha256
of every data file the run read or wrote (prompt sets, regenerated answers, the shared sources,
the cache's cache.json), the cache's size, the stage timings (pipeline markers), the machine.
Figures: held-out acc_k and simulated τ against training tokens (the head's eval.jsonl against
the cumulative tokens of metrics.jsonl), the stage-3 table per prompt set, target dtype and
method, real τ per MT-bench category (Σ new tokens / Σ target passes over the category's
prompts, per method), the issue's goals with the margin by which each is met or missed, and what
the held-out curve says more training would give (`projection`; `python bench/quality_report.py
bench/results/<stem>.json` adds it to a report published before it existed).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

SCHEMA = "eagle3-quality-report/1"
# issue 21's goals (SmolLM2 target, bf16 CPU): (key, prompt set, method, metric, threshold)
GOALS = [("MT-bench chain τ", "MT-bench", "chain", "tau", 2.0),
         ("MT-bench chain speed-up", "MT-bench", "chain", "speedup", 1.3),
         ("MT-bench tree τ", "MT-bench", "tree", "tau", 2.5),
         ("GSM8K chain τ", "GSM8K", "chain", "tau", 2.2)]
HELDOUT_ACC0_GOAL = 0.55
PROJECT_HOURS = 1.0  # "what the curve says another hour would give" (issue 21)


def sha256(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def git_state(root: Path) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else None
    from schemas.target import cpu_native_bf16

    return {"cpu": cpu, "cores": os.cpu_count(), "native_bf16": cpu_native_bf16(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- the pieces


def training_curve(head: Path) -> list[dict]:
    """Held-out evaluations (eval.jsonl) at the cumulative training tokens of their step (metrics.jsonl)."""
    seen, tokens = {}, 0
    for r in _jsonl(head / "metrics.jsonl"):
        tokens += int(r.get("tokens") or 0)
        seen[int(r["step"])] = tokens
    return [{"step": int(e["step"]), "tokens": seen.get(int(e["step"])), "acc": e["acc"],
             "simulated_tau": e["simulated_tau"]} for e in _jsonl(head / "eval.jsonl")]


def category_tau(method: dict) -> dict:
    """Real τ per MT-bench category: Σ new tokens / Σ target passes over the category's turns (ids
    mt-<question_id>-<category>, as bench/quality.py writes them)."""
    acc: dict[str, list[int]] = {}
    for p in method.get("per_prompt", []):
        parts = str(p["id"]).split("-")
        if len(parts) >= 3 and parts[0] == "mt":
            a = acc.setdefault("-".join(parts[2:]), [0, 0])
            a[0] += int(p["new_tokens"])
            a[1] += int(p["passes"])
    return {c: (n / k if k else None) for c, (n, k) in sorted(acc.items())}


def eval_rows(evals: dict[str, dict]) -> list[dict]:
    """One row per (prompt set, target dtype, method): τ, speed-up, lossless, per-category τ; vLLM rows too."""
    rows = []
    for name, rep in evals.items():
        set_name, _, dtype = name.partition(", target ")
        for m in rep["heads"][0]["methods"]:
            rows.append({"set": set_name, "dtype": dtype, "method": m["method"], "engine": "hf",
                         "prompts": m["num_prompts"], "tau": m["tau"], "speedup": m["speedup"],
                         "lossless": m["lossless"], "ties": m.get("lossless_ties"),
                         "acceptance_by_depth": m["acceptance_by_depth"], "by_category": category_tau(m)})
        v = rep.get("vllm") or {}
        for h in v.get("heads", []):
            rows.append({"set": set_name, "dtype": v.get("dtype", dtype), "method": "chain", "engine":
                         f"vllm {v.get('version', '')}".strip(), "prompts": h.get("num_prompts"),
                         "tau": h.get("mean_acceptance_length"), "speedup": h.get("speedup"),
                         "lossless": h.get("identical"), "by_category": {}})
    return rows


def goals(rows: list[dict], heldout: Optional[dict]) -> list[dict]:
    """Each goal: the best bf16 (else any dtype) HF row's value, met or not, and the margin."""
    out = []
    for key, set_name, method, metric, thr in GOALS:
        cands = [r for r in rows if r["set"] == set_name and r["method"] == method and r["engine"] == "hf"
                 and r.get(metric) is not None]
        bf16 = [r for r in cands if r["dtype"] == "bfloat16"]
        r = max(bf16 or cands, key=lambda x: x[metric], default=None)
        val = r[metric] if r else None
        out.append({"goal": key, "threshold": thr, "value": val, "dtype": r["dtype"] if r else None,
                    "met": val is not None and val >= thr, "margin": None if val is None else val - thr})
    acc0 = (heldout or {}).get("acc", [None])[0]
    out.append({"goal": "held-out acc_0", "threshold": HELDOUT_ACC0_GOAL, "value": acc0, "dtype": None,
                "met": acc0 is not None and acc0 >= HELDOUT_ACC0_GOAL,
                "margin": None if acc0 is None else acc0 - HELDOUT_ACC0_GOAL})
    return out


def log_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b ln(x)."""
    import numpy as np

    b, a = np.polyfit(np.log(np.asarray(xs, dtype=float)), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def _tokens_for(y: float, a: float, b: float) -> Optional[float]:
    """Where the fit reaches y (None when it never rises, or only past any float: a near-flat slope)."""
    try:
        return math.exp((y - a) / b) if b > 0 else None
    except OverflowError:
        return None


def training_rate(stages: list[dict], head: str, tokens: int) -> Optional[float]:
    """Training tokens per second of the head's own training stage (the last marker whose output is
    a folder of the head's name: a GPU run's markers name the other machine's paths)."""
    runs = [s for s in stages if s["stage"] == "train" and s.get("output")
            and Path(s["output"]).name == Path(head).name and s.get("seconds")]
    return tokens / runs[-1]["seconds"] if runs and tokens else None


def projection(rep: dict, hours: float = PROJECT_HOURS) -> Optional[dict]:
    """What the held-out curve says more training would give (the issue asks it of every missed goal).

    Fits y = a + b ln(tokens) to the later half of the held-out curve (at least 3 points; the early
    steps rise faster than any log), for acc_0 and the simulated τ, and reads it `hours` of training
    further on at the training stage's own rate, and where it reaches each goal. A real τ is carried
    along by scaling its excess over 1 with the simulated τ's (acceptance per cycle grows together).
    The curve only knows the tokens it saw: more epochs over one cache flatten sooner than the fit,
    new data may not."""
    pts = [p for p in rep["curve"] if p.get("tokens")]
    pts = pts[len(pts) // 2:] if len(pts) >= 6 else pts
    ho = rep["head"].get("heldout") or {}
    if len(pts) < 3 or not ho.get("acc"):
        return None
    t0 = pts[-1]["tokens"]
    rate = training_rate(rep["stages"], rep["head"]["path"], t0)
    x = [p["tokens"] for p in pts]
    fits = {"acc_0": log_fit(x, [p["acc"][0] for p in pts]), "simulated_tau": log_fit(x, [p["simulated_tau"] for p in pts])}
    t1 = t0 + rate * hours * 3600 if rate else None

    def hours_to(t: Optional[float]) -> Optional[float]:
        return None if t is None or not rate else max(t - t0, 0.0) / rate / 3600

    def at(key: str, t: Optional[float]) -> Optional[float]:
        a, b = fits[key]
        return None if t is None else a + b * math.log(t)

    sim0 = ho["simulated_tau"]
    sim1 = at("simulated_tau", t1)

    def goal_row(quantity: str, now: float, then: Optional[float], goal: float, key: str, y: float) -> dict:
        t = _tokens_for(y, *fits[key])  # None: the trend never gets there
        return {"quantity": quantity, "now": now, "then": then, "goal": goal, "hours_to_goal": hours_to(t),
                "never": t is None}

    rows = [goal_row("held-out acc_0", ho["acc"][0], at("acc_0", t1), HELDOUT_ACC0_GOAL, "acc_0", HELDOUT_ACC0_GOAL),
            {"quantity": "held-out simulated τ", "now": sim0, "then": sim1, "goal": None, "hours_to_goal": None}]
    for g in rep["goals"]:
        real = g["value"]
        if not g["goal"].endswith("τ") or real is None or real <= 1 or sim0 <= 1:
            continue
        need = 1 + (g["threshold"] - 1) * (sim0 - 1) / (real - 1)  # the simulated τ that scales to the goal
        rows.append(goal_row(g["goal"], real, None if sim1 is None else 1 + (real - 1) * (sim1 - 1) / (sim0 - 1),
                             g["threshold"], "simulated_tau", need))
    return {"hours": hours, "points": len(pts), "from_tokens": x[0], "tokens": t0, "rate_tok_s": rate,
            "tokens_then": t1, "fits": {k: {"a": a, "b": b} for k, (a, b) in fits.items()}, "rows": rows}


def _hours(row: dict) -> str:
    h = row["hours_to_goal"]
    if row.get("never"):
        return "never (flat)"
    if h is None:
        return "–"
    return f"{h:,.1f}" if h < 100 else f"{h:,.0f}"


def projection_markdown(pj: Optional[dict]) -> list[str]:
    if not pj:
        return []
    h = f"{pj['hours']:g} h"
    if pj["rate_tok_s"]:
        then = (f"read {h} further at the training stage's own {pj['rate_tok_s']:,.0f} tok/s: "
                f"{pj['tokens_then']:,.0f} tokens, {pj['tokens_then'] / pj['tokens']:.1f}x those seen so far")
    else:
        then = "no training-stage timing, so no reading further on"
    lines = ["", f"## What the curve says {h} more training would give", "",
             f"y = a + b ln(tokens) fitted to the last {pj['points']} held-out points ({pj['from_tokens']:,} to "
             f"{pj['tokens']:,} training tokens), {then}. A real τ moves with the simulated τ's excess over 1. "
             "A log trend read far past its points is a guess: the schedule's decaying learning rate flattens "
             "the last points, more epochs over one cache flatten sooner, new data may not.", "",
             f"| quantity | now | after {h} more | goal | hours to the goal on this trend |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['quantity']} | {_f(r['now'])} | {_f(r['then'])} | {_f(r['goal'], '{:g}')} | "
              f"{_hours(r)} |" for r in pj["rows"]]
    return lines


def data_files(run: Path, sources: list[Path]) -> list[dict]:
    files = [run / n for n in ("prompts.jsonl", "regenerated.jsonl", "eval_mtbench.jsonl", "eval_gsm8k.jsonl")]
    files += [run / "cache" / "cache.json"] + list(sources)
    return [{"path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size if p.is_file() else None}
            for p in files]


def stage_markers(run: Path) -> list[dict]:
    out = []
    for p in sorted((run / ".pipeline").glob("*.json")):
        m = json.loads(p.read_text())
        out.append({"stage": m["stage"], "seconds": m.get("seconds"), "output": m.get("output"),
                    "finished_at": m.get("finished_at")})
    return out


# --------------------------------------------------------------------------- the report


def run_cache_summary(run: Path) -> Optional[dict]:
    """The cache's summary; a run trained on another machine (bench/quality_gpu.py) brings it as
    <run>/cache_summary.json, its cache having stayed there."""
    from pipeline.run import cache_summary

    here = cache_summary(run / "cache")
    if here is None and (run / "cache_summary.json").is_file():
        return json.loads((run / "cache_summary.json").read_text())
    return here


def build_report(run: Path, head: Path, *, command: list[str], config: Path, sizes: dict,
                 evals: dict[str, dict], sweep: Optional[dict] = None, sources: tuple = (),
                 calls: Optional[list] = None, root: Optional[Path] = None) -> dict:
    hc = json.loads((head / "config.json").read_text())
    heldout = (hc.get("training") or {}).get("heldout")
    rows = eval_rows(evals)
    rep = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
        "git": git_state(root or Path(__file__).resolve().parents[1]), "machine": machine(),
        "config": {"path": str(config), "sha256": sha256(config), "text": config.read_text()},
        "sizes": sizes, "data": data_files(run, [Path(s) for s in sources]),
        "cache": run_cache_summary(run), "stages": stage_markers(run), "calls": calls or [],
        "head": {"path": str(head), "best_step": hc.get("training", {}).get("best_step"),
                 "total_steps": hc.get("training", {}).get("total_steps"), "heldout": heldout},
        "curve": training_curve(head), "eval": rows, "goals": goals(rows, heldout),
        "sweep": {k: v for k, v in (sweep or {}).items() if k != "markdown"},
    }
    rep["projection"] = projection(rep)
    return rep


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(rep: dict, png_name: str) -> str:
    c, h = rep.get("cache") or {}, rep["head"]
    lines = [f"# Quality run, {rep['created']}", "",
             f"`{' '.join(rep['command'])}` at {rep['git']['commit'] or '?'}"
             + (" (uncommitted changes)" if rep["git"].get("dirty") else "")
             + f"; {rep['machine']['cpu']} ({rep['machine']['cores']} cores, native bf16: "
               f"{rep['machine']['native_bf16']}), torch {rep['machine']['torch']}.", "",
             f"Cache: {c.get('samples', 0):,} conversations, {c.get('tokens', 0):,} tokens "
             f"({c.get('loss_tokens', 0):,} answer tokens). Head: step {h['best_step']} of {h['total_steps']}.", "",
             "## Goals (issue 21)", "", "| goal | value | target | met | margin |", "|---|---:|---:|---|---:|"]
    for g in rep["goals"]:
        lines.append(f"| {g['goal']}{' (' + g['dtype'] + ')' if g['dtype'] else ''} | {_f(g['value'])} | "
                     f"{g['threshold']} | {'yes' if g['met'] else 'no'} | {_f(g['margin'], '{:+.3f}')} |")
    ho = h.get("heldout") or {}
    lines += ["", "## Held-out (offline, teacher-forced)", "",
              "acc_k: " + " ".join(f"{a:.3f}" for a in ho.get("acc", [])) + f"; simulated τ {_f(ho.get('simulated_tau'))}",
              "", f"![curves]({png_name})", "", "| step | training tokens | acc_0 | simulated τ |", "|---:|---:|---:|---:|"]
    lines += [f"| {p['step']} | {_f(p['tokens'], '{:,}')} | {p['acc'][0]:.3f} | {p['simulated_tau']:.3f} |"
              for p in rep["curve"]]
    lines += projection_markdown(rep.get("projection"))
    cats = sorted({k for r in rep["eval"] for k in r["by_category"]})
    lines += ["", "## Speculative decoding (stage 3)", "",
              "| prompts | target dtype | method | τ | speed-up | lossless | " + " | ".join(cats) + " |",
              "|---|---|---|---:|---:|---|" + "---:|" * len(cats)]
    for r in rep["eval"]:
        ll = {True: "yes", False: "NO", None: "n/a"}[r["lossless"]] + (f" ({r['ties']} ties)" if r.get("ties") else "")
        meth = r["method"] if r["engine"] == "hf" else f"{r['method']}, {r['engine']}"
        lines.append(f"| {r['set']} ({r['prompts']}) | {r['dtype']} | {meth} | {_f(r['tau'])} | "
                     f"{_f(r['speedup'], '{:.2f}×')} | {ll} | "
                     + " | ".join(_f(r["by_category"].get(k)) for k in cats) + " |")
    if rep["sweep"].get("rows"):
        lines += ["", "## Sweep (one cache; each stage around the best point so far)", "",
                  "| stage | point | acc_0 | simulated τ | τ@5 (ranks) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r.get('stage', '')} | {'**★** ' if r.get('best') else ''}{r['name']} | {_f(r.get('acc_0'))} | "
                  f"{_f(r.get('simulated_tau'))} | {_f(r.get('tau@5'))} |" for r in rep["sweep"]["rows"]]
    lines += ["", "## Reproduce", "", f"config `{rep['config']['path']}` (sha256 `{rep['config']['sha256']}`); data:", ""]
    lines += [f"* `{d['path']}`: sha256 `{d['sha256']}`" for d in rep["data"]]
    lines += ["", "stages (seconds when each last ran): "
              + ", ".join(f"{s['stage']} {_f(s['seconds'], '{:,.0f}')}" for s in rep["stages"]), ""]
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
    pts = [p for p in rep["curve"] if p["tokens"] is not None]
    x = [p["tokens"] / 1e6 for p in pts]
    for k in range(len(pts[0]["acc"]) if pts else 0):
        a1.plot(x, [p["acc"][k] for p in pts], marker="o", label=f"acc_{k}")
    a1.set(xlabel="training tokens (M)", ylabel="held-out accuracy", title="acc_k", ylim=(0, 1))
    a2.plot(x, [p["simulated_tau"] for p in pts], marker="o", color="black")
    a2.set(xlabel="training tokens (M)", ylabel="τ", title="simulated acceptance length (held-out)")
    mt = [r for r in rep["eval"] if r["set"] == "MT-bench" and r["by_category"]]
    cats = sorted({k for r in mt for k in r["by_category"]})
    w = 0.8 / max(len(mt), 1)
    for i, r in enumerate(mt):
        a3.bar([j + i * w for j in range(len(cats))], [r["by_category"].get(c) or 0 for c in cats], w,
               label=f"{r['method']} ({r['dtype']})")
    a3.set_xticks([j + 0.4 - w / 2 for j in range(len(cats))], cats, rotation=30)
    a3.set(ylabel="τ (real)", title="MT-bench τ per category")
    for a in (a1, a3):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(rep: dict, out_dir: Path, stem: str) -> dict:
    """out_dir/stem.json, .md, .png (written whole: temp file + rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    for kind, text in (("json", json.dumps(rep, indent=1, default=str) + "\n"), ("md", markdown(rep, paths["png"].name))):
        tmp = paths[kind].with_name(paths[kind].name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[kind])
    tmp = paths["png"].with_name(paths["png"].stem + ".tmp.png")
    plot(rep, tmp)
    os.replace(tmp, paths["png"])
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    """Add the projection to published reports (json + md + png rewritten from the json)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("reports", nargs="+", type=Path, help="bench/results/<stem>.json")
    ap.add_argument("--hours", type=float, default=PROJECT_HOURS)
    args = ap.parse_args(argv)
    for path in args.reports:
        rep = json.loads(path.read_text())
        rep["projection"] = projection(rep, args.hours)
        print("\n".join(write_report(rep, path.parent, path.stem)[k].name for k in ("json", "md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
