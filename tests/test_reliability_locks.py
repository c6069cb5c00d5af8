"""Issue 14 points 1 and 10: no two writers collide on a cache or a training output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from schemas.cache import SHARD_JSON, CacheError, committed_shards, verify_shard, write_shard
from tiny import sharegpt_rows, tiny_target, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _arrays(n_tokens: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 50, n_tokens).astype(np.int32),
            "loss_mask": np.ones(n_tokens, np.uint8),
            "hidden": rng.integers(0, 0x7F00, (n_tokens, 3, 4)).astype(np.uint16),  # finite bf16 bits
            "topk_ids": rng.integers(0, 50, (n_tokens, 2)).astype(np.int32),
            "topk_logprobs": np.zeros((n_tokens, 2), np.float16),
            "offsets": np.array([0, n_tokens], np.int64), "sample_index": np.array([seed], np.int64),
            "token_counts": np.zeros(50, np.int64)}


def _owned_temp_dir(cache: Path, k: int, proc) -> Path:
    """A temp shard dir as process `proc` names it: .tmp-K-HOST-PID-STARTTIME.zarr."""
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    start = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    p = cache / "shards" / f".tmp-{k:05d}-{host}-{proc.pid}-{start}.zarr"
    (p / "hidden").mkdir(parents=True)
    (p / "hidden" / "zarr.json").write_text("{}")
    return p


def test_a_live_writers_temp_dir_survives_another_writer_and_a_dead_ones_goes(tmp_path):
    # issue 14 point 1: writer.py deleted every .tmp-{k}-*.zarr, including a live process's
    from stage1_extract.writer import BatchResult, ShardPlan, ShardWriter

    cache = tmp_path / "cache"
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["sleep", "60"])
    try:
        mine_live = _owned_temp_dir(cache, 0, live)
        mine_dead = _owned_temp_dir(cache, 0, dead)
        dead.kill()
        dead.wait()
        a = _arrays()
        plan = ShardPlan(0, a["sample_index"], [a["input_ids"]], [a["loss_mask"]])
        w = ShardWriter(cache, hidden_size=4, topk=2, vocab_size=50)
        w.begin_shard(plan)
        hid = torch.from_numpy(a["hidden"].view(np.int16)).view(torch.bfloat16)
        w.put_batch(BatchResult(0, [0], hid, torch.from_numpy(a["topk_ids"]), torch.from_numpy(a["topk_logprobs"])))
        w.end_shard(0)
        w.close()
        assert mine_live.is_dir() and (mine_live / "hidden" / "zarr.json").is_file()
        assert not mine_dead.exists()
        assert committed_shards(cache) == [0] and verify_shard(cache / "shards" / "00000.zarr", vocab_size=50) == []
    finally:
        live.kill()
        live.wait()


def test_a_commit_never_replaces_a_shard_committed_meanwhile(tmp_path, monkeypatch):
    # issue 14 point 1: the check (is_committed) and the rename were two steps; a shard that another
    # process committed between them was deleted and replaced
    import schemas.cache as c

    cache = tmp_path / "cache"
    first = write_shard(cache, 0, _arrays(seed=1))
    real = c.is_committed
    calls = []

    def stale_check(p):  # the other process commits right after this writer looked
        calls.append(p)
        return False if len(calls) == 1 else real(p)

    monkeypatch.setattr(c, "is_committed", stale_check)
    with pytest.raises(CacheError, match="was committed by another process meanwhile"):
        write_shard(cache, 0, _arrays(seed=2))
    monkeypatch.undo()
    info = json.loads((cache / "shards" / "00000.zarr" / SHARD_JSON).read_text())
    assert info["checksums"] == first["checksums"]
    assert verify_shard(cache / "shards" / "00000.zarr", vocab_size=50) == []
    assert not list((cache / "shards").glob(".tmp-*"))  # the loser's temp dir is gone too


def test_a_second_holder_of_the_cache_lock_waits_and_a_worker_claim_is_exclusive(tmp_path):
    from schemas.cache import cache_lock, worker_claim
    from schemas.locks import LockBusy

    cache = tmp_path / "cache"
    claim = worker_claim(cache, 0, 2).acquire()
    with pytest.raises(LockBusy, match=rf"claim-0-of-2 is locked by pid {os.getpid()} on .* \(extract worker 0/2, since"):
        worker_claim(cache, 0, 2).acquire()
    worker_claim(cache, 1, 2).acquire().release()  # another worker id is free
    claim.release()
    worker_claim(cache, 0, 2).acquire().release()
    # a holder that dies (kill -9) releases the lock
    code = ("import sys, time; sys.path.insert(0, %r); from schemas.cache import cache_lock; "
            "l = cache_lock(%r).acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(cache))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(LockBusy, match=rf"locked by pid {p.pid} "):
        cache_lock(cache).acquire()
    p.kill()
    p.wait()
    with cache_lock(cache):
        pass


SLOW = """
import sys, time
import schemas.cache_write as c
_orig = c.encode_chunk
def _slow(chunk, codec):
    time.sleep(0.02)
    return _orig(chunk, codec)
c.encode_chunk = _slow
from pipeline.cli import main
sys.argv = ["eagle3", "extract", sys.argv[1], "--worker", "0/1", "--no-progress"]
main()
"""


def test_two_extracts_with_one_worker_id_never_corrupt_a_shard(tmp_path):
    tdir = tiny_target(tmp_path / "t", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(12, seed=5))
    cache = tmp_path / "cache"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                                   "extract": {"cache": str(cache), "samples_per_shard": 2, "topk": 4,
                                               "layers": [1, 3, 5]}}))
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, str(script), str(cfg)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    print("exit codes of the two extracts:", codes)
    errs = [e for _, e in results]
    # both finish (one after the other) or one refuses cleanly, naming the other
    assert codes in ([0, 0], [0, 1]), errs
    if codes == [0, 1]:
        err = errs[[p.returncode for p in procs].index(1)]
        assert "error: " in err and "extract worker 0/1 is already running on this cache (pid " in err
        assert "Traceback" not in err
    assert committed_shards(cache) == list(range(6))
    for k in range(6):
        assert verify_shard(cache / "shards" / f"{k:05d}.zarr", hidden_size=64, topk=4, vocab_size=320) == []
    assert not list((cache / "shards").glob(".tmp-*"))
    from schemas.cache import CacheReader

    assert sorted(r.sample_index for r in CacheReader(cache).refs) == list(range(12))


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    # DataLoader workers fork the trainer, which holds train.output's lock
    from schemas.locks import DirLock, LockBusy

    lock = DirLock(tmp_path / "l", "parent").acquire()
    pid = os.fork()
    if pid == 0:  # the child drops its copy, as a worker would at exit
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(LockBusy):
        DirLock(tmp_path / "l", "other").acquire()
    lock.release()
    DirLock(tmp_path / "l", "other").acquire().release()
