"""The native MiniCPM4 (schemas/minicpm4.py): against a forward written here, weight names,
longrope beyond the original length, KV cache, bad configs, remote-code failures, and the
transformers pieces it is built on (so a future transformers that changes them fails here)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from schemas import minicpm4
from schemas.config import TargetConfig
from schemas.target import TargetError, load_target
from tiny import minicpm4_config_dict, minicpm4_tokenizer, write_minicpm4

ROOT = Path(__file__).resolve().parent.parent

# The public MiniCPM4 checkpoints' tensor names (model.safetensors.index.json of
# openbmb/MiniCPM4-8B; the same names vLLM's and GPTQModel's MiniCPM loaders read).
REAL_NAMES_LAYER0 = {
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
}
REAL_NAMES_MODEL = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """4 layers, hidden 64, 4 heads / 2 KV heads, longrope with original length 48 of 256."""
    d = tmp_path_factory.mktemp("mc4")
    cfg = minicpm4_config_dict(200, layers=4, hidden=64, heads=4, kv_heads=2, max_pos=256, original=48, seed=3)
    write_minicpm4(d, cfg, seed=3)
    return d, cfg


def load(d, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    assert minicpm4.prepare_load(d, trust_remote_code=False)
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation=attn).eval()


# ----------------------------------------------------------------- the reference forward

def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * cos + rot * sin


def reference_forward(sd: dict, cfg: dict, ids: torch.Tensor):
    """MiniCPM4 written out from its definition: (logits [T, V], hidden states [L+1] of [T, H])."""
    H, nh, nkv, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd, eps, T = H // nh, cfg["rms_norm_eps"], ids.numel()
    rs = cfg["rope_scaling"]
    orig, maxp = rs["original_max_position_embeddings"], cfg["max_position_embeddings"]
    factors = torch.tensor(rs["long_factor"] if T > orig else rs["short_factor"], dtype=torch.float64)
    inv = 1.0 / (factors * cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    scale = maxp / orig
    mscale = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
    cos = (torch.cat((ang, ang), -1).cos() * mscale).float()
    sin = (torch.cat((ang, ang), -1).sin() * mscale).float()
    branch = cfg["scale_depth"] / math.sqrt(L)

    x = sd["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    hs = [x]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for n in range(L):
        p = lambda k: sd[f"model.layers.{n}.{k}.weight"]  # noqa: E731
        a = rms(x, p("input_layernorm"), eps)
        q = (a @ p("self_attn.q_proj").T).view(T, nh, hd).transpose(0, 1)
        k = (a @ p("self_attn.k_proj").T).view(T, nkv, hd).transpose(0, 1)
        v = (a @ p("self_attn.v_proj").T).view(T, nkv, hd).transpose(0, 1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        x = x + (att.transpose(0, 1).reshape(T, H) @ p("self_attn.o_proj").T) * branch
        m = rms(x, p("post_attention_layernorm"), eps)
        x = x + ((F.silu(m @ p("mlp.gate_proj").T) * (m @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T) * branch
        hs.append(x)
    h = rms(x, sd["model.norm.weight"], eps)
    hs[-1] = h  # HF's last hidden state is after the final norm
    logits = (h / (H / cfg["dim_model_base"])) @ sd["lm_head.weight"].T
    return logits, hs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("T", [20, 100])  # 100 > original 48: long factors
def test_forward_matches_reference(ckpt, attn, T):
    d, cfg = ckpt
    model = load(d, attn)
    sd = load_file(str(d / "model.safetensors"))
    ids = torch.randint(3, cfg["vocab_size"], (T,), generator=torch.Generator().manual_seed(T))
    want_logits, want_hs = reference_forward(sd, cfg, ids)
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == cfg["num_hidden_layers"] + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, want_hs)):
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4, msg=f"hidden_states[{i}]")
    torch.testing.assert_close(out.logits[0], want_logits, rtol=1e-4, atol=1e-4)


def test_padded_batch_rows_equal_single_sequences(ckpt):
    """Extraction runs right-padded batches: each row's valid positions equal its own forward."""
    d, cfg = ckpt
    model = load(d)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 200, (20,), generator=g), torch.randint(3, 200, (12,), generator=g)
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :12], mask[1, :12] = b, 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for row, seq in ((0, a), (1, b)):
            one = model(input_ids=seq[None], output_hidden_states=True, use_cache=False)
            n = seq.numel()
            torch.testing.assert_close(out.logits[row, :n], one.logits[0], rtol=1e-4, atol=1e-4)
            for i in (2, 3):
                torch.testing.assert_close(out.hidden_states[i][row, :n], one.hidden_states[i][0], rtol=1e-4,
                                           atol=1e-4)


