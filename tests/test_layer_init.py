"""train.layer_init = target: stage 1 keeps the target's last decoder layer (Llama names, the norms'
effective weights) and stage 2 starts the head's layer and fc from it. Checked against the target's own
modules on random inputs, not against the formula."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from schemas.cache import LAYER_FILE, CacheReader
from schemas.config import TargetConfig, load_config
from schemas.head import make_head_config
from stage1_extract.extract import last_layer
from stage1_extract.target import load_target
from stage2_train.model import Eagle3Draft
from tiny import load_tiny_target, sharegpt_rows, tiny_target, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path, family):
    model = load_tiny_target(tmp_path, family)
    with torch.no_grad():  # norms start at 1 (Llama) or 0 (Gemma's 1 + w): make them tell
        for name, p in model.model.layers[-1].named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.3)
    return model.eval()


def _head(model) -> Eagle3Draft:
    cfg = make_head_config(model.config.to_dict(), draft_vocab_size=16, layer_ids=[0, 1, 2])
    return Eagle3Draft(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "minicpm4"])
def test_the_heads_layer_starts_as_the_targets_last_layer(tmp_path, family):
    model = _load(tmp_path, family)
    target = model.model.layers[-1]
    head = _head(model)
    head.init_layer_from(last_layer(model))
    m, h = head.midlayer, model.config.hidden_size
    a, b, c = (torch.randn(3, 5, h) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(m.mlp(a), target.mlp(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.self_attn.o_proj(a), target.self_attn.o_proj(a), rtol=1e-5, atol=1e-5)
        for ours, theirs in ((m.input_layernorm, target.input_layernorm), (m.hidden_norm, target.input_layernorm),
                             (m.post_attention_layernorm, target.post_attention_layernorm)):
            torch.testing.assert_close(ours(a), theirs(a), rtol=1e-4, atol=1e-4)
        # q/k/v read both halves of cat(embedding, hidden) with the target's weights, scaled by 1/sqrt(2)
        for name in ("q_proj", "k_proj", "v_proj"):
            ours = getattr(m.self_attn, name)(torch.cat((a, b), dim=-1))
            theirs = getattr(target.self_attn, name).weight @ (a + b).unsqueeze(-1)
            torch.testing.assert_close(ours, theirs.squeeze(-1) / 2 ** 0.5, rtol=1e-5, atol=1e-5)
        # fc passes the high layer's state through
        torch.testing.assert_close(head.fuse(torch.cat((a, b, c), dim=-1)), c, rtol=0, atol=0)


def test_a_layer_of_another_layout_is_not_kept(tmp_path):
    """MiniCPM3's attention is MLA (no q_proj): stage 1 keeps nothing rather than a layer the head cannot take."""
    assert last_layer(_load(tmp_path, "minicpm3")) is None


def test_a_shape_that_does_not_fit_is_refused(tmp_path):
    model = _load(tmp_path, "llama")
    layer = last_layer(model)
    layer["mlp.up_proj.weight"] = layer["mlp.up_proj.weight"][:-1]
    with pytest.raises(ValueError, match=r"^the target's mlp.up_proj.weight is \(127, 64\), this head's is "
                                         r"\(128, 64\)$"):
        _head(model).init_layer_from(layer)


def _raw(tmp_path, target, **train):
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(8, seed=1))
    return {"target": {"path": str(target), "dtype": "float32", "device": "cpu"},
            "data": {"train": [str(data)], "max_length": 96},
            "extract": {"cache": str(tmp_path / "cache"), "topk": 8, "samples_per_shard": 8},
            "train": {"output": str(tmp_path / "head"), "draft_vocab_size": 64, "ttt_length": 2, "max_steps": 1,
                      "lr": 1e-12, "val_fraction": 0.0, "eval_every": 1000, "save_every": 1000,
                      "layer_init": "target", "compute_dtype": "float32",
                      "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json"), **train}}


