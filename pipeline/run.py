"""`eagle3 run`: regenerate (optional) -> extract -> train -> eval, locally, from one config.

Every stage records a small marker under <run dir>/.pipeline/ when it finishes: the
fingerprint of the settings it ran with (chained: a stage's fingerprint includes the
one of the stage before) plus what it produced. A re-run skips a stage whose marker
matches and whose output is still there (committed shards + manifest, the finished
head, the report), so `eagle3 run` after a crash or a kill continues where it stopped:
stage 1 skips committed shards, stage 2 resumes from its last checkpoint, stage 3
runs again. A stage that finished under other settings runs again (training restarts
from scratch then, not from a checkpoint of the old settings).

The run dir is the parent of `extract.cache` (runs/NAME for the shipped configs).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from schemas.cache import CACHE_JSON, MANIFEST, committed_shards, dir_bytes
from schemas.config import RunConfig
from stage2_train.start import resolve_start

STAGES = ("regenerate", "extract", "train", "eval")


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.extract.cache).parent


def regenerated_path(cfg: RunConfig) -> Path:
    from stage1_extract.regenerate import default_output

    return default_output(cfg)


def effective_config(cfg: RunConfig) -> RunConfig:
    """The config later stages see: with regeneration on, its output replaces data.train."""
    if not cfg.data.regenerate.enabled:
        return cfg
    data = cfg.data.model_copy(update={"train": [str(regenerated_path(cfg))]})
    return cfg.model_copy(update={"data": data})


def answered_config(cfg: RunConfig, config_name: str) -> RunConfig:
    """`eagle3 extract` by hand after `eagle3 regenerate`: effective_config, once the regenerated JSONL
    holds an answer for every prompt (a partial file would silently cache part of the data)."""
    from stage1_extract.regenerate import RegenerateError, pending

    if not cfg.data.regenerate.enabled:
        return cfg
    out, total, todo = pending(cfg)
    if todo:
        raise RegenerateError(
            f"data.regenerate.enabled: data.train holds prompts the target answers first, and {out} has "
            f"no answer for {todo} of its {total} conversations; run `eagle3 regenerate {config_name}` "
            f"first (resumable), or `eagle3 run {config_name}`, which does both")
    return effective_config(cfg)


# --------------------------------------------------------------------------- fingerprints


HASH_LIMIT = 256 << 20


def _files_sig(paths: list[str]) -> list:
    """Content hash of each data file; size + mtime above HASH_LIMIT (hashing a multi-GB data
    set on every run would cost minutes). Dataset directories: size + mtime of their files."""
    from schemas.cache import file_sha256

    out = []
    for p in paths:
        q = Path(p)
        if q.is_file():
            st = q.stat()
            out.append([str(q), st.st_size, file_sha256(q) if st.st_size <= HASH_LIMIT else st.st_mtime_ns])
        elif q.is_dir():
            out.append([str(q), sorted([str(f.relative_to(q)), f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in q.rglob("*") if f.is_file())])
        else:
            out.append([str(q), None, None])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# train.* fields added after heads were trained without them, with the value that is what those heads
# did: at that value they stay out of the fingerprint, so a finished head is not retrained after an upgrade
# (the *_init defaults became auto later; resolved, auto is random on a cache without the target's layer).
TRAIN_FIELDS_ADDED = {"lm_head_init": "random", "layer_init": "random"}


def fingerprint(cfg: RunConfig, stage: str) -> str:
    """What a stage's result depends on (performance knobs such as batch sizes are left out)."""
    c = cfg.model_dump(mode="json")
    t = {k: c["target"][k] for k in ("path", "gguf_file", "dtype")}
    if stage == "regenerate":
        return _digest([t, c["data"]["train"], c["data"]["max_samples"], c["data"]["max_length"],
                        {k: v for k, v in c["data"]["regenerate"].items() if k not in ("batch_size", "engine")}])
    if stage == "extract":
        e = cfg_eff = effective_config(cfg)
        d = cfg_eff.data.model_dump(mode="json")
        ex = {k: c["extract"][k] for k in ("cache", "eval_cache", "layers", "topk", "samples_per_shard",
                                             "shard_tokens", "compressor", "chunk_rows")}
        data = {k: d[k] for k in ("train", "eval", "max_length", "truncation", "on_error", "max_samples")}
        files = _files_sig(list(e.data.train) + list(e.data.eval))
        up = fingerprint(cfg, "regenerate") if cfg.data.regenerate.enabled else None
        return _digest([t, data, ex, files, up])
    if stage == "train":
        # auto resolved against the cache: the start a head gets, not the word for it
        c = resolve_start(cfg).model_dump(mode="json")
        tr = {k: v for k, v in c["train"].items() if k not in ("log_every", "num_workers", "report_to",
                                                               "wandb_project")
              and not (k in TRAIN_FIELDS_ADDED and v == TRAIN_FIELDS_ADDED[k])}
        return _digest([fingerprint(cfg, "extract"), tr])
    if stage == "eval":
        ev = c["eval"]
        return _digest([fingerprint(cfg, "train"), ev, cfg.heads, _files_sig(list(cfg.eval.prompts))])
    raise ValueError(f"unknown stage {stage}")


