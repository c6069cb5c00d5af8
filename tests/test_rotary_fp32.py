"""W5: RoPE buffers stay fp32 through DeepSpeed's mixed-precision cast, longrope included.

Longrope (and dynamic) scaling recompute `inv_freq` from `original_inv_freq` at every
forward; both are buffers. The run below asks DeepSpeed to cast buffers to bf16
(`data_types.buffer_dtype`, what older DeepSpeed versions always did) and inspects the
head's rotary module inside the real `eagle3 train` process at its first step.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

HARNESS = """
import json, os, sys, torch
import stage2_train.trainer as t
from stage2_train.model import Eagle3Draft
orig = t.ttt_forward
def ttt_forward(model, *a, **k):
    out_file = os.environ["ROTARY_REPORT"]
    if not os.path.exists(out_file):
        fresh = Eagle3Draft(model.config).rotary                      # fp32, from the config
        rot = model.rotary
        rep = {"dtypes": {n: str(b.dtype) for n, b in rot.named_buffers()}}
        pos = torch.arange(int(model.config["rope_parameters"]["original_max_position_embeddings"]))[None]
        x = torch.zeros(1, 1, dtype=torch.float32)
        with torch.no_grad():
            c1, s1 = rot(x, pos)
            c0, s0 = fresh(x, pos)
        rep["cos_err"] = float((c1.float() - c0).abs().max())
        rep["inv_err"] = {n: float(((b.double() - dict(fresh.named_buffers())[n].double()).abs()
                                    / dict(fresh.named_buffers())[n].double().abs()).max())
                          for n, b in rot.named_buffers()}
        json.dump(rep, open(out_file, "w"))
    return orig(model, *a, **k)
t.ttt_forward = ttt_forward
from pipeline.cli import main
sys.argv = ["eagle3"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def longrope_cache(tmp_path_factory):
    from cachefix import build_cache
    from schemas.cache import CACHE_JSON, CacheReader
    from schemas.cache_check import target_file_checksums

    c, _ = build_cache(tmp_path_factory.mktemp("lr"), n_samples=16, samples_per_shard=16, topk=4)
    cfg_path = CacheReader(c).target_dir() / "config.json"
    tc = json.loads(cfg_path.read_text())
    half = (tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]) // 2
    tc.pop("rope_scaling", None)
    tc["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                             "short_factor": [1.0 + 0.1 * i for i in range(half)],
                             "long_factor": [2.0 + 0.3 * i for i in range(half)],
                             "original_max_position_embeddings": 64}
    tc["max_position_embeddings"] = 256
    cfg_path.write_text(json.dumps(tc))
    # A deliberate edit of target/: record the new checksums as an extraction would have.
    meta = json.loads((c / CACHE_JSON).read_text())
    meta["target_files"] = target_file_checksums(cfg_path.parent)
    (c / CACHE_JSON).write_text(json.dumps(meta))
    return c


def test_longrope_buffers_stay_fp32_under_deepspeed_bf16(longrope_cache, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": True},
                              "data_types": {"buffer_dtype": "bf16"}, "zero_optimization": {"stage": 0}}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "t", "target": {"path": "/deleted/target"},
                                   "train": {"cache": str(longrope_cache), "output": str(tmp_path / "head"),
                                             "draft_vocab_size": 64, "ttt_length": 2, "max_steps": 1,
                                             "micro_batch_size": 4, "val_fraction": 0.25, "save_every": 1000,
                                             "eval_every": 1000, "deepspeed": str(ds)}}))
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    report = tmp_path / "rotary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
           "ROTARY_REPORT": str(report)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(script), "train", str(cfg), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert report.is_file(), p.stdout[-2000:] + p.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert set(rep["dtypes"]) == {"inv_freq", "original_inv_freq"}
    assert rep["dtypes"] == {"inv_freq": "torch.float32", "original_inv_freq": "torch.float32"}, rep
    assert max(rep["inv_err"].values()) == 0.0 and rep["cos_err"] < 1e-6, rep
    assert p.returncode == 0, p.stderr[-3000:]
