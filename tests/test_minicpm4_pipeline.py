"""MiniCPM4 end to end: the whole pipeline on a tiny random MiniCPM4 (native model, MiniCPM4
tokenizer and chat template), the exact loss mask, and both eos ids ([</s>, <|im_end|>]) in
regeneration and stage 3."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import minicpm4_tokenizer, sharegpt_rows, tiny_minicpm4, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 8  # extract.layers auto = [2, 4, 5]


@pytest.fixture(scope="module")
def mc4_dir(tmp_path_factory) -> Path:
    return tiny_minicpm4(tmp_path_factory.mktemp("tiny_minicpm4"), layers=LAYERS, hidden=64)


def pipeline_raw(d: Path, target: Path) -> dict:
    write_jsonl(d / "train.jsonl", sharegpt_rows(16, turns=1))
    write_jsonl(d / "prompts.jsonl", [{"prompt": "what is the capital of france"},
                                      {"prompt": "write a poem about the sea"}])
    return {
        "name": "tiny-minicpm4", "target": {"path": str(target), "trust_remote_code": False},
        "data": {"train": [str(d / "train.jsonl")], "max_length": 96,
                 "regenerate": {"enabled": True, "output": str(d / "run" / "regenerated.jsonl"),
                                "max_new_tokens": 24, "batch_size": 8}},
        "extract": {"cache": str(d / "run" / "cache"), "samples_per_shard": 8, "topk": 8},
        "train": {"output": str(d / "run" / "head"), "draft_vocab_size": 64, "ttt_length": 2, "epochs": 1,
                  "save_every": 100, "eval_every": 100, "val_fraction": 0.25, "max_tokens_per_batch": 512,
                  "deepspeed": str(ROOT / "configs" / "deepspeed" / "cpu_fp32.json")},
        "eval": {"prompts": [str(d / "prompts.jsonl")], "max_new_tokens": 12, "method": ["chain", "tree"],
                 "draft_tokens": 3, "top_k": 2, "depth": 3, "total_tokens": 6, "warmup": 0},
    }


def test_pipeline_on_tiny_minicpm4(mc4_dir, tmp_path, one_thread):
    from pipeline.run import run_pipeline
    from schemas.cache import CacheReader
    from schemas.config import load_config
    from stage2_train.export import export_head, load_head

    cfg = load_config(raw=pipeline_raw(tmp_path, mc4_dir))
    summary = run_pipeline(cfg, progress=False, log=lambda s: None)
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("regenerate", "ran"), ("extract", "ran"), ("train", "ran"), ("eval", "ran")]

    # stage 1 recorded the MiniCPM4 specifics: layers [2, L//2, L-3], embed scale 12
    r = CacheReader(cfg.extract.cache)
    assert r.meta["layers"] == [2, LAYERS // 2, LAYERS - 3]
    assert float(r.meta["embed_scale"]) == 12.0
    assert r.meta["target"]["hidden_size"] == 64 and r.meta["target"]["num_hidden_layers"] == LAYERS

    rep = json.loads((Path(cfg.train.output) / "eval" / "report.json").read_text())
    methods = {m["method"]: m for m in rep["heads"][0]["methods"]}
    assert set(methods) == {"chain", "tree"}
    assert all(m["lossless"] is True for m in methods.values())

    # a fresh process has nothing registered: the tokenizer loaders register the native classes
    # themselves (AutoTokenizer reads config.json, whose `minicpm` transformers alone cannot parse)
    from pipeline.cmd_shards import inspect_sample
    from schemas import minicpm4
    from schemas.target import load_tokenizer

    minicpm4.unregister()
    assert load_tokenizer(cfg.target).eos_token == "<|im_end|>"
    minicpm4.unregister()
    assert inspect_sample(Path(cfg.extract.cache), r.refs[0].sample_index)["tokens"] > 0

    head = Path(cfg.train.output) / "last"
    vl = export_head(head, "vllm", tmp_path / "vllm")
    sg = export_head(head, "sglang", tmp_path / "sglang")
    assert load_head(vl)[0]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert load_head(sg)[0]["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]


# ------------------------------------------------------------------ chat template + loss mask

CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Hello! How can I help you today?"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
]


@pytest.mark.parametrize("msgs", [CONV, CONV[1:3]])
def test_minicpm4_loss_mask_is_exact(msgs):
    from stage1_extract.tokenize import tokenize_conversation

    tok = minicpm4_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == len(tok) - 8 and tok.eos_token_id == im_end  # the 73440-of-73448 layout
    ts = tokenize_conversation(tok, msgs, max_length=4096)
    ids, mask = ts.input_ids, ts.loss_mask
    runs = [[i for i, _ in g] for k, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if k]
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == want
    assert all(r[-1] == im_end for r in runs)  # <|im_end|> ends each trained turn...
    n_turns = sum(m["role"] != "assistant" for m in msgs)
    assert sum(1 for i, m in zip(ids, mask) if i == im_end and not m) == n_turns  # ...the others untrained
    assert 2 not in ids  # </s> is an eos for generation, never part of the template
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the template carries no <s>


# ------------------------------------------------------------------ both eos ids

def _force_next_token(d: Path, prompt_ids: list[int], token: int) -> None:
    """Swap two lm_head rows so that greedy decoding emits `token` right after the prompt."""
    from transformers import AutoModelForCausalLM

    from schemas import minicpm4

    minicpm4.prepare_load(d, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].argmax())
    sd = load_file(str(d / "model.safetensors"))
    w = sd["lm_head.weight"]
    w[[first, token]] = w[[token, first]]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(params=["generation_config_names_one", "config_names_one"])
def stops_with_eos2(tmp_path, request):
    """A MiniCPM4 whose first answer token to the prompt is </s> (id 2), the eos the tokenizer
    does not name. Either generation_config.json names only <|im_end|> (config.json both), or
    config.json names only <|im_end|> (generation_config.json both)."""
    d = tiny_minicpm4(tmp_path / "t", layers=4, hidden=64)
    tok = minicpm4_tokenizer()
    msgs = [{"role": "user", "content": "what is the capital of france"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    _force_next_token(d, ids, 2)
    name = "generation_config.json" if request.param == "generation_config_names_one" else "config.json"
    c = json.loads((d / name).read_text())
    c["eos_token_id"] = tok.eos_token_id
    (d / name).write_text(json.dumps(c))
    return d, msgs, ids


def test_regeneration_stops_at_either_eos(stops_with_eos2):
    from schemas.config import load_config
    from schemas.target import load_target
    from stage1_extract.regenerate import _generate, _stop_ids

    d, msgs, _ = stops_with_eos2
    cfg = load_config(raw={"name": "t", "target": {"path": str(d)}, "data": {"regenerate": {"max_new_tokens": 8}}})
    model, tok, _ = load_target(cfg.target)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _stop_ids(tok, model) == [2, im_end]
    assert _generate(model, tok, [msgs], cfg, seed=0) == [""]  # stopped at </s> at once


def test_stage3_stops_at_either_eos(stops_with_eos2):
    from schemas.config import TargetConfig
    from schemas.target import load_target
    from stage3_eval.evaluate import _eos_ids
    from stage3_eval.spec_decode import DecodeSettings, generate
    from stage3_eval.target_runner import TargetRunner

    d, _, ids = stops_with_eos2
    model, tok, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _eos_ids(tok, model) == {2, im_end}
    runner = TargetRunner(model, [2, 2, 1])
    res = generate(runner, None, ids, DecodeSettings(method="plain", max_new_tokens=8), eos_ids=_eos_ids(tok, model))
    assert res.tokens == [2] and res.stopped_by == "eos"
