"""Workers: r/W resolution, torchrun with two processes, kill -9 and resume give the same cache."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from schemas.cache import SHARD_JSON, committed_shards
from schemas.config import load_config
from stage1_extract.extract import run_extract
from stage1_extract.workers import WorkerError, parse_worker, resolve_worker
from tiny import sharegpt_rows, tiny_target, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_worker_sources_and_errors():
    assert (lambda w: (w.rank, w.world, w.source))(resolve_worker("2/5", env={})) == (2, 5, "explicit")
    w = resolve_worker(env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_ARRAY_TASK_ID": "7"})
    assert (w.rank, w.world, w.source, w.local_rank) == (1, 2, "torchrun", 1)
    w = resolve_worker(env={"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (w.rank, w.world, w.source) == (2, 4, "slurm-array")
    assert (resolve_worker(env={}).rank, resolve_worker(env={}).world) == (0, 1)
    assert [k for k in range(10) if resolve_worker("1/3", env={}).owns(k)] == [1, 4, 7]
    with pytest.raises(WorkerError, match=r"--worker 3/2: worker index 3 is outside 0..1"):
        parse_worker("3/2")
    with pytest.raises(WorkerError, match=r"expected r/W with integers"):
        parse_worker("a/b")
    with pytest.raises(WorkerError, match=r"SLURM_ARRAY_TASK_COUNT is not"):
        resolve_worker(env={"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(WorkerError, match=r"RANK='x' is not an integer"):
        resolve_worker(env={"RANK": "x", "WORLD_SIZE": "2"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(14, seed=7))
    raw = {"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
           "extract": {"cache": str(tmp / "ref"), "samples_per_shard": 2, "topk": 4, "layers": [1, 3, 5],
                       "max_tokens_per_batch": 128}}
    # subprocess workers run single-threaded (torchrun's default); so does the reference,
    # so fp32 reductions happen in the same order and checksums can be compared exactly
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_extract(load_config(raw=raw), progress=False)
    finally:
        torch.set_num_threads(n)
    return tmp, raw, ref


def _checksums(root: Path) -> dict:
    return {p.name: json.loads((p / SHARD_JSON).read_text())["checksums"]
            for p in sorted((root / "shards").iterdir())}


def _write_cfg(tmp: Path, raw: dict, cache: Path) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["extract"]["cache"] = str(cache)
    p = tmp / f"{cache.name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("SLURM_ARRAY_TASK_ID", None)
    return env


def test_explicit_workers_share_the_shards(setup):
    tmp, raw, ref = setup
    cfg = load_config(raw={**raw, "extract": {**raw["extract"], "cache": str(tmp / "w2")}})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep0, rep1 = {}, {}
        run_extract(cfg, worker="0/2", progress=False, report=rep0)
        assert committed_shards(tmp / "w2") == [0, 2, 4, 6] and not rep0["manifest"]
        assert not (tmp / "w2" / "manifest.parquet").exists()
        run_extract(cfg, worker=(1, 2), progress=False, report=rep1)
    finally:
        torch.set_num_threads(n)
    assert rep1["manifest"] and (tmp / "w2" / "manifest.parquet").is_file()
    assert _checksums(tmp / "w2") == _checksums(ref)


def test_torchrun_two_workers_equal_one_worker(setup):
    tmp, raw, ref = setup
    cache = tmp / "torchrun"
    cfg = _write_cfg(tmp, raw, cache)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29731", "-m", "pipeline.cli", "extract", str(cfg), "--no-progress"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "extract train worker 0/2" in res.stderr and "extract train worker 1/2" in res.stderr
    assert committed_shards(cache) == list(range(7))
    assert _checksums(cache) == _checksums(ref)
    assert (cache / "manifest.parquet").is_file()


# Stretch each chunk write so that a kill lands mid-shard (the writer is otherwise faster
# than a test can react); the extraction itself is the real one.
SLOW_WRITER = """
import sys, time
import schemas.cache_write as c
_orig = c.encode_chunk
def _slow(chunk, codec):
    time.sleep(0.02)
    return _orig(chunk, codec)