def test_longrope_switches_factor_set_at_original_length(ckpt):
    """Sequences of exactly `original` tokens use the short factors; one more token, the long ones."""
    d, cfg = ckpt
    model = load(d)
    sd = load_file(str(d / "model.safetensors"))
    orig = cfg["rope_scaling"]["original_max_position_embeddings"]
    ids = torch.randint(3, cfg["vocab_size"], (orig + 1,), generator=torch.Generator().manual_seed(1))
    for T in (orig, orig + 1):
        want, _ = reference_forward(sd, cfg, ids[:T])
        with torch.no_grad():
            got = model(input_ids=ids[None, :T], use_cache=False).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the two factor sets really differ at the shared prefix
    with torch.no_grad():
        a = model(input_ids=ids[None, :orig], use_cache=False).logits[0]
        b = model(input_ids=ids[None, :orig + 1], use_cache=False).logits[0, :orig]
    assert (a - b).abs().max() > 1e-2


def test_kv_cache_decoding_equals_full_forward(ckpt):
    d, cfg = ckpt
    model = load(d)
    from transformers import DynamicCache
    ids = torch.randint(3, cfg["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0]
        cache = DynamicCache(config=model.config)
        parts = [model(input_ids=ids[:, :17], cache=cache, use_cache=True).logits[0]]
        for t in range(17, 30):
            parts.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[0])
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 30
    assert cache.layers[0].keys.shape[1] == cfg["num_key_value_heads"]  # GQA: 2 KV heads cached, not 4


def test_loads_the_checkpoint_names_unchanged(ckpt):
    d, cfg = ckpt
    names = set(load_file(str(d / "model.safetensors")))
    L = cfg["num_hidden_layers"]
    assert REAL_NAMES_MODEL | REAL_NAMES_LAYER0 <= names
    assert names == set(minicpm4.checkpoint_weight_names(L))
    model = load(d)
    assert set(model.state_dict()) == names
    sd = load_file(str(d / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_native_model_is_picked_for_minicpm_without_remote_code(tmp_path):
    d = write_minicpm4(tmp_path / "t", minicpm4_config_dict(200), tok=minicpm4_tokenizer())
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "minicpm" and "rope_scaling" in cfg and "rope_parameters" not in cfg
    model, tok, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    assert type(model).__name__ == "MiniCPM4ForCausalLM"
    assert model.config._attn_implementation == "sdpa"
    assert model.model.embed_tokens.embed_scale.item() == 12.0


def test_shipped_minicpm4_config_uses_the_native_model_and_regenerates():
    from schemas.config import load_config

    cfg = load_config(ROOT / "configs" / "minicpm4-8b.yaml")
    assert cfg.target.trust_remote_code is False
    assert cfg.data.regenerate.enabled is True
    assert cfg.extract.layers in ("auto", [2, 16, 29])


# ----------------------------------------------------------------- bad input

def _write_cfg(tmp_path, **changes):
    d = tmp_path / "bad"
    cfg = minicpm4_config_dict(200)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write_minicpm4(d, minicpm4_config_dict(200), tok=minicpm4_tokenizer())
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes,field", [
    ({"q_lora_rank": 768, "kv_lora_rank": 256}, "'q_lora_rank'"),
    ({"kv_lora_rank": 256}, "'kv_lora_rank'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'rope_scaling.rope_type' = 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'rope_scaling.rope_type' = 'dynamic'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "'rope_scaling.original_max_position_embeddings' is required"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8,
                       "original_max_position_embeddings": 64}}, "'rope_scaling.short_factor' has 3 values"),
    ({"kv_channels": 32}, "'kv_channels' = 32"),
    ({"use_mup": False}, "'use_mup' = false"),
])
def test_unsupported_fields_are_named(tmp_path, changes, field):
    d = _write_cfg(tmp_path, **changes)
    with pytest.raises(TargetError) as e:
        load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    assert field in str(e.value) and str(d / "config.json") in str(e.value)


