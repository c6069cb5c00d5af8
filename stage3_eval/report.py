"""report.json + report.md + report.png for one eval run (one or several heads).

Lossless (greedy): "lossless" = no failure, ties allowed (see stage3_eval.evaluate);
"lossless_failures" and "lossless_ties" count them; "mismatched_prompts" lists both,
each with the target's top-1/top-2 margin at the first differing position.
Lossless (sampling, T > 0): "lossless" = the row's "sampling_check" passed
(stage3_eval/sampling_check.py: statistic, p_value, n, min_tv = the shift it detects with
power 0.9); null when the check is off (eval.lossless_runs = 0).
Every method row carries its "temperature" (eval.temperatures; rows in temperature order,
then method order), and so does every vLLM row.

report.json layout:
  {"target": ..., "prompts": [...], "settings": {...},
   "heads": [{"head": DIR, "offline": {acc, acc_std, loss, loss_std, simulated_tau, ...} | {"skipped": why},
              "methods": [{"method", "num_prompts", "num_turns", "new_tokens", "target_forward_passes",
                           "tau", "acceptance_by_depth", "accept_length_hist", "baseline_new_tokens",
                           "baseline_wall_s", "spec_wall_s", "baseline_tokens_per_s", "spec_tokens_per_s",
                           "speedup", "lossless", "mismatched_prompts", "per_prompt": [...]}]}],
   "vllm": {"version", "target_dir", "dtype", "method": "chain", "draft_tokens", "log",   (eval.engine vllm|both)
            "heads": [{"head", "name", "export", "drafts", "accepted", "acceptance_per_pos", "acceptance_by_depth",
                       "accept_length_hist", "mean_acceptance_length", "baseline_tokens_per_s",
                       "spec_tokens_per_s", "speedup", "identical", "mismatched_prompts", ...}]}}
The engine table puts HF chain and vLLM side by side in one convention: per position d, the
fraction of drafts with at least d tokens accepted (what vLLM counts), and the mean acceptance
length 1 + accepted / drafts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from stage3_eval.offline import offline_markdown


def first_mismatch(a: list[int], b: list[int]) -> Optional[int]:
    """First index where two token lists differ (the shorter length when one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def speed_fields(base_new: int, base_s: float, new: int, spec_s: float) -> dict:
    """Baseline vs speculative throughput, the same fields for every engine's row."""
    base_tps = base_new / base_s if base_s > 0 else None
    spec_tps = new / spec_s if spec_s > 0 else None
    return {"baseline_new_tokens": base_new, "baseline_wall_s": base_s, "spec_wall_s": spec_s,
            "baseline_tokens_per_s": base_tps, "spec_tokens_per_s": spec_tps,
            "speedup": (spec_tps / base_tps) if base_tps and spec_tps else None}

REQUIRED = ("method", "num_prompts", "new_tokens", "target_forward_passes", "tau", "acceptance_by_depth",
            "baseline_tokens_per_s", "spec_tokens_per_s", "speedup", "lossless", "mismatched_prompts")


def summarize(method: str, runs: list[dict], depth: int) -> dict:
    """Aggregate per-turn records {id, new_tokens, passes, accept_lengths, drafted_depths, wall_s,
    base_new_tokens, base_wall_s, match, first_mismatch} into one method row."""
    new = sum(r["new_tokens"] for r in runs)
    passes = sum(r["passes"] for r in runs)
    acc = [a for r in runs for a in r["accept_lengths"]]
    drafted = [d for r in runs for d in r["drafted_depths"]]
    by_depth = []
    for d in range(1, depth + 1):
        tried = sum(1 for a, dd in zip(acc, drafted) if dd >= d and a >= d - 1)
        ok = sum(1 for a in acc if a >= d)
        by_depth.append(ok / tried if tried else None)
    hist = [sum(1 for a in acc if a == i) for i in range(depth + 1)]
    base_new = sum(r["base_new_tokens"] for r in runs)
    base_s = sum(r["base_wall_s"] for r in runs)
    spec_s = sum(r["wall_s"] for r in runs)
    checked = [r for r in runs if r["match"] is not None]
    mism = [{"id": r["id"], "turn": r["turn"], "first_mismatch": r["first_mismatch"],
             **_mismatch_fields(r.get("mismatch"))} for r in checked if not r["match"]]
    ties = sum(1 for x in mism if x.get("tie"))
    return {
        "method": method,
        "num_prompts": len({r["id"] for r in runs}),
        "num_turns": len(runs),
        "new_tokens": new,
        "target_forward_passes": passes,
        "tau": new / passes if passes else None,
        "acceptance_by_depth": by_depth,
        "accept_length_hist": hist,
        **speed_fields(base_new, base_s, new, spec_s),
        "cycle_cost": cycle_cost(base_new, base_s, passes, spec_s),
        "lossless": (len(mism) == ties) if checked else None,
        "lossless_failures": (len(mism) - ties) if checked else None,
        "lossless_ties": ties if checked else None,
        "mismatched_prompts": mism,
        "per_prompt": [{k: r[k] for k in ("id", "turn", "new_tokens", "passes", "wall_s", "base_wall_s", "match")}
                       for r in runs],
    }


def cycle_cost(base_new: int, base_s: float, passes: int, spec_s: float) -> Optional[float]:
    """Wall time of one speculative cycle (drafting + one target pass) in plain greedy steps.

    speed-up = τ / cycle_cost exactly, so this is the τ a head must beat to gain anything.
    """
    if not (base_new and base_s > 0 and passes and spec_s > 0):
        return None
    return (spec_s / passes) / (base_s / base_new)


def cost_lines(report: dict) -> list[str]:
    """Why each speed-up is what it is: the measured cost of a cycle against τ."""
    lines = []
    for h in report["heads"]:
        for m in h["methods"]:
            c, tau, sp = m.get("cycle_cost"), m.get("tau"), m.get("speedup")
            if c is None or tau is None or sp is None:
                continue
            verdict = "a gain" if sp >= 1 else f"a loss: a gain needs τ > {c:.2f}"
            lines.append(f"* {h.get('name', h['head'])} {m['method']}: one cycle (drafting + one target pass "
                         f"over the drafted tokens) costs {c:.2f}× a plain greedy step, so the speed-up is "
                         f"τ / {c:.2f} = {tau:.3f} / {c:.2f} = {sp:.2f}×, {verdict}.")
    return ["", "### Cost of a cycle", ""] + lines if lines else []


def _mismatch_fields(d) -> dict:
    """tie + the target's margin at the first difference (a record without detail is a failure)."""
    if not d:
        return {}
    return {"tie": bool(d.get("tie", False)), "margin": d.get("margin"), "spec_token_gap": d.get("spec_token_gap"),
            "tolerance": d.get("tolerance"), "base_token": d.get("base_token"), "spec_token": d.get("spec_token")}


def _lossless_cell(m: dict) -> str:
    c = m.get("sampling_check")
    if c is not None:
        verdict = "yes" if c["pass"] else "NO"
        p = "–" if c["p_value"] is None else f"{c['p_value']:.2g}"
        return f"{verdict} (sampling test: p = {p}, n = {c['n']})"
    if m["lossless"] is None:
        return "n/a (sampling)"
    ties = m.get("lossless_ties") or 0
    fails = m.get("lossless_failures")
    fails = len(m["mismatched_prompts"]) - ties if fails is None else fails
    tie_s = f"{ties} tie{'s' if ties != 1 else ''}"
    if fails == 0:
        return "yes" if not ties else f"yes ({tie_s})"
    return f"NO ({fails} mismatched, {tie_s})"


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def hist_stats(hist: list[int]) -> tuple[list, Optional[float]]:
    """(P(>= d accepted) for d = 1..k, 1 + mean accepted) from a cycles-by-accepted-length histogram."""
    n = sum(hist)
    if not n:
        return [None] * (len(hist) - 1), None
    return ([sum(hist[d:]) / n for d in range(1, len(hist))],
            1 + sum(i * c for i, c in enumerate(hist)) / n)


def engine_rows(report: dict) -> list[dict]:
    """HF chain rows (with eval.draft_tokens) and vLLM rows, in the engine table's convention."""
    v = report.get("vllm")
    if not v:
        return []
    rows = []
    for h in report["heads"]:
        for m in h["methods"]:
            if m["method"] == "chain":
                per_pos, mal = hist_stats(m["accept_length_hist"])
                rows.append({"name": h.get("name", h["head"]), "engine": "hf", "T": m.get("temperature"),
                             "turns": m.get("num_turns"),
                             "new_tokens": m["new_tokens"], "mal": mal, "per_pos": per_pos,
                             "base_tps": m["baseline_tokens_per_s"], "spec_tps": m["spec_tokens_per_s"],
                             "speedup": m["speedup"], "identical": m["lossless"]})
    for h in v["heads"]:
        rows.append({"name": h["name"], "engine": f"vllm {v.get('version', '')}".strip(), "T": h.get("temperature"),
                     "turns": h["num_turns"],
                     "new_tokens": h["new_tokens"], "mal": h["mean_acceptance_length"],
                     "per_pos": h["acceptance_per_pos"], "base_tps": h["baseline_tokens_per_s"],
                     "spec_tps": h["spec_tokens_per_s"], "speedup": h["speedup"], "identical": h["identical"]})
    return sorted(rows, key=lambda r: (r["name"], r["T"] or 0.0))


def engine_markdown(report: dict) -> list[str]:
    rows = engine_rows(report)
    if not rows:
        return []
    v = report["vllm"]
    same = {True: "yes", False: "NO", None: "n/a (sampling)"}
    lines = ["", f"## Engines: chain k={v['draft_tokens']}, same prompts, baseline of the same engine at the "
             "same temperature", "",
             "| head | engine | T | turns | new tokens | mean acceptance length | P(≥d accepted), d=1.. | "
             "baseline tok/s | spec tok/s | speed-up | token-identical |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        pp = " ".join(_f(a, "{:.3f}") for a in r["per_pos"])
        lines.append(f"| {r['name']} | {r['engine']} | {_f(r['T'], '{:g}')} | {r['turns']} | {r['new_tokens']} | "
                     f"{_f(r['mal'])} | {pp} | "
                     f"{_f(r['base_tps'], '{:.1f}')} | {_f(r['spec_tps'], '{:.1f}')} | "
                     f"{_f(r['speedup'], '{:.2f}×')} | {same[r['identical']]} |")
    for h in v["heads"]:
        if h["mismatched_prompts"]:
            lines += ["", f"vLLM mismatches ({h['name']}): " + ", ".join(
                f"{x['id']}#turn{x['turn']}@{x['first_mismatch']}" for x in h["mismatched_prompts"])]
    return lines


def markdown(report: dict) -> str:
    s = report.get("settings", {})
    lines = [f"# Speculative decoding: {report.get('target', '')}", "",
             f"prompts: {', '.join(report.get('prompts', []))}; max_new_tokens {s.get('max_new_tokens')}, "
             f"temperatures {', '.join(f'{t:g}' for t in s.get('temperatures') or [s.get('temperature') or 0])}; "
             f"chain k={s.get('draft_tokens')}; "
             f"tree top_k={s.get('top_k')} depth={s.get('depth')} total_tokens={s.get('total_tokens')}"
             + (f"; lossless tie: {s['tie_rule']}" if s.get("tie_rule") else ""), "",
             "| head | method | T | prompts | new tokens | target passes | τ | acceptance by depth | "
             "baseline tok/s | spec tok/s | speed-up | lossless |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    if not any(h["methods"] for h in report["heads"]):
        lines = lines[:-3]  # eval.engine vllm: our decoding did not run
    for h in report["heads"]:
        name = h.get("name", h["head"])
        for m in h["methods"]:
            acc = " ".join(_f(a, "{:.2f}") for a in m["acceptance_by_depth"])
            lines.append(f"| {name} | {m['method']} | {_f(m.get('temperature'), '{:g}')} | {m['num_prompts']} | "
                         f"{m['new_tokens']} | "
                         f"{m['target_forward_passes']} | {_f(m['tau'])} | {acc} | {_f(m['baseline_tokens_per_s'], '{:.1f}')} | "
                         f"{_f(m['spec_tokens_per_s'], '{:.1f}')} | {_f(m['speedup'], '{:.2f}×')} | {_lossless_cell(m)} |")
    lines += cost_lines(report)
    lines += sampling_lines(report)
    for h in report["heads"]:
        if h.get("offline") is not None:
            lines += ["", f"## {h.get('name', h['head'])}", "", offline_markdown(h["offline"])]
        for m in h["methods"]:
            if m["mismatched_prompts"]:
                lines += ["", f"mismatches ({h.get('name')}, {m['method']}; tie = the target's top-1 and the "
                          f"speculative token within the stated tolerance): " +
                          ", ".join(_mismatch_text(x) for x in m["mismatched_prompts"])]
    lines += engine_markdown(report)
    return "\n".join(lines) + "\n"


def sampling_lines(report: dict) -> list[str]:
    """The sampling lossless check per row: what was tested, the verdict and the test's power."""
    lines = []
    for h in report["heads"]:
        for m in h["methods"]:
            c = m.get("sampling_check")
            if c is None:
                continue
            verdict = "pass" if c["pass"] else "FAIL"
            tv = "–" if c["min_tv"] is None else f"{c['min_tv']:.3f}"
            lines.append(f"* {h.get('name', h['head'])} {m['method']} T={c['temperature']:g}: {verdict}. "
                         f"{c['n']} tokens after the first, from {c['prefixes']} prefixes × {c['runs']} seeded runs "
                         f"of {c['tokens']} tokens; χ² = {c['statistic']:.2f} (df {c['df']}, p = {c['p_value']:.3g}), "
                         f"critical {c['critical']:.2f} at level {c['level']:g}"
                         + (f"; {c['impossible_tokens']} tokens the target cannot emit" if c["impossible_tokens"]
                            else "")
                         + f". Power {c['power']:.0%} against any shift of TV ≥ {tv} in the {c['bins']}-bin "
                         "distribution of u.")
    if not lines:
        return []
    return ["", "### Lossless at T > 0", "",
            "Each token after the first is mapped to u = P_target(tokens ranked before it) + V·P_target(it), "
            "V ~ U(0,1), under the target's own distribution at that point (temperature, top-p); lossless "
            "decoding makes every u independent U(0,1). Test: Pearson's χ² of u in equal bins.", ""] + lines


def _mismatch_text(x: dict) -> str:
    where = f"{x['id']}#turn{x['turn']}@{x['first_mismatch']}"
    if x.get("margin") is None:
        return f"{where} (failure)"
    kind = "tie" if x.get("tie") else "failure"
    return f"{where} ({kind}: top-1/top-2 margin {x['margin']:.3g}, spec token gap {x['spec_token_gap']:.3g}, " \
           f"tolerance {x['tolerance']:.3g})"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(h.get("name", h["head"]), m) for h in report["heads"] for m in h["methods"]]
    rows += [(f"{h['name']} vllm", {**h, "method": "chain"}) for h in (report.get("vllm") or {}).get("heads", [])]
    rows = [(f"{n} T={m['temperature']:g}" if m.get("temperature") is not None else n, m) for n, m in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows):
        hist = m["accept_length_hist"]
        tot = max(sum(hist), 1)
        xs = [x + 1 + (i - (len(rows) - 1) / 2) * width for x in range(len(hist))]
        a1.bar(xs, [c / tot for c in hist], width=width, label=f"{name} {m['method']}")
        ys = [a if a is not None else float("nan") for a in m["acceptance_by_depth"]]
        a2.plot(range(1, len(ys) + 1), ys, marker="o", label=f"{name} {m['method']}")
    a1.set_xlabel("tokens per cycle (accepted + 1)")
    a1.set_ylabel("fraction of cycles")
    a1.set_title("accepted length per cycle")
    a2.set_xlabel("draft depth")
    a2.set_ylabel("acceptance rate (given the previous depth accepted)")
    a2.set_ylim(0, 1.05)
    a2.set_title("acceptance by depth")
    for a in (a1, a2):
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