def _marker_path(cfg: RunConfig, stage: str, output: Path) -> Path:
    key = hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:8]
    return run_dir(cfg) / ".pipeline" / f"{stage}-{key}.json"


def read_marker(cfg: RunConfig, stage: str, output: Path) -> Optional[dict]:
    p = _marker_path(cfg, stage, output)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(cfg: RunConfig, stage: str, output: Path, **info) -> None:
    p = _marker_path(cfg, stage, output)
    p.parent.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "fingerprint": fingerprint(cfg, stage), "output": str(output),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, p)


# --------------------------------------------------------------------------- outputs and "done" tests


def cache_complete(cache: str | Path) -> bool:
    """cache.json + every shard committed: stage 1's last worker writes the manifest only then."""
    c = Path(cache)
    return (c / CACHE_JSON).is_file() and (c / MANIFEST).is_file() and bool(committed_shards(c))


def head_finished(head: str | Path) -> bool:
    """Stage 2 writes <head>/last/ (and the final training block) only at the end of training."""
    h = Path(head)
    if not ((h / "last" / "config.json").is_file() and (h / "model.safetensors").is_file()
            and (h / "config.json").is_file()):
        return False
    try:
        return "final_step" in json.loads((h / "config.json").read_text()).get("training", {})
    except (OSError, json.JSONDecodeError):
        return False


def report_path(cfg: RunConfig) -> Path:
    return (Path(cfg.eval.output) if cfg.eval.output else Path(cfg.heads[0]) / "eval") / "report.json"


def stage_output(cfg: RunConfig, stage: str) -> Path:
    return {"regenerate": lambda: regenerated_path(cfg), "extract": lambda: Path(cfg.extract.cache),
            "train": lambda: Path(cfg.train.output), "eval": lambda: report_path(cfg)}[stage]()


def stage_done(cfg: RunConfig, stage: str) -> bool:
    out = stage_output(cfg, stage)
    m = read_marker(cfg, stage, out)
    if m is None or m.get("fingerprint") != fingerprint(cfg, stage):
        return False
    if stage == "regenerate":
        return out.is_file()
    if stage == "extract":
        e = effective_config(cfg)
        return cache_complete(e.extract.cache) and (not e.data.eval or cache_complete(e.eval_cache))
    if stage == "train":
        return head_finished(out)
    return out.is_file()


# --------------------------------------------------------------------------- the stages


def do_regenerate(cfg: RunConfig, progress: bool) -> dict:
    from stage1_extract.regenerate import run_regenerate

    out = run_regenerate(cfg, progress=progress)
    n = sum(1 for line in out.open() if line.strip())
    return {"conversations": n, "path": str(out)}