def test_sparse_config_warns_and_runs_dense(tmp_path):
    d = _write_cfg(tmp_path, sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1,
                                            "block_size": 64, "window_size": 2048, "topk": 64,
                                            "dense_len": 8192})
    with pytest.warns(UserWarning, match="'sparse_config' is set .*dense attention"):
        model, _, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    assert model.config.sparse_config["topk"] == 64


def test_remote_code_that_fails_to_import_is_explained(tmp_path):
    """MiniCPM4's remote code imports transformers.modeling_attn_mask_utils, which transformers 5.0-5.24
    lack (5.25 brought it back): the fake remote code imports a module no version has, so the test
    does not depend on which transformers pip picks."""
    d = _write_cfg(tmp_path, auto_map={"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                                       "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"})
    (d / "configuration_minicpm.py").write_text(
        "from transformers import LlamaConfig\n\nclass MiniCPMConfig(LlamaConfig):\n    model_type = 'minicpm'\n")
    (d / "modeling_minicpm.py").write_text(
        "from transformers.eagle3_module_no_version_has import _prepare_4d_causal_attention_mask\n"
        "from transformers import LlamaForCausalLM\n\nclass MiniCPMForCausalLM(LlamaForCausalLM):\n    pass\n")
    with pytest.raises(TargetError) as e:
        load_target(TargetConfig(path=str(d), dtype="float32", device="cpu", trust_remote_code=True))
    msg = str(e.value)
    assert "import of 'transformers.eagle3_module_no_version_has' failed" in msg
    assert "trust_remote_code: false" in msg and "native MiniCPM4" in msg
    # and the same directory loads natively without remote code
    model, _, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu", trust_remote_code=False))
    assert type(model).__name__ == "MiniCPM4ForCausalLM"


# ----------------------------------------------------------------- the transformers contract

def test_transformers_provides_what_the_native_model_relies_on():
    """Fails loudly when a transformers upgrade moves what schemas/minicpm4.py builds on."""
    import inspect

    import transformers
    from packaging.version import Version
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update  # noqa: F401
    from transformers.models.llama import modeling_llama as ml

    v = Version(transformers.__version__)
    assert Version("5.24") <= v < Version("6"), f"transformers {v} is outside the tested range (pyproject)"
    assert "longrope" in ROPE_INIT_FUNCTIONS
    for fn in (ml.LlamaModel.forward, ml.LlamaDecoderLayer.forward, ml.LlamaAttention.forward):
        assert "cache" in inspect.signature(fn).parameters, f"{fn.__qualname__} no longer takes `cache`"
    assert set(inspect.signature(ml.LlamaDecoderLayer.__init__).parameters) >= {"config", "layer_idx"}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    assert isinstance(CONFIG_MAPPING._extra_content, dict)  # minicpm4.unregister()
    assert isinstance(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, dict)
    # LlamaModel.forward must use the modules the native model replaces, by these names
    src = inspect.getsource(ml.LlamaModel.forward)
    for name in ("self.embed_tokens(", "self.layers", "self.norm(", "self.rotary_emb("):
        assert name in src, f"LlamaModel.forward no longer calls {name}"


# ----------------------------------------------------------------- the independent oracle (vLLM)

def _oracle_python():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from minicpm4_oracle import oracle_python
    finally:
        sys.path.pop(0)
    return oracle_python()


@pytest.mark.vllm
@pytest.mark.slow
def test_against_vllm_minicpm(tmp_path):
    """vLLM's `minicpm` in its own venv; 4 layers, hidden 256, longrope original 64, lengths 32 and 160."""
    if _oracle_python() is None:
        pytest.skip("no vLLM oracle venv (`make vllm` or EAGLE3_VLLM_PYTHON)")
    out = tmp_path / "oracle.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/minicpm4_oracle.py"), "--json", str(out), "--tol", "1e-3"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert set(rep["lengths"]) == {"32", "160"}
    assert rep["lengths"]["32"]["rope"] == "short" and rep["lengths"]["160"]["rope"] == "long"
    for res in rep["lengths"].values():
        assert res["top_order_equal"]
        assert res["logprob_max_abs"] < 1e-3 and res["logits_max_abs"] < 1e-3
        for k in ("hidden[1]*_max_rel", "hidden[2]*_max_rel"):  # [2, L//2, L-3] = [2, 2, 1] for L = 4
            assert res[k] < 1e-4