def _train(tmp_path, raw) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_head_starts_from_the_targets_last_layer(tmp_path):
    """Stage 1 keeps the layer; one step at lr 1e-12 leaves the head where it started."""
    from safetensors.torch import load_file

    from stage1_extract.extract import run_extract

    target = tiny_target(tmp_path / "t", "llama")
    raw = _raw(tmp_path, target)
    run_extract(load_config(raw=raw), progress=False, summary=False)
    reader = CacheReader(raw["extract"]["cache"])
    saved = reader.load_last_layer()
    assert (reader.target_dir() / LAYER_FILE).is_file()
    model, _, _ = load_target(TargetConfig(path=str(target), dtype="float32", device="cpu"))
    torch.testing.assert_close(saved["mlp.down_proj.weight"], model.model.layers[-1].mlp.down_proj.weight.detach())

    p = _train(tmp_path, raw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    w = load_file(str(tmp_path / "head" / "model.safetensors"))
    torch.testing.assert_close(w["midlayer.mlp.down_proj.weight"].float(), saved["mlp.down_proj.weight"].float(),
                               rtol=0, atol=1e-6)
    q = saved["self_attn.q_proj.weight"].float() / 2 ** 0.5
    torch.testing.assert_close(w["midlayer.self_attn.q_proj.weight"].float(), torch.cat((q, q), dim=1),
                               rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "head" / "config.json").read_text())["training"]["layer_init"] == "target"

    # a cache without the file (written before stage 1 kept it): a clear refusal, not a random start
    _drop_layer_file(reader)
    p = _train(tmp_path, {**raw, "train": {**raw["train"], "output": str(tmp_path / "head2")}})
    assert p.returncode != 0
    assert (f"train.layer_init=target: {reader.target_dir()} has no last_layer.safetensors (a cache written "
            f"before stage 1 kept it, or a target whose layer is not Llama-shaped)") in p.stderr + p.stdout


def _drop_layer_file(reader: CacheReader) -> None:
    """Make the cache one written before stage 1 kept the layer (file and cache.json entry gone)."""
    (reader.target_dir() / LAYER_FILE).unlink()
    cj = reader.root / "cache.json"
    ident = json.loads(cj.read_text())
    del ident["target_files"][LAYER_FILE]
    cj.write_text(json.dumps(ident))


def test_auto_is_the_target_start_on_a_cache_with_the_layer_and_scratch_on_one_without(tmp_path):
    """The default (auto): the same head as layer_init/lm_head_init = target where the cache holds the
    layer; on an older cache, a note and the same head as random/random, bit for bit."""
    from safetensors.torch import load_file

    from stage1_extract.extract import run_extract

    target = tiny_target(tmp_path / "t", "llama")
    raw = _raw(tmp_path, target)
    del raw["train"]["layer_init"]
    assert load_config(raw=raw).train.layer_init == "auto" and load_config(raw=raw).train.lm_head_init == "auto"
    run_extract(load_config(raw=raw), progress=False, summary=False)
    reader = CacheReader(raw["extract"]["cache"])

    def train(name, **init):
        p = _train(tmp_path, {**raw, "train": {**raw["train"], "output": str(tmp_path / name), **init}})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        training = json.loads((tmp_path / name / "config.json").read_text())["training"]
        return load_file(str(tmp_path / name / "model.safetensors")), training, p.stderr

    auto, training, _ = train("auto")
    assert (training["layer_init"], training["lm_head_init"]) == ("target", "target")
    explicit, _, _ = train("explicit", layer_init="target", lm_head_init="target")
    assert auto.keys() == explicit.keys()
    for k in auto:
        torch.testing.assert_close(auto[k], explicit[k], rtol=0, atol=0, msg=k)

    _drop_layer_file(reader)
    old, training, err = train("auto-old-cache")
    assert (training["layer_init"], training["lm_head_init"]) == ("random", "random")
    assert (f"[stage 2] note: {reader.target_dir()} has no {LAYER_FILE} (a cache written before stage 1 kept "
            f"it, or a target whose layer is not Llama-shaped): the head starts from scratch "
            f"(train.layer_init=auto); re-extract to start from the target's last layer") in err
    scratch, _, _ = train("scratch", layer_init="random", lm_head_init="random")
    for k in old:
        torch.testing.assert_close(old[k], scratch[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(old["midlayer.mlp.down_proj.weight"], auto["midlayer.mlp.down_proj.weight"])