def do_extract(cfg: RunConfig, progress: bool, worker=None, log: Callable[[str], None] = print,
               target: Optional[tuple] = None) -> dict:
    """Both splits with one load of the target (straight to its device); it is freed on return,
    before stage 2 needs the device."""
    from stage1_extract.extract import run_extract, worker_target_config
    from stage1_extract.workers import resolve_worker

    e = effective_config(cfg)
    info: dict[str, Any] = {}
    if target is None:
        from schemas.target import load_target

        target = load_target(worker_target_config(e.target, resolve_worker(worker)))
    for which in ("train", "eval") if e.data.eval else ("train",):
        rep: dict = {}
        root = run_extract(e, worker=worker, which=which, progress=progress, report=rep, target=target)
        info["cache" if which == "train" else "eval_cache"] = str(root)
        if rep:
            log(f"[extract] {which} worker {rep.get('worker')}: {rep.get('shards_written')} shards written, "
                f"{rep.get('shards_skipped')} already committed, {rep.get('samples')} samples, "
                f"{rep.get('tokens')} tokens in {rep.get('wall_s', 0):.1f}s -> {root}")
    return info


def _free_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def do_train(cfg: RunConfig, progress: bool, restart: bool = False) -> dict:
    from stage2_train.trainer import run_train

    return {"head": str(run_train(effective_config(cfg), restart=restart, progress=progress))}


def do_eval(cfg: RunConfig, progress: bool) -> dict:
    from stage3_eval.evaluate import run_eval

    rep = run_eval(effective_config(cfg), progress=progress)
    return {"report": str(report_path(cfg)), "files": rep.get("files", {})}


@dataclass
class StageRecord:
    stage: str
    status: str          # ran | skipped | disabled
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def run_stage(cfg: RunConfig, stage: str, progress: bool = True, *, log: Callable[[str], None] = print,
              force: bool = False) -> StageRecord:
    """Run one stage unless its marker says it is done; record the marker when it finishes."""
    out = stage_output(cfg, stage)
    if stage == "regenerate" and not cfg.data.regenerate.enabled:
        return StageRecord(stage, "disabled")
    if not force and stage_done(cfg, stage):
        m = read_marker(cfg, stage, out) or {}
        log(f"[{stage}] already done ({out}); skipping")
        return StageRecord(stage, "skipped", 0.0, {"previous_seconds": m.get("seconds")})
    log(f"[{stage}] -> {out}")
    t0 = time.perf_counter()
    if stage == "regenerate":
        info = do_regenerate(cfg, progress)
    elif stage == "extract":
        info = do_extract(cfg, progress, log=log)
        _free_device_memory()  # the target is gone before stage 2 takes the device
    elif stage == "train":
        prev = read_marker(cfg, stage, out)
        # Finished before under other settings: the old checkpoints must not be resumed.
        restart = prev is not None and prev.get("fingerprint") != fingerprint(cfg, stage) and head_finished(out)
        if restart:
            log(f"[train] {out} was trained with other settings: training again from scratch")
        info = do_train(cfg, progress, restart=restart)
    else:
        info = do_eval(cfg, progress)
    dt = time.perf_counter() - t0
    write_marker(cfg, stage, out, seconds=round(dt, 3), **{k: v for k, v in info.items() if k != "files"})
    return StageRecord(stage, "ran", dt, info)


