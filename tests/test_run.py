"""`eagle3 run`: all stages on a tiny random target; re-runs skip done work; a killed run continues."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict:
    """os.environ without the rendezvous variables an in-process training run left behind."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def tiny_raw(d: Path, target: Path, *, samples: int = 24, per_shard: int = 8) -> dict:
    """A whole-pipeline config on the tiny llama target; every path under d."""
    from tiny import sharegpt_rows, write_jsonl

    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "train.jsonl", sharegpt_rows(samples, turns=1))  # same content every time
    write_jsonl(d / "prompts.jsonl", [{"prompt": "what is the capital of france"},
                                      {"prompt": "write a poem about the sea"}])
    return {
        "name": "tiny", "target": {"path": str(target)},
        "data": {"train": [str(d / "train.jsonl")], "max_length": 96},
        "extract": {"cache": str(d / "run" / "cache"), "samples_per_shard": per_shard, "topk": 8},
        "train": {"output": str(d / "run" / "head"), "draft_vocab_size": 64, "ttt_length": 2, "epochs": 1,
                  "save_every": 2, "eval_every": 100, "val_fraction": 0.25, "max_tokens_per_batch": 512,
                  "deepspeed": str(ROOT / "configs" / "deepspeed" / "cpu_fp32.json")},
        "eval": {"prompts": [str(d / "prompts.jsonl")], "max_new_tokens": 12, "method": "chain",
                 "draft_tokens": 3, "warmup": 0},
    }


def write_config(d: Path, raw: dict) -> Path:
    p = d / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def shard_checksums(cache: Path) -> dict:
    return {p.name: json.loads((p / "shard.json").read_text())["checksums"]
            for p in sorted((cache / "shards").glob("*.zarr"))}


def head_tensors(head: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(head / "model.safetensors"))


def mtimes(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def report_numbers(rep: dict) -> dict:
    h = rep["heads"][0]
    m = h["methods"][0]
    return {"tau": m["tau"], "new_tokens": m["new_tokens"], "passes": m["target_forward_passes"],
            "lossless": m["lossless"], "sim_tau": h["offline"]["simulated_tau"],
            **{f"acc_{k}": a for k, a in enumerate(h["offline"]["acc"])}}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama_dir):
    """One uninterrupted pipeline run: the results every other run must reproduce."""
    pytest.importorskip("stage1_extract.extract")
    pytest.importorskip("stage2_train.trainer")
    pytest.importorskip("stage3_eval.evaluate")
    from pipeline.run import run_pipeline
    from schemas.config import load_config

    d = tmp_path_factory.mktemp("ref")
    cfg = load_config(raw=tiny_raw(d, tiny_llama_dir))
    summary = run_pipeline(cfg, progress=False)
    return d, cfg, summary


def test_run_produces_cache_head_report_and_second_run_does_no_stage_work(reference_run):
    from typer.testing import CliRunner

    from pipeline.cli import app

    d, cfg, summary = reference_run
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("regenerate", "disabled"), ("extract", "ran"), ("train", "ran"), ("eval", "ran")]
    cache, head = Path(cfg.extract.cache), Path(cfg.train.output)
    # 24 samples / 8 per shard = shards 0, 1, 2, all committed, manifest written.
    assert sorted(p.name for p in (cache / "shards").glob("*.zarr")) == ["00000.zarr", "00001.zarr", "00002.zarr"]
    assert (cache / "manifest.parquet").is_file()
    assert summary["cache"]["samples"] == 24 and summary["cache"]["shards"] == 3
    assert (head / "last" / "model.safetensors").is_file()
    rep = json.loads((head / "eval" / "report.json").read_text())
    assert rep["heads"][0]["methods"][0]["lossless"] is True
    assert summary["report"]["heads"][0]["methods"][0]["tau"] == rep["heads"][0]["methods"][0]["tau"]

    before = mtimes(d / "run")
    res = CliRunner().invoke(app, ["run", str(write_config(d, tiny_raw(d, Path(cfg.target.path)))), "--no-progress"])
    assert res.exit_code == 0, res.output
    # The second run touches no stage output: every stage is skipped...
    for st in ("extract", "train", "eval"):
        assert f"[{st}] already done" in res.output
    after = mtimes(d / "run")
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == [str(d / "run" / "pipeline.json")], changed
    # ...and the summary still prints the report: per-position table, τ, speed-up, lossless.
    assert "| position | acc | alpha [≤ alpha_hi] | loss |" in res.output
    assert "chain: τ = " in res.output and "speed-up = " in res.output and "lossless = yes" in res.output
    assert json.loads((d / "run" / "pipeline.json").read_text())["stages"][1]["status"] == "skipped"


