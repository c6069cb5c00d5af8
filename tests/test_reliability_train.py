"""Issue 14 points 7, 9, 10, 11 on stage 2: no code runs from the output directory, export never
overwrites a model, one training per output directory, a full disk leaves a resumable checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import CacheReader

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


@pytest.fixture(scope="module")
def cache_and_target(tmp_path_factory):
    from cachefix import build_cache

    return build_cache(tmp_path_factory.mktemp("relcache"), n_samples=24, samples_per_shard=8, topk=8, peaked=False)


def _cfg(path: Path, cache: Path, out: Path, **train) -> Path:
    raw = {"name": "t", "target": {"path": "/unused"},
           "train": {"cache": str(cache), "output": str(out), "draft_vocab_size": 64, "ttt_length": 2,
                     "micro_batch_size": 4, "max_tokens_per_batch": 1024, "val_fraction": 0.0, "save_every": 2,
                     "eval_every": 1000, "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json"), **train}}
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(cfg: Path, *extra, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress", *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- point 7


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_rng_pickle_in_the_checkpoint_never_runs(cache_and_target, tmp_path):
    cache, _ = cache_and_target
    out = tmp_path / "head"
    cfg = _cfg(tmp_path / "c.yaml", cache, out, max_steps=2)
    p = _train(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "PWNED"
    (tag / "rng_rank0.json").unlink(missing_ok=True)  # only the pickle, as an old version left it
    import torch

    torch.save(_Evil(str(marker)), tag / "rng_rank0.pt")  # what an attacker leaves there
    p = _train(cfg, "train.max_steps=4")
    assert not marker.exists(), "resuming unpickled a file of the output directory"
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming at step 2" in p.stdout
    assert "rng_rank0.pt: RNG state in the old pickle format is not loaded" in p.stdout


def test_rng_state_round_trips_through_json(tmp_path):
    import random

    import numpy as np
    import torch

    from stage2_train.run_state import load_rng_state, rng_file, save_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    save_rng_state(rng_file(tmp_path, 0))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert load_rng_state(tmp_path, 0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])
    json.loads(rng_file(tmp_path, 0).read_text())  # plain JSON, nothing to unpickle


# --------------------------------------------------------------------------- point 10


HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "here", "what": "eagle3 train", "since": time.time()}).encode())
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_training_into_one_output_refuses_naming_the_first(cache_and_target, tmp_path):
    cache, _ = cache_and_target
    out = tmp_path / "head"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = _train(_cfg(tmp_path / "c.yaml", cache, out, max_steps=2))
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"error: train.output {out} is in use by another training (pid {holder.pid} on here" in p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(x.name for x in out.iterdir()) == [".lock"]  # nothing written, nothing deleted


# --------------------------------------------------------------------------- point 9


def _random_head(cache: Path, d: Path) -> Path:
    from schemas.head import make_head_config
    from stage2_train.export import write_head
    from stage2_train.model import Eagle3Draft

    import torch

    r = CacheReader(cache)
    m = Eagle3Draft(make_head_config(r.target_config(), draft_vocab_size=64, layer_ids=r.layers))
    t2d = torch.zeros(r.vocab_size, dtype=torch.bool)
    t2d[:64] = True  # draft vocab = target ids 0..63
    m.set_vocab_map(torch.zeros(64, dtype=torch.int64), t2d)
    return write_head(m, d)


def test_export_never_overwrites_a_model_and_needs_force_for_a_non_empty_dir(cache_and_target, tmp_path):
    import shutil

    cache, target = cache_and_target
    head = _random_head(cache, tmp_path / "head")
    model_dir = tmp_path / "model"
    shutil.copytree(target, model_dir)  # a copy of the target: config.json says LlamaForCausalLM
    before = {f.name: _sha(f) for f in model_dir.iterdir()}

    def export(out, *extra):
        res = CliRunner().invoke(app, ["export", str(head), str(out), "--to", "vllm", *extra])
        return res.exit_code, res.output

    for extra in ((), ("--force",)):
        code, text = export(model_dir, *extra)
        assert code == 1 and f"export: {model_dir} holds a model" in text and "even with --force" in text, text
    assert {f.name: _sha(f) for f in model_dir.iterdir()} == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.md").write_text("mine")
    for extra in ((), ("--force",)):  # someone else's files: never written into (issue 22)
        code, text = export(other, *extra)
        assert code == 1 and f"export: {other} holds files eagle3 did not write" in text and "even with --force" in text
    assert sorted(f.name for f in other.iterdir()) == ["README.md"]

    out = tmp_path / "out"
    assert export(out)[0] == 0
    code, text = export(out)  # a second export into the first one: only with --force
    assert code == 1 and "is not empty; pass --force" in text
    assert export(out, "--force")[0] == 0
