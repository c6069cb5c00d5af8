"""train.lm_head_init = target: stage 1 keeps the target's output head (lm_head rows with the logit
scaling folded in, the final norm's effective weight) and stage 2 starts the head's lm_head and norm
from it. Checked against the target's own logits, not against the formula."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from schemas.cache import LM_HEAD_FILE, CacheReader
from schemas.config import TargetConfig, load_config
from stage1_extract.extract import output_head
from stage1_extract.target import load_target
from tiny import load_tiny_target, sharegpt_rows, tiny_target, write_jsonl


ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path, family):
    model = load_tiny_target(tmp_path, family)
    with torch.no_grad():  # norms start at 1 (Llama) or 0 (Gemma's 1 + w): make them tell
        model.model.norm.weight.normal_(0.5, 0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma", "minicpm3", "minicpm4"])
def test_output_head_reproduces_the_targets_logits(tmp_path, family):
    model = _load(tmp_path, family).eval()
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    hook.remove()
    head = output_head(model)
    x = seen["x"].float()
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    ours = (rms * head["norm"].float()) @ head["weight"].float().T
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    if family in ("minicpm3", "minicpm4"):  # the scaling is really there (and folded in)
        assert not torch.allclose(head["weight"], model.get_output_embeddings().weight)


def test_the_head_starts_from_the_targets_output_head(tmp_path):
    """Stage 1 keeps the output head; one step at lr 1e-12 leaves the head where it started: the
    target's rows of the draft vocab and its final norm."""
    from safetensors.torch import load_file

    from stage1_extract.extract import run_extract

    target = tiny_target(tmp_path / "t", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(8, seed=1))
    raw = {"target": {"path": str(target), "dtype": "float32", "device": "cpu"},
           "data": {"train": [str(data)], "max_length": 96},
           "extract": {"cache": str(tmp_path / "cache"), "topk": 8, "samples_per_shard": 8},
           "train": {"output": str(tmp_path / "head"), "draft_vocab_size": 64, "ttt_length": 2, "max_steps": 1,
                     "lr": 1e-12, "val_fraction": 0.0, "eval_every": 1000, "save_every": 1000,
                     "lm_head_init": "target", "compute_dtype": "float32",
                     "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json")}}
    run_extract(load_config(raw=raw), progress=False, summary=False)
    reader = CacheReader(raw["extract"]["cache"])
    saved = reader.load_lm_head()
    assert (reader.target_dir() / LM_HEAD_FILE).is_file() and set(saved) == {"weight", "norm"}
    model, _, _ = load_target(TargetConfig(path=str(target), dtype="float32", device="cpu"))
    torch.testing.assert_close(saved["weight"], model.get_output_embeddings().weight.detach())

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    w = load_file(str(tmp_path / "head" / "model.safetensors"))
    rows = torch.arange(w["d2t"].numel()) + w["d2t"]
    torch.testing.assert_close(w["lm_head.weight"].float(), saved["weight"][rows].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(w["norm.weight"].float(), saved["norm"].float(), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "head" / "config.json").read_text())["training"]["lm_head_init"] == "target"