def test_changed_settings_rerun_the_stage(reference_run, tmp_path):
    from pipeline.run import fingerprint, stage_done
    from schemas.config import load_config

    d, cfg, _ = reference_run
    other = load_config(raw={**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"), "lr": 1e-3}})
    assert fingerprint(other, "extract") == fingerprint(cfg, "extract")
    assert fingerprint(other, "train") != fingerprint(cfg, "train")
    assert stage_done(other, "extract") and not stage_done(other, "train") and not stage_done(other, "eval")


def test_a_train_field_added_later_keeps_finished_heads_finished(reference_run, monkeypatch):
    """A head trained before train.lm_head_init / layer_init existed did what random does: upgrading must
    not retrain it (its marker's fingerprint was computed from a train section without the fields). The
    default, auto, is random on a cache without the target's layer (such a cache is as old as such a head)
    and the target start on one with it: the fingerprint follows what auto does."""
    from pipeline.run import fingerprint, stage_done
    from schemas.cache import LAYER_FILE, TARGET_DIR
    from schemas.config import RunConfig, load_config

    d, cfg, _ = reference_run

    def with_init(layer, head):
        return load_config(raw={**cfg.model_dump(mode="json"), "train": {
            **cfg.train.model_dump(mode="json"), "layer_init": layer, "lm_head_init": head}})

    assert (cfg.train.layer_init, cfg.train.lm_head_init) == ("auto", "auto")
    scratch, start = with_init("random", "random"), with_init("target", "target")
    now = fingerprint(scratch, "train")
    dump = RunConfig.model_dump

    def before_the_fields(self, **kw):
        c = dump(self, **kw)
        c["train"].pop("lm_head_init")
        c["train"].pop("layer_init")
        return c

    monkeypatch.setattr(RunConfig, "model_dump", before_the_fields)
    assert fingerprint(scratch, "train") == now
    monkeypatch.undo()
    assert len({now, fingerprint(start, "train"), fingerprint(with_init("random", "target"), "train")}) == 3

    # the reference run trained with auto on a cache that holds the layer: the target start
    assert fingerprint(cfg, "train") == fingerprint(start, "train") and stage_done(cfg, "train")
    assert not stage_done(scratch, "train")
    layer = Path(cfg.train_cache) / TARGET_DIR / LAYER_FILE
    aside = layer.with_suffix(".aside")
    layer.rename(aside)
    try:  # a cache from before stage 1 kept the layer: auto is what an old head did
        assert fingerprint(cfg, "train") == now
    finally:
        aside.rename(layer)


# A harness that slows one stage down so the test can kill the run inside it, deterministically.
HARNESS = """
import sys, time
slow = sys.argv.pop(1)
if slow == "extract":
    import stage1_extract.writer as w
    orig = w.ShardWriter._flush
    def _flush(self, *a, **k):
        time.sleep(0.7)
        return orig(self, *a, **k)
    w.ShardWriter._flush = _flush
elif slow == "train":
    import stage2_train.trainer as t
    orig = t.ttt_forward
    def ttt_forward(*a, **k):
        time.sleep(0.4)
        return orig(*a, **k)
    t.ttt_forward = ttt_forward
from pipeline.cli import main
sys.argv = ["eagle3"] + sys.argv[1:]
main()
"""


def _run_and_kill(tmp: Path, slow: str, config: Path, until, timeout: float = 180) -> None:
    script = tmp / "harness.py"
    script.write_text(HARNESS)
    env = clean_env()
    log = open(tmp / f"killed-{slow}.log", "w")
    p = subprocess.Popen([sys.executable, str(script), slow, "run", str(config), "--no-progress"], cwd=ROOT,
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        while not until():
            if p.poll() is not None:
                raise AssertionError(f"the run ended (rc {p.returncode}) before the kill point:\n"
                                     + (tmp / f"killed-{slow}.log").read_text()[-3000:])
            if time.time() - t0 > timeout:
                raise AssertionError("kill point not reached in time")
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_run_after_kill_in_extraction_and_in_training_continues_to_the_same_results(reference_run, tmp_path):
    from pipeline.run import run_pipeline
    from schemas.cache import committed_shards
    from schemas.config import load_config

    d_ref, cfg_ref, _ = reference_run
    raw = tiny_raw(tmp_path, Path(cfg_ref.target.path))
    config = write_config(tmp_path, raw)
    cache, head = tmp_path / "run" / "cache", tmp_path / "run" / "head"

    # 1. killed after the first shard is committed, before the last one
    _run_and_kill(tmp_path, "extract", config, lambda: len(committed_shards(cache)) >= 1)
    assert 1 <= len(committed_shards(cache)) < 3 and not (cache / "manifest.parquet").exists()
    first = {k: json.loads((cache / "shards" / f"{k:05d}.zarr" / "shard.json").read_text())["checksums"]
             for k in committed_shards(cache)}

    # 2. the re-run finishes extraction (keeping the committed shards) and is killed after a checkpoint
    _run_and_kill(tmp_path, "train", config, lambda: (head / "checkpoints" / "latest").is_file())
    assert (cache / "manifest.parquet").is_file() and not (head / "last").exists()
    for k, sums in first.items():
        assert json.loads((cache / "shards" / f"{k:05d}.zarr" / "shard.json").read_text())["checksums"] == sums

    # 3. the last re-run resumes training and ends where the uninterrupted run ended
    summary = run_pipeline(load_config(raw=raw), progress=False)
    assert [(s["stage"], s["status"]) for s in summary["stages"]][1:] == [
        ("extract", "skipped"), ("train", "ran"), ("eval", "ran")]
    assert shard_checksums(cache) == shard_checksums(Path(cfg_ref.extract.cache))
    ref_t, got_t = head_tensors(Path(cfg_ref.train.output)), head_tensors(head)
    assert sorted(ref_t) == sorted(got_t)
    for k in ref_t:
        np.testing.assert_allclose(got_t[k], ref_t[k], rtol=0, atol=1e-6, err_msg=k)
    ref_rep = json.loads((Path(cfg_ref.train.output) / "eval" / "report.json").read_text())
    got_rep = json.loads((head / "eval" / "report.json").read_text())
    assert report_numbers(got_rep) == pytest.approx(report_numbers(ref_rep))