c.encode_chunk = _slow
from pipeline.cli import main
sys.argv = ["eagle3", "extract", sys.argv[1], "--no-progress"]
main()
"""


def test_kill_9_then_resume_equals_an_uninterrupted_run(setup):
    tmp, raw, ref = setup
    cache = tmp / "killed"
    cfg = _write_cfg(tmp, raw, cache)
    script = tmp / "slow_extract.py"
    script.write_text(SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(cfg)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300  # a shared machine may take minutes to start the process
        # kill once a shard is committed and the next one is being written
        while time.time() < deadline and proc.poll() is None and not (
                committed_shards(cache) and list((cache / "shards").glob(".tmp-*"))):
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = committed_shards(cache)
    assert 1 <= len(done) < 7
    entries = list((cache / "shards").iterdir())
    # only renamed dirs with shard.json count; the kill left a temp dir mid-write
    assert sorted(int(p.stem) for p in entries if (p / SHARD_JSON).is_file() and not p.name.startswith(".")) == done
    leftovers = [p.name for p in entries if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have caught a shard mid-write"
    from pipeline.cmd_shards import list_shards

    assert {r["name"] for r in list_shards(cache) if r["status"] == "committed"} == {f"{k:05d}.zarr" for k in done}
    assert not (cache / "manifest.parquet").exists()
    before = {k: (cache / "shards" / f"{k:05d}.zarr" / SHARD_JSON).stat().st_mtime_ns for k in done}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = {}
        run_extract(load_config(str(cfg)), progress=False, report=rep)
    finally:
        torch.set_num_threads(n)
    assert rep["shards_skipped"] == len(done) and rep["shards_written"] == 7 - len(done)
    assert before == {k: (cache / "shards" / f"{k:05d}.zarr" / SHARD_JSON).stat().st_mtime_ns for k in done}
    assert sorted(p.name for p in (cache / "shards").iterdir()) == sorted(p.name for p in (ref / "shards").iterdir())
    assert _checksums(cache) == _checksums(ref)
    import pyarrow.parquet as pq

    strip = lambda rows: [{k: v for k, v in r.items() if k != "disk_bytes"} for r in rows]  # noqa: E731
    assert strip(pq.read_table(cache / "manifest.parquet").to_pylist()) == \
        strip(pq.read_table(ref / "manifest.parquet").to_pylist())
    shutil.rmtree(cache)


def test_cli_extract_eval_split_and_clean_errors(setup):
    from typer.testing import CliRunner

    from pipeline.cli import app

    tmp, raw, ref = setup
    raw = json.loads(json.dumps(raw))
    raw["data"]["eval"] = raw["data"]["train"][:1]
    raw["data"]["max_samples"] = 4
    cfg = _write_cfg(tmp, raw, tmp / "cli")
    runner = CliRunner()
    res = runner.invoke(app, ["extract", str(cfg), "--eval", "--no-progress"])
    assert res.exit_code == 0, res.output
    ev = tmp / "cli-eval"
    assert committed_shards(ev) == [0, 1] and not (tmp / "cli").exists()
    meta = json.loads((ev / "cache.json").read_text())
    assert meta["split"] == "eval" and meta["data"]["num_samples"] == 4
    assert "extract eval worker 0/1: 2 shards written" in res.stderr
    res = runner.invoke(app, ["extract", str(cfg), "extract.topk=5", "--eval", "--no-progress"])
    assert res.exit_code == 1 and "K (extract.topk): cache has 4, this run has 5" in res.stderr
    res = runner.invoke(app, ["extract", str(cfg), "--worker", "2/2"])
    assert res.exit_code == 1 and "worker index 2 is outside 0..1" in res.stderr
