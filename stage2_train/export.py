"""Writing the head directory (DESIGN.md section 5) and exporting it for a serving engine.

Layer ids. Our heads record HF `output_hidden_states` indices: index i is the output
of decoder layer i-1, i.e. the residual stream *entering* decoder layer i.
* vLLM captures `hidden_states + residual` before decoder layer `idx` for every
  idx in `eagle_aux_hidden_state_layer_ids` (read from the top level of the draft's
  config): an id is a layer *input*, so vLLM id = HF index, valid for 0..L-1.
* SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids`, treats explicit ids
  as layer *outputs* and captures before layer `id + 1`: SGLang id = HF index - 1,
  valid for HF indices 1..L-1.
HF index L (the last layer's output) cannot be captured by either engine.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from schemas.head import ARCHITECTURE, WEIGHT_KEYS, HeadError, load_head, save_head
from stage2_train.evaluate import hf_layer_ids

ENGINES = ("sglang", "vllm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write_head(model, out_dir: str | Path, training: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """The trained head as config.json + model.safetensors (no embedding, no rotary buffers)."""
    tensors = model.head_state_dict()
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    config = copy.deepcopy(model.config)
    fl = [v for v in tensors.values() if v.is_floating_point()]
    config["torch_dtype"] = str(fl[0].dtype).replace("torch.", "") if fl else "float32"
    if training is not None:
        config["training"] = training
    return save_head(out_dir, tensors, config)


def engine_layer_ids(hf_ids: list[int], engine: str, num_layers: int | None) -> list[int]:
    """HF hidden_states indices -> the ids an engine expects in the draft's config."""
    if engine not in ENGINES:
        raise HeadError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    lo = 1 if engine == "sglang" else 0
    hi = (num_layers - 1) if num_layers else None
    for i in hf_ids:
        if i < lo or (hi is not None and i > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise HeadError(f"layer id {i} (HF hidden_states index) cannot be captured by {engine}: "
                            f"it captures HF indices {rng} for this target ({num_layers} layers)")
    return [i - 1 for i in hf_ids] if engine == "sglang" else list(hf_ids)


def check_tensors(tensors: dict, config: dict, where: str) -> None:
    """Key set and shapes of the serving layout (what SGLang/vLLM load)."""
    keys = set(tensors)
    if keys != set(WEIGHT_KEYS):
        raise HeadError(f"{where}: keys differ from the EAGLE-3 layout: missing {sorted(set(WEIGHT_KEYS) - keys)}, "
                        f"extra {sorted(keys - set(WEIGHT_KEYS))}")
    h = int(config["hidden_size"])
    th = int(config.get("target_hidden_size", h))
    nh, nkv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads", config["num_attention_heads"]))
    hd = int(config.get("head_dim") or h // nh)
    inter, N, V = int(config["intermediate_size"]), int(config["draft_vocab_size"]), int(config["vocab_size"])
    want = {
        "fc.weight": (h, 3 * th),
        "midlayer.self_attn.q_proj.weight": (nh * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, nh * hd),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (N, h),
        "d2t": (N,),
        "t2d": (V,),
    }
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise HeadError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the config implies {shape}")
    if tensors["d2t"].dtype != torch.int64 or tensors["t2d"].dtype != torch.bool:
        raise HeadError(f"{where}: d2t must be int64 and t2d bool (got {tensors['d2t'].dtype}, {tensors['t2d'].dtype})")
    if int(tensors["t2d"].sum()) != N:
        raise HeadError(f"{where}: t2d marks {int(tensors['t2d'].sum())} tokens but draft_vocab_size is {N}")


def export_head(head_dir: str | Path, engine: str, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write a copy of the head with the engine's layer-id convention and dtype; check what was written."""
    config, tensors = load_head(head_dir)
    check_tensors(tensors, config, str(head_dir))
    if Path(out_dir).resolve() == Path(head_dir).resolve():
        raise HeadError("export: OUT must differ from the head directory")
    if dtype not in DTYPES:
        raise HeadError(f"export: dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    hf_ids = hf_layer_ids(config)
    ids = engine_layer_ids(hf_ids, engine, config.get("target_num_hidden_layers"))
    cfg = copy.deepcopy(config)
    cfg["architectures"] = [ARCHITECTURE]
    cfg["torch_dtype"] = dtype
    conv = "layer_output_index (captured before layer id+1)" if engine == "sglang" else \
        "layer_input_index (captured before layer id)"
    cfg["eagle_config"] = {**(cfg.get("eagle_config") or {}), "eagle_aux_hidden_state_layer_ids": ids,
                           "layer_id_convention": f"{engine}:{conv}", "hf_hidden_states_layer_ids": hf_ids}
    if engine == "vllm":
        cfg["eagle_aux_hidden_state_layer_ids"] = ids  # vLLM reads the top-level field
    else:
        cfg.pop("eagle_aux_hidden_state_layer_ids", None)
    cfg["export"] = {"engine": engine, "from": str(head_dir), "hf_hidden_states_layer_ids": hf_ids,
                     "engine_layer_ids": ids}
    out_t = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in tensors.items()}
    from schemas.head import check_export_dir

    check_export_dir(out_dir, force=True)  # never into a model's directory (the CLI also wants --force)
    save_head(out_dir, out_t, cfg)
    # Read back what was written: layout, shapes and ids.
    c2, t2 = load_head(out_dir)
    check_tensors(t2, c2, str(out_dir))
    if c2["eagle_config"]["eagle_aux_hidden_state_layer_ids"] != ids:
        raise HeadError(f"{out_dir}: layer ids were not written as {ids}")
    return Path(out_dir)