def run_pipeline(cfg: RunConfig, *, progress: bool = True, stages: Optional[list[str]] = None,
                 log: Callable[[str], None] = print) -> dict:
    """All stages in order (each skipped when already done); returns the summary dict, also
    written to <run dir>/pipeline.json."""
    wanted = list(stages or STAGES)
    bad = [s for s in wanted if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    if "eval" in wanted and not cfg.eval.prompts:
        log("[eval] eval.prompts is empty: stage 3 is skipped")
        wanted.remove("eval")
    records = []
    t0 = time.perf_counter()
    for s in STAGES:
        if s in wanted:
            records.append(run_stage(cfg, s, progress, log=log))
    summary = summarize(cfg, records, time.perf_counter() - t0)
    p = run_dir(cfg) / "pipeline.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# --------------------------------------------------------------------------- summary


def cache_summary(cache: str | Path) -> Optional[dict]:
    c = Path(cache)
    if not (c / CACHE_JSON).is_file():
        return None
    shards = committed_shards(c)
    samples = tokens = loss_tokens = raw = 0
    for k in shards:
        info = json.loads((c / "shards" / f"{k:05d}.zarr" / "shard.json").read_text())
        samples += int(info.get("samples", 0))
        tokens += int(info.get("tokens", 0))
        loss_tokens += int(info.get("loss_tokens", 0))
        raw += int(info.get("raw_bytes", 0))
    # Per-token figures count the shards only: target/ (the embedding matrix) is a
    # fixed cost that would swamp them on a small cache.
    shard_disk = sum(dir_bytes(c / "shards" / f"{k:05d}.zarr") for k in shards)
    return {"path": str(c), "shards": len(shards), "samples": samples, "tokens": tokens,
            "loss_tokens": loss_tokens, "disk_bytes": dir_bytes(c), "shard_bytes": shard_disk, "raw_bytes": raw,
            "bytes_per_token": shard_disk / tokens if tokens else None,
            "compression": raw / shard_disk if shard_disk else None}


def summarize(cfg: RunConfig, records: list[StageRecord], wall: float) -> dict:
    e = effective_config(cfg)
    out: dict[str, Any] = {
        "name": cfg.name, "run_dir": str(run_dir(cfg)), "wall_s": wall,
        "stages": [{"stage": r.stage, "status": r.status, "seconds": r.seconds, **r.info} for r in records],
        "cache": cache_summary(e.extract.cache),
        "eval_cache": cache_summary(e.eval_cache) if e.data.eval else None,
        "report": None,
    }
    rp = report_path(cfg)
    if rp.is_file():
        out["report"] = json.loads(rp.read_text())
    head_cfg = Path(cfg.train.output) / "config.json"
    if head_cfg.is_file():
        out["head_training"] = json.loads(head_cfg.read_text()).get("training")
    return out


def _mb(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 1e6:,.1f} MB"


def format_summary(summary: dict) -> str:
    """The final text: stage times, the cache, the head's per-position table, τ / speed-up / lossless."""
    lines = [f"# eagle3 run '{summary['name']}' ({summary['run_dir']}), {summary['wall_s']:.1f} s", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    for s in summary["stages"]:
        sec = f"{s['seconds']:.1f}" if s["status"] == "ran" else "–"
        lines.append(f"| {s['stage']} | {s['status']} | {sec} |")
    for key, title in (("cache", "cache"), ("eval_cache", "eval cache")):
        c = summary.get(key)
        if c:
            bpt = f"{c['bytes_per_token']:,.0f}" if c["bytes_per_token"] else "–"
            comp = f"{c['compression']:.2f}×" if c["compression"] else "–"
            lines += ["", f"{title}: {c['path']}: {c['shards']} shards, {c['samples']} samples, "
                          f"{c['tokens']:,} tokens ({c['loss_tokens']:,} loss-masked), {_mb(c['disk_bytes'])} on disk "
                          f"(shards {_mb(c['shard_bytes'])}: {bpt} B/token, {comp} smaller than raw; "
                          f"the rest is target/, mostly the embedding)"]
    rep = summary.get("report")
    if rep:
        from stage3_eval.report import markdown

        lines += ["", markdown(rep).rstrip()]
        lines.append("")
        for h in rep.get("heads", []):
            for m in h.get("methods", []):
                tau, sp, ll = m.get("tau"), m.get("speedup"), m.get("lossless")
                lines.append(f"{h.get('name', h.get('head'))} {m['method']}: τ = "
                             f"{'–' if tau is None else f'{tau:.3f}'}, speed-up = "
                             f"{'–' if sp is None else f'{sp:.2f}×'}, lossless = "
                             f"{ {True: 'yes', False: 'NO', None: 'n/a'}[ll] }")
    elif summary.get("head_training"):
        lines += ["", "head training block: " + json.dumps(summary["head_training"])[:2000]]
    return "\n".join(lines) + "\n"
