"""Issue 14 point 11: a full disk is a clear error (path, "no space left"), leaves the cache or the
checkpoints consistent, and the same command completes once there is space. Runs on a small tmpfs
(needs root to mount; skipped otherwise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_TASK_ID"):
    ENV.pop(_k, None)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs directory of that size; resize(size) grows it in place."""
    mounted = []

    class Fs:
        def mount(self, size: str) -> Path:
            d = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
            d.mkdir()
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:200]})")
            mounted.append(d)
            return d

        def resize(self, d: Path, size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(d)], check=True)

    yield Fs()
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _checksums(cache: Path) -> dict:
    return {p.name: json.loads((p / "shard.json").read_text())["checksums"]
            for p in sorted((cache / "shards").glob("*.zarr"))}


def test_extraction_on_a_full_disk_fails_clearly_and_the_rerun_completes(tmp_path, tmpfs):
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    tdir = tiny_target(tmp_path / "t", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(24, seed=4))

    def cfg(cache: Path) -> Path:
        p = tmp_path / f"{cache.parent.name}.yaml"
        p.write_text(yaml.safe_dump({"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                                     "extract": {"cache": str(cache), "samples_per_shard": 8, "topk": 8,
                                                 "layers": [1, 3, 5]}}))
        return p

    ref = tmp_path / "ref" / "cache"
    assert _cli("extract", cfg(ref), "--no-progress").returncode == 0
    fs = tmpfs.mount("640k")  # cache.json, target/ and about one shard
    cache = fs / "cache"
    p = _cli("extract", cfg(cache), "--no-progress")
    assert p.returncode == 1
    assert "error: " in p.stderr and "no space left on device while writing " + str(cache) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    done = sorted(x.name for x in (cache / "shards").glob("*.zarr"))
    assert len(done) < 3 and not list((cache / "shards").glob(".tmp-*"))  # no half-written shard is left
    assert {k: v for k, v in _checksums(cache).items()} == {k: _checksums(ref)[k] for k in done}
    tmpfs.resize(fs, "16m")
    p = _cli("extract", cfg(cache), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _checksums(cache) == _checksums(ref)
    assert _cli("shards", "verify", cache).returncode == 0


def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_the_rerun_completes(tmp_path, tmpfs):
    from cachefix import build_cache
    from safetensors.torch import load_file

    cache, _ = build_cache(tmp_path / "c", n_samples=24, samples_per_shard=8, topk=8, peaked=False)

    def cfg(out: Path) -> Path:
        p = tmp_path / f"{out.parent.name}-{out.name}.yaml"
        p.write_text(yaml.safe_dump({"name": "t", "target": {"path": "/unused"}, "train": {
            "cache": str(cache), "output": str(out), "draft_vocab_size": 64, "ttt_length": 2, "micro_batch_size": 4,
            "max_tokens_per_batch": 1024, "val_fraction": 0.0, "save_every": 2, "eval_every": 1000, "max_steps": 4,
            "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json")}}))
        return p

    fs = tmpfs.mount("1200k")  # the step-2 checkpoint (0.8 MB) fits, the step-4 one does not
    out = fs / "head"
    p = _cli("train", cfg(out), "--no-progress")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    want = (f"error: no space left on device while writing {out}/checkpoints/step00000004 ")
    assert want in p.stderr and "the incomplete checkpoint step00000004 was removed; the run resumes from " \
                                "step00000002" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert not (out / "checkpoints" / "step00000004").exists()
    tmpfs.resize(fs, "16m")
    p = _cli("train", cfg(out), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming at step 2" in p.stdout
    ref = tmp_path / "ref" / "head"
    assert _cli("train", cfg(ref), "--no-progress").returncode == 0
    a, b = load_file(str(out / "last" / "model.safetensors")), load_file(str(ref / "last" / "model.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


# --------------------------------------------------------------------------- without a tmpfs: ENOSPC injected


def test_enospc_in_the_shard_writer_names_the_path_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    import errno

    import numpy as np
    import torch

    from stage1_extract.writer import BatchResult, ShardPlan, ShardWriter, WriterError

    real = Path.write_text

    def full(self, *a, **k):  # the arrays are written; the disk fills up at shard.json
        if self.name == "shard.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    cache = tmp_path / "cache"
    ids = np.arange(5, dtype=np.int32)
    plan = ShardPlan(0, np.array([0], np.int64), [ids], [np.ones(5, np.uint8)])
    w = ShardWriter(cache, hidden_size=4, topk=2, vocab_size=50)
    w.begin_shard(plan)
    w.put_batch(BatchResult(0, [0], torch.zeros(5, 3, 4, dtype=torch.bfloat16), torch.zeros(5, 2, dtype=torch.int32),
                            torch.zeros(5, 2, dtype=torch.float16)))
    w.end_shard(0)
    with pytest.raises(WriterError) as ei:
        w.close()
    assert f"no space left on device while writing {cache / 'shards'}" in str(ei.value)
    assert "shard 0 was not committed" in str(ei.value)
    assert list((cache / "shards").iterdir()) == []


def test_enospc_anywhere_in_a_command_is_one_clear_line(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    import schemas.cache
    from pipeline.cli import app

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.parquet"))

    (tmp_path / "cache.json").write_text(json.dumps({"schema": "eagle3-cache/1", "layers": [1, 2, 3], "topk": 2,
                                                     "target": {"hidden_size": 4, "vocab_size": 8,
                                                                "num_hidden_layers": 4}}))
    monkeypatch.setattr(schemas.cache, "build_manifest", full)
    import pipeline.cmd_shards

    monkeypatch.setattr(pipeline.cmd_shards, "build_manifest", full)
    res = CliRunner().invoke(app, ["shards", "index", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.startswith(f"error: no space left on device while writing {tmp_path / 'manifest.parquet'}")
