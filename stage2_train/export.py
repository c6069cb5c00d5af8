"""Writing the head directory (DESIGN.md section 5) and exporting it for SGLang and vLLM.

One export serves both engines (there is no engine-specific variant to mix up).

Layer ids. Our heads record HF `output_hidden_states` indices: index i is the output
of decoder layer i-1, i.e. the residual stream *entering* decoder layer i.
* vLLM (0.32.0, vllm/v1/worker/gpu_model_runner.py:5268 and
  vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py:106) reads the TOP-LEVEL
  `eagle_aux_hidden_state_layer_ids` of the draft's config first, and only when it is
  absent falls back to `eagle_config.eagle_aux_hidden_state_layer_ids` taken as is
  (gpu_model_runner.py:5280). Its Llama records `hidden_states + residual` after
  decoder layer idx under id idx + 1 (vllm/model_executor/models/llama.py:436-441,
  interfaces.py:1601-1611): vLLM id = HF index.
* SGLang reads only `eagle_config.eagle_aux_hidden_state_layer_ids` and captures
  before layer id + 1 (python/sglang/srt/models/llama.py, `set_eagle3_layers_to_capture`:
  `layers_to_capture = [val + 1 for val in layer_ids]`; `LlamaModel.forward` appends
  `hidden_states + residual` before layer i when i is in layers_to_capture):
  SGLang id = HF index - 1.
So the export writes top-level ids = HF indices and `eagle_config` ids = HF - 1, and
keeps the HF ids in `eagle_config.hf_hidden_states_layer_ids` for stage 3. HF index 0
(the embeddings) cannot be captured by SGLang, and HF index L (after the final norm)
by neither engine: the export refuses such heads rather than write ids one engine misreads.
Both engines build q/k/v/o biases from `attention_bias` (vLLM llama_eagle3.py:84-93):
the export writes attention_bias/mlp_bias false, matching the bias-free weights.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from schemas.head import ARCHITECTURE, WEIGHT_KEYS, HeadError, check_servable, hf_layer_ids, load_head, save_head

ENGINES = ("sglang", "vllm")
EXPORT_CONVENTION = "sglang_layer_output_index (captured before layer id+1); top-level ids: HF index (vLLM)"
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


def export_config(config: dict, *, dtype: str, source: str) -> dict:
    """The config both engines read: vLLM's top-level ids, SGLang's eagle_config ids, our HF ids."""
    hf_ids = check_servable(config, source)
    n_layers = config.get("target_num_hidden_layers")
    ids = {engine: engine_layer_ids(hf_ids, engine, n_layers) for engine in ENGINES}
    cfg = copy.deepcopy(config)
    cfg.update(architectures=[ARCHITECTURE], torch_dtype=dtype, attention_bias=False, mlp_bias=False)
    cfg["eagle_aux_hidden_state_layer_ids"] = ids["vllm"]
    cfg["eagle_config"] = {**(cfg.get("eagle_config") or {}),
                           "eagle_aux_hidden_state_layer_ids": ids["sglang"],
                           "layer_id_convention": EXPORT_CONVENTION,
                           "hf_hidden_states_layer_ids": hf_ids}
    cfg["export"] = {"from": source, "engines": list(ENGINES), "hf_hidden_states_layer_ids": hf_ids,
                     "vllm_layer_ids": ids["vllm"], "sglang_layer_ids": ids["sglang"]}
    return cfg


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


def export_head(head_dir: str | Path, engine: str | None, out_dir: str | Path, *, dtype: str = "bfloat16",
                verifier: str | None = None, speculative_tokens: int = 3) -> Path:
    """Write a copy of the head that SGLang and vLLM both load correctly; check what was written.

    `engine` is accepted for compatibility ("sglang", "vllm" or None): the export is the
    same for every value, so an export made "for" one engine is right in the other.
    "speculators" writes the speculators library's layout instead (vLLM only; needs
    `verifier`, the target vLLM serves): stage2_train.export_speculators.
    """
    if engine is not None and engine not in ENGINES + ("speculators",):
        raise HeadError(f"export: unknown engine '{engine}' (choose from {', '.join(ENGINES)}, speculators, or "
                        "leave it out: one export serves both engines)")
    if engine == "speculators":
        from stage2_train.export_speculators import check_options

        check_options(verifier, speculative_tokens)  # before anything is written
    config, tensors = load_head(head_dir)
    check_tensors(tensors, config, str(head_dir))
    if Path(out_dir).resolve() == Path(head_dir).resolve():
        raise HeadError("export: OUT must differ from the head directory")
    if dtype not in DTYPES:
        raise HeadError(f"export: dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    cfg = export_config(config, dtype=dtype, source=str(Path(head_dir) / "config.json"))
    out_t = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in tensors.items()}
    from schemas.dirkind import mark
    from schemas.head import check_export_dir

    check_export_dir(out_dir, force=True)  # only an earlier export is overwritten (the CLI also wants --force)
    mark(out_dir, "export", "eagle3 export")  # what later --force may overwrite
    save_head(out_dir, out_t, cfg)
    # Read back what was written: layout, shapes, both id fields and the HF ids stage 3 uses.
    c2, t2 = load_head(out_dir)
    check_tensors(t2, c2, str(out_dir))
    hf = cfg["eagle_config"]["hf_hidden_states_layer_ids"]
    if (c2["eagle_aux_hidden_state_layer_ids"] != hf or hf_layer_ids(c2) != hf
            or c2["eagle_config"]["eagle_aux_hidden_state_layer_ids"] != [i - 1 for i in hf]):
        raise HeadError(f"{out_dir}: layer ids were not written as HF {hf} / SGLang {[i - 1 for i in hf]}")
    if engine == "speculators":
        from stage2_train.export_speculators import to_speculators

        to_speculators(out_dir, verifier=str(verifier), speculative_tokens=speculative_tokens)
    from stage2_train.model_card import write_model_card  # README.md beside the weights (Hub model card)
    write_model_card(out_dir, head_dir, c2)
    return Path(out_dir)
