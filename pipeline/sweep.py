"""`eagle3 sweep CONFIG`: many heads from one cache.

`sweep.grid` maps dotted train.* keys to lists of values; every point of the grid
(the cartesian product) trains one head from the same cache into
<sweep dir>/<point name>/ (sweep dir = sweep.output or <train.output>-sweep), and
with `sweep.eval: true` runs stage 3 on it too. Locally the points run in sequence
(each skipped when already finished); `--executor slurm` submits them as one job
array after the extraction jobs. The comparison table (simulated τ greedy and at T = 1,
and acc_0, on the held-out split, measured τ / speed-up when evaluated, training time) marks the best
head and is written as sweep.json + sweep.md in the sweep dir.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from schemas.config import ConfigError, RunConfig, TrainConfig, load_config

from pipeline.run import effective_config, head_finished, read_marker, run_stage

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"


def sweep_dir(cfg: RunConfig) -> Path:
    return Path(cfg.sweep.output) if cfg.sweep.output else Path(cfg.train.output.rstrip("/") + "-sweep")


def claim_sweep_dir(cfg: RunConfig, *, write: bool = True) -> Path:
    """The sweep dir, checked (new, empty or an earlier sweep: schemas.dirkind) and marked as a sweep."""
    from schemas.dirkind import ensure_writable, mark

    d = sweep_dir(cfg)
    ensure_writable(d, ("missing", "empty", "sweep"), "sweep.output" if cfg.sweep.output else
                    "the sweep directory (<train.output>-sweep)",
                    hint="Set sweep.output to a new or empty directory (or an earlier sweep's to continue it).")
    if write:
        mark(d, "sweep", "eagle3 sweep")
    return d


def _slug(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_") or "x"


def grid_points(cfg: RunConfig) -> list[dict[str, Any]]:
    """The grid's points in order ({dotted key: value}); keys must name train.* fields."""
    grid = cfg.sweep.grid
    if not grid:
        raise ConfigError("sweep.grid is empty: give e.g. {train.draft_vocab_size: [8000, 16000]}")
    for key, vals in grid.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] != "train" or parts[1] not in TrainConfig.model_fields:
            raise ConfigError(f"sweep.grid key '{key}': must be train.<field> "
                              f"(fields: {', '.join(k for k in TrainConfig.model_fields if k not in ('output', 'cache'))})")
        if parts[1] in ("output", "cache", "eval_cache"):
            raise ConfigError(f"sweep.grid key '{key}': every head of a sweep reads the same cache and "
                              f"gets its own output dir; sweep train.* settings of the head instead")
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep.grid key '{key}': needs a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k.split('.', 1)[1]}-{_slug(v)}" for k, v in point.items())


def point_config(cfg: RunConfig, point: dict[str, Any]) -> RunConfig:
    """cfg with the point's train.* values, train.output = <sweep dir>/<name>, eval output beside it."""
    head = sweep_dir(cfg) / point_name(point)
    raw = cfg.model_dump(mode="json")
    for k, v in point.items():
        raw["train"][k.split(".", 1)[1]] = v
    raw["train"]["output"] = str(head)
    raw["train"]["cache"] = cfg.train_cache
    raw["eval"]["head"] = str(head)
    raw["eval"]["output"] = str(head / "eval")
    raw["sweep"] = {"grid": {}, "eval": False, "output": None}
    return load_config(raw=raw)


# --------------------------------------------------------------------------- one point


