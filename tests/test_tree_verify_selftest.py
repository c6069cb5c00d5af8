"""W3/W4: tree verification takes the 4D tree mask whatever attention the target was
loaded with (flash-attention would read it as padding: tree passes switch to sdpa),
and a start-up check against sequential decoding picks the mask encoding that works
(transformers' additive one, or the 1 = attend one that legacy remote code inverts
itself) and refuses targets where none does."""
from __future__ import annotations

import functools

import pytest
import torch

from spec_helpers import OracleDrafter, greedy_reference, make_head, tiny_layer_ids
from stage3_eval import target_runner as tr_mod
from stage3_eval.draft_runner import DraftRunner
from stage3_eval.spec_decode import DecodeSettings, generate
from stage3_eval.target_runner import TargetRunError, TargetRunner

PROMPT = [5, 17, 33, 60, 61, 9, 100, 101]
CAUSAL_ONLY = "eagle3_test_causal_only"


def _causal_only_attention(module, query, key, value, attention_mask, **kw):
    """Like flash-attention given a 4D mask: ignores it, causal (bottom-right) over the cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, S = query.shape[2], key.shape[2]
    causal = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)[None, None]
    return sdpa_attention_forward(module, query, key, value, causal, **kw)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _load(tiny_llama_dir, attn):
    import transformers as tf
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_ONLY, _causal_only_attention)
    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                                   attn_implementation=attn).eval()


def _inverting(model):
    """A target whose forward inverts a 4D mask like the legacy _prepare_4d_causal_attention_mask
    helpers (they expect 1 = attend): the additive 0/-inf tree mask becomes 'all masked'."""
    orig = model.forward

    @functools.wraps(orig)
    def forward(*args, **kw):
        am = kw.get("attention_mask")
        if am is not None and am.dim() == 4:
            inverted = 1.0 - am
            kw["attention_mask"] = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(am.dtype).min)
        return orig(*args, **kw)

    model.forward = forward
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_check_passes_with_mask_reading_attention(tiny_llama_dir, attn):
    res = TargetRunner(_load(tiny_llama_dir, attn)).check_tree_verify(PROMPT)
    assert res["ok"] and res["rel_diff"] < 1e-4 and res["tree_attn_implementation"] == attn


def test_flash_like_target_verifies_trees_with_sdpa(tiny_llama_dir):
    """Loaded with an implementation that ignores 4D masks: tree passes switch to sdpa, the
    output is lossless, and the model is left with its own implementation afterwards."""
    m = _load(tiny_llama_dir, CAUSAL_ONLY)
    runner = TargetRunner(m, tiny_layer_ids(m))
    res = runner.check_tree_verify(PROMPT)
    assert res["ok"] and res["tree_attn_implementation"] == "sdpa"
    ref = greedy_reference(m, PROMPT, 20)
    # an oracle drafter gets whole paths accepted, so wrong node rows would show (at edbc6e1
    # the verified tokens differ from the reference and the oracle's commit check fails)
    for dr in (OracleDrafter(ref, m.config.vocab_size), DraftRunner(make_head(m, seed=3))):
        r = generate(runner, dr, PROMPT, DecodeSettings(method="tree", top_k=3, depth=3, total_tokens=8,
                                                        max_new_tokens=20), eos_ids=set())
        assert r.tokens == ref[len(PROMPT):]
    assert m.config._attn_implementation == CAUSAL_ONLY
    assert all(getattr(mod, "config", m.config)._attn_implementation == CAUSAL_ONLY for mod in m.modules()
               if hasattr(getattr(mod, "config", None), "_attn_implementation_internal"))


def test_check_refuses_attention_that_ignores_the_mask(tiny_llama_dir, monkeypatch):
    m = _load(tiny_llama_dir, CAUSAL_ONLY)
    monkeypatch.setattr(tr_mod, "MASK_ATTN", tr_mod.MASK_ATTN + (CAUSAL_ONLY,))  # as if it read masks
    runner = TargetRunner(m)
    with pytest.raises(TargetRunError, match=r"tree verification disagrees with sequential decoding on a 6-node "
                                             r"test tree with every mask convention \(additive: rows \[2, .*binary: "
                                             r".*attn_implementation='eagle3_test_causal_only'"):
        runner.check_tree_verify(PROMPT)
    assert runner.tree_check["ok"] is False and runner.mask_convention == "additive"


def test_legacy_inverting_target_gets_the_binary_convention(tiny_llama_dir):
    """Remote code that inverts a 4D mask (expects 1 = attend): the check finds that the
    additive mask is wrong there, keeps the 1 = attend encoding, and trees are lossless."""
    m = _inverting(_load(tiny_llama_dir, "sdpa"))
    runner = TargetRunner(m, tiny_layer_ids(m))
    res = runner.check_tree_verify(PROMPT)
    assert res["ok"] and runner.mask_convention == "binary"
    assert res["tried"]["additive"] > 0.1 and res["tried"]["binary"] < 1e-4
    ref = greedy_reference(m, PROMPT, 20)
    r = generate(runner, OracleDrafter(ref, m.config.vocab_size), PROMPT,
                 DecodeSettings(method="tree", top_k=3, depth=3, total_tokens=8, max_new_tokens=20), eos_ids=set())
    assert r.tokens == ref[len(PROMPT):] and sum(r.accept_lengths) > 10
    # the same encoding on a target that does not invert is caught
    plain = TargetRunner(_load(tiny_llama_dir, "sdpa"))
    plain.mask_convention = "binary"
    assert not plain._compare_tree_with_sequential(PROMPT, 1e-3)["ok"]


def _eval_cfg(tmp_path, tiny_llama_dir, m, methods):
    from schemas.config import load_config
    from schemas.head import save_head
    from tiny import write_jsonl

    head = make_head(m)
    hd = save_head(tmp_path / "head", head.head_state_dict(), head.config)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello! How can I help you?"}])
    raw = {"target": {"path": str(tiny_llama_dir)}, "extract": {"cache": str(tmp_path / "nocache")},
           "eval": {"head": str(hd), "prompts": [str(prompts)], "method": methods, "max_new_tokens": 6,
                    "warmup": 0, "repeats": 1, "offline": False, "output": str(tmp_path / "out")}}
    return load_config(raw=raw)


def test_eval_refuses_to_run_when_no_mask_convention_works(tmp_path, tiny_llama_dir, monkeypatch):
    import transformers as tf

    from stage3_eval.evaluate import run_eval

    m = _load(tiny_llama_dir, CAUSAL_ONLY)
    monkeypatch.setattr(tr_mod, "MASK_ATTN", tr_mod.MASK_ATTN + (CAUSAL_ONLY,))
    tok = tf.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    with pytest.raises(TargetRunError, match="tree verification disagrees"):
        run_eval(_eval_cfg(tmp_path, tiny_llama_dir, m, ["chain", "tree"]), progress=False, model_tok=(m, tok))
    assert not (tmp_path / "out").exists()
    # chains pass no mask: the same target evaluates fine with method chain
    rep = run_eval(_eval_cfg(tmp_path, tiny_llama_dir, m, ["chain"]), progress=False, model_tok=(m, tok))
    assert rep["tree_verify_check"] is None and rep["heads"][0]["methods"][0]["lossless"] is True


def test_eval_on_a_legacy_inverting_target(tmp_path, tiny_llama_dir):
    import transformers as tf

    from stage3_eval.evaluate import run_eval

    m = _inverting(_load(tiny_llama_dir, "sdpa"))
    tok = tf.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rep = run_eval(_eval_cfg(tmp_path, tiny_llama_dir, m, ["tree"]), progress=False, model_tok=(m, tok))
    assert rep["tree_verify_check"]["mask_convention"] == "binary"
    assert rep["heads"][0]["methods"][0]["lossless"] is True


def test_auto_attention_gives_remote_code_sdpa(tmp_path, monkeypatch):
    """flash-attention for native models on CUDA (tree passes switch per call); remote code
    builds its attention classes at load time and cannot switch, so it gets sdpa."""
    import importlib.util
    import json

    from schemas.config import TargetConfig
    from schemas.target import pick_attn

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    cuda = torch.device("cuda")
    native, remote = tmp_path / "native", tmp_path / "remote"
    for d, extra in ((native, {}), (remote, {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "x", **extra}))
    assert pick_attn(TargetConfig(path="x"), cuda, native) == "flash_attention_2"
    assert pick_attn(TargetConfig(path="x", trust_remote_code=True), cuda, remote) == "sdpa"
    assert pick_attn(TargetConfig(path="x", trust_remote_code=True), cuda, native) == "flash_attention_2"
    assert pick_attn(TargetConfig(path="x", attn_implementation="flash_attention_2", trust_remote_code=True),
                     cuda, remote) == "flash_attention_2"  # an explicit choice is kept
    assert pick_attn(TargetConfig(path="x"), torch.device("cpu"), native) == "sdpa"
