"""`eagle3 shards ls|inspect|verify|stats|index CACHE [--json]`: look into a feature cache."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipeline.common import console, out, register_user_error, user_errors
from schemas.cache import (
    read_cache_json,
    CACHE_JSON, SCHEMA_ID, SHARD_JSON, CacheError, CacheReader, build_manifest, dir_bytes, shards_dir, verify_shard,
)

COVERAGE_N = (8192, 16384, 32768)
MASK_OPEN, MASK_CLOSE = "«", "»"


def _load_meta(root: Path) -> dict:
    return read_cache_json(root)


# --------------------------------------------------------------------------- ls


def list_shards(root: Path) -> list[dict]:
    """Every entry of shards/: committed shards, and what a killed run left (never 'committed')."""
    rows = []
    d = shards_dir(root)
    if not d.is_dir():
        return rows
    from schemas.cache_check import outside_links

    for p in sorted(d.iterdir(), key=lambda q: q.name.lstrip(".")):
        links = outside_links(root, p) if p.is_symlink() else []
        if links:  # never walked: a link to / would list the whole file system
            rows.append({"shard": int(p.stem) if p.stem.isdigit() else None, "name": p.name,
                         "status": f"refused: a symlink out of the cache ({links[0].split(' -> ')[-1]})",
                         "samples": None, "tokens": None, "loss_tokens": None, "disk_bytes": None, "ratio": None})
            continue
        if not p.is_dir():
            continue
        disk = dir_bytes(p)
        if p.name.startswith(".tmp-"):
            k = p.name.split("-")[1]
            rows.append({"shard": int(k) if k.isdigit() else None, "name": p.name, "status": "uncommitted (temp)",
                         "samples": None, "tokens": None, "loss_tokens": None, "disk_bytes": disk, "ratio": None})
            continue
        if p.suffix != ".zarr" or not p.stem.isdigit():
            continue
        if not (p / SHARD_JSON).is_file():
            rows.append({"shard": int(p.stem), "name": p.name, "status": "incomplete (no shard.json)",
                         "samples": None, "tokens": None, "loss_tokens": None, "disk_bytes": disk, "ratio": None})
            continue
        try:
            info = json.loads((p / SHARD_JSON).read_text())
            if not all(k in info for k in ("samples", "tokens", "loss_tokens")):
                raise KeyError("counts")
        except (OSError, ValueError, KeyError, TypeError):  # half-written or edited: never "committed"
            rows.append({"shard": int(p.stem), "name": p.name, "status": "incomplete (shard.json unreadable)",
                         "samples": None, "tokens": None, "loss_tokens": None, "disk_bytes": disk, "ratio": None})
            continue
        rows.append({"shard": int(p.stem), "name": p.name, "status": "committed", "samples": info["samples"],
                     "tokens": info["tokens"], "loss_tokens": info["loss_tokens"], "disk_bytes": disk,
                     "raw_bytes": info.get("raw_bytes"),
                     "ratio": round(info["raw_bytes"] / disk, 3) if disk and info.get("raw_bytes") else None})
    return rows


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- verify


def verify_cache(root: Path) -> dict:
    from schemas.cache_check import cache_problems

    meta = _load_meta(root)
    inconsistent = cache_problems(root, meta)  # what CacheReader refuses to open
    H, K, V = meta["target"]["hidden_size"], meta["topk"], meta["target"]["vocab_size"]
    bad: dict[str, list[str]] = {}
    checked = 0
    notes = []
    for row in list_shards(root):
        if row["status"] != "committed":
            # links out of the cache are listed as inconsistent; temporary shards in `leftovers`, with their owner
            if not (row["status"].startswith("refused") or row["name"].startswith(".tmp-")):
                notes.append(f"{row['name']}: {row['status']} (ignored by readers)")
            continue
        checked += 1
        problems = verify_shard(shards_dir(root) / row["name"], hidden_size=H, topk=K, vocab_size=V,
                                hidden_dtype=meta.get("hidden_dtype", "bfloat16"), layers=meta.get("layers"))
        if problems:
            bad[row["name"]] = problems
    expected = meta.get("num_shards")
    missing = []
    if expected is not None:
        have = {r["shard"] for r in list_shards(root) if r["status"] == "committed"}
        missing = [k for k in range(int(expected)) if k not in have]
    return {"ok": not bad and not inconsistent, "checked": checked, "bad": bad, "missing": missing,
            "inconsistent": inconsistent, "notes": notes, "leftovers": leftover_rows(root)}


def leftover_rows(root: Path) -> list[dict]:
    """What killed workers left in shards/ (never read), with its size and whether its owner is gone."""
    from schemas.leftovers import find_leftovers

    return [{"name": lo.path.name, "kind": lo.kind, "shard": lo.shard, "bytes": lo.bytes, "state": lo.state,
             "owner": None if lo.owner is None else {"host": lo.owner.host, "pid": lo.owner.pid},
             "why": lo.why, "text": lo.words() + {"dead": "; the next `eagle3 extract` removes it",
                                                  "alive": "; left alone"}.get(lo.state, "")}
            for lo in find_leftovers(root)]


# --------------------------------------------------------------------------- stats


def cache_stats(root: Path) -> dict:
    r = CacheReader(root)
    samples = tokens = loss_tokens = 0
    disk = sum(dir_bytes(shards_dir(root) / f"{k:05d}.zarr") for k in r.shard_ids)
    raw = 0
    bins = 20000  # histogram of per-row top-K mass: p5 without holding every row
    hist_all = np.zeros(bins, dtype=np.int64)
    hist_loss = np.zeros(bins, dtype=np.int64)
    sum_all = sum_loss = 0.0
    n_all = n_loss = 0
    for k, sh in r.shards.items():
        info = sh.info
        samples += info["samples"]
        tokens += info["tokens"]
        loss_tokens += info["loss_tokens"]
        raw += info.get("raw_bytes", 0)
        T = info["tokens"]
        step = 1 << 16
        lm = np.asarray(sh.array("loss_mask")[...]).astype(bool)
        # row t teaches x_{t+1}: it matters when x_{t+1} is a loss token of the same sample
        nxt = np.zeros(T, dtype=bool)
        nxt[:-1] = lm[1:]
        ends = sh.offsets[1:] - 1
        nxt[ends[ends >= 0]] = False
        for s in range(0, T, step):
            lp = np.asarray(sh.array("topk_logprobs")[s:s + step]).astype(np.float32)
            mass = np.exp(lp).sum(-1)
            idx = np.clip((mass * bins).astype(np.int64), 0, bins - 1)
            hist_all += np.bincount(idx, minlength=bins)
            sum_all += float(mass.sum())
            n_all += mass.size
            m = nxt[s:s + step]
            hist_loss += np.bincount(idx[m], minlength=bins)
            sum_loss += float(mass[m].sum())
            n_loss += int(m.sum())
    counts = r.token_counts()
    order = np.sort(counts)[::-1]
    total = int(counts.sum())
    cum = np.cumsum(order)

    def p5(h: np.ndarray, n: int) -> Optional[float]:
        if n == 0:
            return None
        i = int(np.searchsorted(np.cumsum(h), 0.05 * n))
        return round((i + 0.5) / bins, 5)

    coverage = {str(n): (round(float(cum[min(n, len(cum)) - 1]) / total, 6) if total else None) for n in COVERAGE_N}
    return {
        "cache": str(root), "shards": len(r.shard_ids), "samples": samples, "tokens": tokens,
        "loss_tokens": loss_tokens, "bytes": disk, "raw_bytes": raw,
        "bytes_per_token": round(disk / tokens, 2) if tokens else None,
        "raw_bytes_per_token": round(raw / tokens, 2) if tokens else None,
        "compression_ratio": round(raw / disk, 3) if disk else None,
        "topk": r.topk, "layers": r.layers, "hidden_size": r.hidden_size, "vocab_size": r.vocab_size,
        "hidden_dtype": r.hidden_dtype,
        "topk_mass_mean": round(sum_all / n_all, 5) if n_all else None,
        "topk_mass_p5": p5(hist_all, n_all),
        "topk_mass_mean_loss": round(sum_loss / n_loss, 5) if n_loss else None,
        "topk_mass_p5_loss": p5(hist_loss, n_loss),
        "distinct_loss_tokens": int((counts > 0).sum()),
        "coverage": coverage,
    }


# --------------------------------------------------------------------------- inspect


def inspect_sample(root: Path, sample: int, positions: int = 5) -> dict:
    from transformers import AutoTokenizer

    from schemas.target import native_models

    r = CacheReader(root)
    hit = [i for i, ref in enumerate(r.refs) if ref.sample_index == sample]
    if not hit:
        idx = [ref.sample_index for ref in r.refs]
        raise CacheError(f"sample {sample} is not in {root} (sample_index {min(idx)}..{max(idx)}, "
                         f"{len(idx)} samples in committed shards)")
    ref = r.refs[hit[0]]
    d = r.sample(hit[0])
    native_models(r.target_dir(), trust_remote_code=False)  # a `minicpm` config.json needs the native classes
    tok = AutoTokenizer.from_pretrained(str(r.target_dir()))
    ids = d["input_ids"].astype(np.int64)
    mask = d["loss_mask"].astype(bool)
    pieces = [tok.decode([int(t)]) for t in ids]
    text, inside = [], False
    for p, m in zip(pieces, mask):
        if m and not inside:
            text.append(MASK_OPEN)
        elif not m and inside:
            text.append(MASK_CLOSE)
        inside = bool(m)
        text.append(p)
    if inside:
        text.append(MASK_CLOSE)
    from schemas.cache import bits_to_bf16

    hid = bits_to_bf16(d["hidden"]).float().numpy()  # [T, 3, H]
    layers = []
    for j, lid in enumerate(r.layers):
        h = hid[:, j, :]
        norms = np.linalg.norm(h, axis=-1)
        layers.append({"layer": lid, "norm_mean": round(float(norms.mean()), 4),
                       "norm_min": round(float(norms.min()), 4), "norm_max": round(float(norms.max()), 4),
                       "min": round(float(h.min()), 4), "max": round(float(h.max()), 4)})
    T = len(ids)
    cand = np.flatnonzero(mask[1:]) if mask[1:].any() else np.arange(max(T - 1, 0))
    pick = sorted(set(cand[np.linspace(0, len(cand) - 1, min(positions, len(cand))).astype(int)].tolist())) \
        if len(cand) else []
    top = []
    n5 = min(5, r.topk)
    for t in pick:
        ids_t, lps_t = d["topk_ids"][t][:n5], d["topk_logprobs"][t][:n5].astype(np.float32)
        top.append({"position": int(t), "token": pieces[t],
                    "next": pieces[t + 1] if t + 1 < T else None,
                    "candidates": [{"id": int(i), "token": tok.decode([int(i)]), "prob": round(float(np.exp(lp)), 4)}
                                   for i, lp in zip(ids_t, lps_t)]})
    return {"sample_index": sample, "shard": ref.shard, "local": ref.local, "tokens": T,
            "loss_tokens": int(mask.sum()), "text": "".join(text), "layers": layers, "topk": top}


# --------------------------------------------------------------------------- CLI


def _print_json(obj: Any) -> None:
    out.print(json.dumps(obj, indent=1, ensure_ascii=False), highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    from rich.table import Table

    register_user_error(CacheError)
    shards = typer.Typer(help="Inspect, verify and summarise a feature cache.", no_args_is_help=True)
    CACHE = typer.Argument(..., help="cache directory (extract.cache)")
    JSON = typer.Option(False, "--json", help="machine-readable output")

    @shards.command("ls")
    @user_errors
    def ls(cache: Path = CACHE, as_json: bool = JSON) -> None:
        """One row per shard: samples, tokens, loss tokens, bytes on disk, compression ratio, status."""
        _load_meta(cache)
        rows = list_shards(cache)
        for r in rows:
            if r["status"].startswith("refused"):
                console.print(f"warning: shards/{r['name']}: {r['status']}: not read (readers refuse this cache; "
                              "EAGLE3_FOLLOW_SYMLINKS=1 follows such links)", highlight=False, markup=False,
                              soft_wrap=True)
        if as_json:
            _print_json(rows)
            return
        t = Table(title=str(cache), expand=False)
        for c in ("shard", "samples", "tokens", "loss tokens", "on disk", "ratio", "status"):
            t.add_column(c, justify="left" if c == "status" else "right", overflow="fold",
                         no_wrap=c == "status")
        for r in rows:
            t.add_row(r["name"], *(("-" if r[k] is None else f"{r[k]:,}") for k in ("samples", "tokens", "loss_tokens")),
                      _fmt_bytes(r["disk_bytes"]), "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["status"])
        out.print(t)
        committed = [r for r in rows if r["status"] == "committed"]
        out.print(f"{len(committed)} committed shards, {sum(r['samples'] for r in committed):,} samples, "
                  f"{sum(r['tokens'] for r in committed):,} tokens, "
                  f"{_fmt_bytes(sum(r['disk_bytes'] for r in committed))}", highlight=False)

    @shards.command("verify")
    @user_errors
    def verify(cache: Path = CACHE, as_json: bool = JSON) -> None:
        """Re-read every committed shard: schema, dtypes, shapes, decoding, checksums. Exit 1 on any problem."""
        res = verify_cache(cache)
        if as_json:
            _print_json(res)
        else:
            for note in res["notes"]:
                console.print(f"note: {note}", highlight=False, markup=False)
            for lo in res["leftovers"]:
                console.print(f"leftover {lo['text']}", highlight=False, markup=False, soft_wrap=True)
            for name, problems in res["bad"].items():
                for p in problems:
                    console.print(f"BAD {name}: {p}", highlight=False, markup=False)
            for p in res["inconsistent"]:
                console.print(f"INCONSISTENT {p}", highlight=False, markup=False, soft_wrap=True)
            left = sum(lo["bytes"] for lo in res["leftovers"])
            out.print(f"{res['checked']} shards checked, {len(res['bad'])} bad"
                      + (f": {', '.join(res['bad'])}" if res["bad"] else "")
                      + (f"; {len(res['inconsistent'])} consistency problems (readers refuse this cache)"
                         if res["inconsistent"] else "")
                      + (f"; {len(res['leftovers'])} leftovers ({_fmt_bytes(left)})" if res["leftovers"] else ""),
                      highlight=False, markup=False)
        if not res["ok"]:
            sys.exit(1)

    @shards.command("stats")
    @user_errors
    def stats(cache: Path = CACHE, as_json: bool = JSON) -> None:
        """Totals, bytes per token, top-K probability mass (mean, p5), draft-vocab coverage."""
        s = cache_stats(cache)
        if as_json:
            _print_json(s)
            return
        out.print(f"{s['shards']} shards, {s['samples']:,} samples, {s['tokens']:,} tokens "
                  f"({s['loss_tokens']:,} loss tokens)", highlight=False)
        out.print(f"on disk {_fmt_bytes(s['bytes'])} = {s['bytes_per_token']} B/token "
                  f"(raw {s['raw_bytes_per_token']} B/token, ratio {s['compression_ratio']}x); hidden states "
                  f"{s['hidden_dtype']}" + (" (one fp16 scale per token per layer)" if s["hidden_dtype"] != "bfloat16"
                                            else ""), highlight=False)
        out.print(f"top-{s['topk']} probability mass: mean {s['topk_mass_mean']}, p5 {s['topk_mass_p5']} "
                  f"(rows teaching a loss token: mean {s['topk_mass_mean_loss']}, p5 {s['topk_mass_p5_loss']})",
                  highlight=False)
        cov = ", ".join(f"N={int(n) // 1024}k: {v:.4f}" for n, v in s["coverage"].items() if v is not None)
        out.print(f"loss tokens covered by the N most frequent ({s['distinct_loss_tokens']:,} distinct): {cov}",
                  highlight=False)

    @shards.command("inspect")
    @user_errors
    def inspect(cache: Path = CACHE, sample: int = typer.Argument(..., help="sample_index (row of the input data)"),
                as_json: bool = JSON) -> None:
        """Decoded text (loss-masked tokens «marked»), hidden-state norms and ranges, top-5 candidates."""
        res = inspect_sample(cache, sample)
        if as_json:
            _print_json(res)
            return
        out.print(f"sample {res['sample_index']} (shard {res['shard']:05d}, #{res['local']}): {res['tokens']} tokens, "
                  f"{res['loss_tokens']} loss tokens {MASK_OPEN}marked{MASK_CLOSE}", highlight=False, markup=False)
        out.print(res["text"], highlight=False, markup=False)
        t = Table(title="hidden states")
        for c in ("layer", "norm mean", "norm min", "norm max", "min", "max"):
            t.add_column(c, justify="right")
        for L in res["layers"]:
            t.add_row(str(L["layer"]), *(f"{L[k]:.3f}" for k in ("norm_mean", "norm_min", "norm_max", "min", "max")))
        out.print(t)
        for p in res["topk"]:
            cands = "  ".join(f"{c['token']!r} {c['prob']:.3f}" for c in p["candidates"])
            out.print(f"t={p['position']:>5} {p['token']!r} -> next {p['next']!r}:  {cands}", highlight=False,
                      markup=False)

    @shards.command("index")
    @user_errors
    def index(cache: Path = CACHE, as_json: bool = JSON) -> None:
        """Rebuild manifest.parquet from the committed shards' shard.json files."""
        from schemas.dirkind import ensure_writable

        ensure_writable(cache, ("cache",), "shards index: CACHE", hint="Give an eagle3 cache directory.")
        _load_meta(cache)
        path = build_manifest(cache)
        import pyarrow.parquet as pq

        n = pq.read_metadata(path).num_rows
        if as_json:
            _print_json({"manifest": str(path), "shards": n})
        else:
            out.print(f"{path}: {n} shards", highlight=False, markup=False)

    app.add_typer(shards, name="shards")