def run_point(cfg: RunConfig, point: dict[str, Any], *, evaluate: bool, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Train (and evaluate) one head; skipped when already done. Returns its row of the table."""
    pc = point_config(cfg, point)
    tr = run_stage(pc, "train", progress, log=log)
    if evaluate and pc.eval.prompts:
        run_stage(pc, "eval", progress, log=log)
    return point_row(cfg, point)


def point_row(cfg: RunConfig, point: dict[str, Any]) -> dict:
    """Metrics of one finished point: held-out offline metrics, measured τ when evaluated."""
    pc = point_config(cfg, point)
    head = Path(pc.train.output)
    row: dict[str, Any] = {"name": point_name(point), "head": str(head), **point, "finished": head_finished(head)}
    m = read_marker(pc, "train", head) or {}
    row["train_seconds"] = m.get("seconds")
    if not row["finished"]:
        return row
    from stage2_train.evaluate import offline_metrics

    off = offline_metrics(str(head), effective_config(pc).train_cache, split="val", cfg=effective_config(pc))
    row["simulated_tau"] = off["simulated_tau"]
    row["acc"] = off["acc"]
    row["acc_0"] = off["acc"][0] if off["acc"] else None
    row["alpha"] = off.get("alpha")  # expected acceptance at T = 1 per position (issue 24)
    row["alpha_hi"] = off.get("alpha_hi")
    row["simulated_tau_t1"] = off.get("simulated_tau_t1")
    rp = head / "eval" / "report.json"
    if rp.is_file():
        rep = json.loads(rp.read_text())
        for mth in rep["heads"][0]["methods"]:
            T = mth.get("temperature") or 0  # eval.temperatures: one row per temperature; T > 0 gets a suffix
            key = mth["method"] + (f"_T{T:g}" if T else "")
            row[f"tau_{key}"] = mth["tau"]
            row[f"speedup_{key}"] = mth["speedup"]
            row[f"lossless_{key}"] = mth["lossless"]
    return row


# --------------------------------------------------------------------------- the table


def build_table(cfg: RunConfig, rows: list[dict], **extra) -> dict:
    """sweep.json + sweep.md; the best head by measured τ when evaluated, else by simulated τ."""
    measured = sorted({k for r in rows for k in r if k.startswith("tau_")})

    def score(r: dict) -> float:
        vals = [r[k] for k in measured if r.get(k) is not None]
        if vals:
            return max(vals)
        return r.get("simulated_tau") if r.get("simulated_tau") is not None else float("-inf")

    best = max((r for r in rows if r.get("finished")), key=score, default=None)
    by = "measured τ" if measured and best and any(best.get(k) is not None for k in measured) else "simulated τ"
    for r in rows:
        r["best"] = best is not None and r["name"] == best["name"]
    keys = list(cfg.sweep.grid)
    lines = [f"# Sweep over {', '.join(keys)} ({len(rows)} heads, one cache: {cfg.train_cache})", "",
             "| " + " | ".join(["best", *[k.split('.', 1)[1] for k in keys], "acc_0", "simulated τ",
                               "simulated τ (T=1)", *[f"measured τ ({k[4:]})" for k in measured], "train s",
                               "head"]) + " |",
             "|" + "---|" * (len(keys) + 6 + len(measured))]

    def f(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    for r in rows:
        lines.append("| " + " | ".join(["**★**" if r["best"] else "", *[str(r.get(k)) for k in keys],
                                        f(r.get("acc_0"), "{:.4f}"), f(r.get("simulated_tau")),
                                        f(r.get("simulated_tau_t1")),
                                        *[f(r.get(k)) for k in measured], f(r.get("train_seconds"), "{:.1f}"),
                                        r["head"] + ("" if r.get("finished") else " (not finished)")]) + " |")
    lines += ["", f"best: {best['name'] if best else '–'} (by {by})"]
    for k, v in extra.items():
        lines.append(f"{k}: {v}")
    table = {"grid": cfg.sweep.grid, "cache": cfg.train_cache, "best": best["name"] if best else None,
             "best_by": by, "rows": rows, **extra}
    d = sweep_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    (d / SWEEP_JSON).write_text(json.dumps(table, indent=2, default=str) + "\n")
    md = "\n".join(lines) + "\n"
    (d / SWEEP_MD).write_text(md)
    table["markdown"] = md
    return table


def run_sweep(cfg: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Locally: the cache (regenerate + extract, skipped when done), then every point in sequence."""
    points = grid_points(cfg)
    claim_sweep_dir(cfg)
    t0 = time.perf_counter()
    pre = [run_stage(cfg, s, progress, log=log) for s in ("regenerate", "extract")]
    extract_s = next((r.seconds if r.status == "ran" else (r.info.get("previous_seconds"))
                      for r in pre if r.stage == "extract"), None)
    rows = []
    for i, p in enumerate(points):
        log(f"[sweep] point {i + 1}/{len(points)}: {point_name(p)}")
        rows.append(run_point(cfg, p, evaluate=cfg.sweep.eval, progress=progress, log=log))
    return build_table(cfg, rows, extract_seconds=extract_s, wall_seconds=round(time.perf_counter() - t0, 3))


# --------------------------------------------------------------------------- Slurm


def sweep_point_task(config_file: str, cwd: str, index: int) -> str:
    import os

    os.chdir(cwd)
    cfg = load_config(config_file)
    run_point(cfg, grid_points(cfg)[index], evaluate=cfg.sweep.eval, progress=False)
    return "ran"


def sweep_table_task(config_file: str, cwd: str) -> str:
    import os

    os.chdir(cwd)
    cfg = load_config(config_file)
    m = read_marker(cfg, "extract", Path(cfg.extract.cache)) or {}
    build_table(cfg, [point_row(cfg, p) for p in grid_points(cfg)], extract_seconds=m.get("seconds"))
    return "ran"


def submit_sweep(cfg: RunConfig, *, executor: str = "slurm", dry_run: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Extraction jobs (when the cache is not complete), one array over the grid (afterok), a table job (afterany)."""
    from pipeline.run import stage_done
    from pipeline.submit import (JobSpec, freeze_config, jobs_dir, plan, slurm_params, submit_specs)

    points = grid_points(cfg)
    claim_sweep_dir(cfg, write=not dry_run)
    jdir = (jobs_dir(cfg) / "sweep").resolve()
    cwd = str(Path.cwd())
    cfg_file = str(jdir / "config.yaml")
    specs = [s for s in plan(cfg, cfg_file, cwd) if s.stage in ("regenerate", "extract")]
    if stage_done(cfg, "extract"):
        specs = []
    n, g = cfg.jobs.train.nodes, cfg.jobs.train.gpus_per_node
    params = slurm_params(cfg, "sweep", gpus=0 if g == 0 else min(g, 1))
    after = "extract" if specs else None
    specs.append(JobSpec("sweep", sweep_point_task, [(cfg_file, cwd, i) for i in range(len(points))], params,
                         after=after, describe=f"pipeline.sweep.sweep_point_task: {len(points)} heads "
                                               f"({'train + eval' if cfg.sweep.eval else 'train'}), one per array task"))
    specs.append(JobSpec("sweep-table", sweep_table_task, [(cfg_file, cwd)], slurm_params(cfg, "sweep-table", gpus=0),
                         after="sweep", dep_type="afterany", describe="pipeline.sweep.sweep_table_task: the table"))
    if not dry_run:
        freeze_config(cfg, jdir)
    meta = {"name": cfg.name, "config": cfg_file, "cwd": cwd, "sweep": True,
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return submit_specs(specs, jdir, executor, dry_run=dry_run, log=log, meta=meta)
