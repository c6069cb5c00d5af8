"""One export for SGLang and vLLM: both id fields, round trip into stage 3, CLI, and vLLM's own id reader."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from schemas.head import POSITION_RULE_KEY, HeadError, load_head
from stage2_train.export import export_head, write_head



@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture()
def head_dir(target, tmp_path):
    from spec_helpers import make_head

    head = make_head(target, seed=2)
    head.config["target_num_hidden_layers"] = int(target.config.num_hidden_layers)
    return write_head(head, tmp_path / "head")


def test_one_export_has_both_engines_ids_and_loads_back_into_stage3(target, head_dir, tmp_path):
    from spec_helpers import tiny_layer_ids
    from stage3_eval.draft_runner import head_layer_ids, load_draft

    hf = tiny_layer_ids(target)
    a = export_head(head_dir, None, tmp_path / "a", dtype="float32")
    cfg, _ = load_head(a)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == hf                                      # vLLM: HF indices
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in hf]    # SGLang: HF - 1
    assert cfg["eagle_config"]["hf_hidden_states_layer_ids"] == hf
    assert cfg[POSITION_RULE_KEY] == "t+k" and cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    # --to sglang / --to vllm (kept for old scripts) give the same directory
    for engine in ("sglang", "vllm"):
        b = export_head(head_dir, engine, tmp_path / engine, dtype="float32")
        cb, _ = load_head(b)
        cb["export"]["from"] = cfg["export"]["from"]
        assert cb == cfg and (b / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    # stage 3 reads the exported directory with the right HF ids and the same weights
    orig, exp = load_draft(head_dir, target), load_draft(a, target)
    assert head_layer_ids(exp) == hf == head_layer_ids(orig)
    for (n, p), (_, q) in zip(orig.state_dict().items(), exp.state_dict().items()):
        assert torch.equal(p, q), n
    # a bf16 export loads too
    assert head_layer_ids(load_draft(export_head(head_dir, None, tmp_path / "bf"), target)) == hf


def test_export_refuses_ids_an_engine_cannot_capture_and_old_heads(target, head_dir, tmp_path):
    cfg = json.loads((head_dir / "config.json").read_text())
    L = cfg["target_num_hidden_layers"]
    # HF 0 (embeddings): SGLang cannot capture it; HF L (after the final norm): neither engine
    for ids, bad in (([0, 2, 3], "0 .*cannot be captured by sglang"), ([1, 2, L], f"{L} .*cannot be captured by")):
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = ids
        (head_dir / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(HeadError, match=f"layer id {bad}"):
            export_head(head_dir, None, tmp_path / "x")
    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    del cfg[POSITION_RULE_KEY]
    (head_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadError, match="ttt_position_rule has none"):
        export_head(head_dir, None, tmp_path / "y")
    with pytest.raises(HeadError, match="unknown engine 'tgi'"):
        export_head(head_dir, "tgi", tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_without_and_with_to(head_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pipeline.cli", "export", str(head_dir), str(tmp_path / "o1")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    said = " ".join(p.stdout.split())  # the console wraps lines
    assert "serves in SGLang and vLLM" in said and "note:" not in said
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "o2"), "--to", "vllm"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0 and "--to vllm is no longer needed" in " ".join(p.stdout.split())
    assert json.loads((tmp_path / "o1" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == \
        json.loads((tmp_path / "o2" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]


@pytest.mark.vllm
def test_vllm_reads_the_hf_ids_from_the_export(head_dir, tmp_path, vllm_python):
    """vLLM's own reader (the eagle3 aux-layer lookup) on our exported config.json."""
    out = export_head(head_dir, None, tmp_path / "e")
    script = (
        "import sys, json\n"
        "from types import SimpleNamespace\n"
        "from transformers import PretrainedConfig\n"
        "from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config\n"
        "cfg = PretrainedConfig(**json.load(open(sys.argv[1])))\n"
        "spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=cfg))\n"
        "print(json.dumps(list(get_eagle3_aux_layers_from_config(spec))))\n")
    p = subprocess.run([str(vllm_python), "-I", "-c", script, str(out / "config.json")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    hf = json.loads((out / "config.json").read_text())["eagle_config"]["hf_hidden_states_layer_ids"]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == hf


def test_speculators_layout(head_dir, tmp_path):
    out = export_head(head_dir, "speculators", tmp_path / "s", verifier="path/to/target", speculative_tokens=4)
    cfg = json.loads((out / "config.json").read_text())
    hf = cfg["export"]["hf_hidden_states_layer_ids"]
    assert cfg["architectures"] == ["Eagle3Speculator"] and cfg["speculators_model_type"] == "eagle3"
    assert cfg["eagle_aux_hidden_state_layer_ids"] == hf and cfg["norm_before_residual"] is False
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "path/to/target"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and "eagle_config" not in layer and layer["attention_bias"] is False
    with pytest.raises(HeadError, match="needs --verifier"):
        export_head(head_dir, "speculators", tmp_path / "s2")
    assert not (tmp_path / "s2").exists()


@pytest.mark.vllm
def test_vllm_parses_the_speculators_export(head_dir, tmp_path, vllm_python):
    """vLLM's own speculators config reader: drafter config, aux ids, speculative config, verifier."""
    out = export_head(head_dir, "speculators", tmp_path / "s", verifier="path/to/target", speculative_tokens=4)
    script = (
        "import sys, json\n"
        "from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig\n"
        "d = sys.argv[1]\n"
        "c = SpeculatorsConfig.from_pretrained(d)\n"
        "raw = json.load(open(d + '/config.json'))\n"
        "spec = SpeculatorsConfig.extract_vllm_speculative_config(raw)\n"
        "print(json.dumps({'ids': list(c.eagle_aux_hidden_state_layer_ids), 'arch': c.architectures,\n"
        "                  'nbr': c.norm_before_residual, 'n': c.draft_vocab_size, 'spec': spec,\n"
        "                  'hidden': c.hidden_size, 'target_hidden': c.target_hidden_size}))\n")
    p = subprocess.run([str(vllm_python), "-I", "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    cfg = json.loads((out / "config.json").read_text())
    assert got["ids"] == cfg["export"]["hf_hidden_states_layer_ids"] and got["nbr"] is False
    assert got["arch"] == ["Eagle3LlamaForCausalLM"] and got["n"] == cfg["draft_vocab_size"]
    assert got["spec"] == {"method": "eagle3", "num_speculative_tokens": 4}
    assert got["hidden"] == cfg["transformer_layer_config"]["hidden_size"]
