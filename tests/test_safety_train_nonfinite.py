"""Bad-input corpus, non-finite training (issue 22, case 3): a loss or gradient that becomes inf/NaN
stops `eagle3 train` with one line naming the step, and nothing from that step on is written: the
checkpoints on disk are the good ones (a rerun resumes from the last), the head is a good one.

The NaN is injected by tests/nan_inject.py (the real command, its loss multiplied by NaN at one
step), as an overflowing forward would make it; on one rank here, on two under torchrun and the
device guard (tests/device_guard) below."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from procs import finish

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
GUARD = TESTS / "device_guard"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def env(guard: bool = False) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=f"{ROOT}:{TESTS}")
    if guard:
        e.update(EAGLE3_DEVICE_GUARD="1", PYTHONPATH=f"{GUARD}:{ROOT}:{TESTS}")
    return e


def run(cmd: list, e: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True), timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from cachefix import build_cache

    c, target = build_cache(tmp_path_factory.mktemp("nfcache"), n_samples=24, samples_per_shard=8, topk=8)
    shutil.rmtree(target)
    return c


def write_cfg(path: Path, cache: Path, out: Path, ds: dict, **train) -> Path:
    dsp = path.with_suffix(".ds.json")
    dsp.write_text(json.dumps(ds))
    raw = {"name": "nf", "target": {"path": "/deleted/target"},
           "train": {"cache": str(cache), "output": str(out), "draft_vocab_size": 128, "ttt_length": 2, "lr": 3e-3,
                     "micro_batch_size": 2, "max_tokens_per_batch": 1024, "val_fraction": 0.2, "save_every": 2,
                     "eval_every": 2, "deepspeed": str(dsp), **train}}
    path.write_text(yaml.safe_dump(raw))
    return path


FP32 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
ZERO2 = {**FP32, "zero_optimization": {"stage": 2}}


def ckpt_tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def assert_good_head(out: Path, before: int) -> None:
    """The head at the top of train.output is one from a step before `before`, all finite; no last/."""
    assert not (out / "last").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["best_step"] < before
    w = load_file(str(out / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in w.values() if t.is_floating_point())


def test_nan_loss_stops_training_keeps_the_last_good_checkpoint_and_resumes(cache, tmp_path):
    out = tmp_path / "head"
    cfg = write_cfg(tmp_path / "c.yaml", cache, out, FP32, max_steps=8)
    # NaN at step 5: no check is due there (no save, eval or log step), the one at step 6 finds it
    p = run([sys.executable, "-m", "nan_inject", "5", "0", "train", str(cfg), "--no-progress"], env())
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1] == (f"error: train: the loss and the gradient norm became non-finite (inf/NaN) at step 5; "
                         f"stopped before writing anything from it; the last good checkpoint, step00000004 in "
                         f"{out / 'checkpoints'}, is kept: a rerun resumes from it (lower train.lr or check the "
                         f"cache with `eagle3 shards verify`)"), p.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert ckpt_tags(out) == ["step00000002", "step00000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert [json.loads(ln)["step"] for ln in (out / "eval.jsonl").read_text().splitlines()] == [2, 4]
    assert_good_head(out, before=5)
    # the same command without the NaN resumes from the last good checkpoint and finishes
    p = run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress"], env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming at step 4" in p.stdout
    last = load_file(str(out / "last" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in last.values() if t.is_floating_point())


def test_nan_on_one_of_two_ranks_stops_both_under_the_device_guard(cache, tmp_path):
    """ZeRO-2, 2 ranks under torchrun: rank 1's loss is NaN at step 3; both ranks stop at the same check
    (one MIN all-reduce through Ranks) with the same line, before the step-4 checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "head"
    cfg = write_cfg(tmp_path / "c.yaml", cache, out, ZERO2, max_steps=4, eval_every=100)
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(port), "-m", "nan_inject", "3", "1", "train", str(cfg), "--no-progress"],
            env(guard=True))
    assert p.returncode != 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[device guard] stage 2 runs with default device meta" in p.stdout
    # rank 1 saw the NaN loss; DeepSpeed's ZeRO step saw the all-reduced NaN gradient on both ranks
    want = "error: train: the loss and the gradient norm became non-finite (inf/NaN) at step 3; stopped before"
    assert p.stderr.count(want) == 2, p.stderr[-4000:]
    assert ckpt_tags(out) == ["step00000002"]
    assert not (out / "last").exists() and not (out / "model.safetensors").exists()
