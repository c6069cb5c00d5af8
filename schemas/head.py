"""The draft head on disk (DESIGN.md section 5): config.json + model.safetensors.

The layout is the one SGLang and vLLM load for EAGLE-3 heads. `embed_tokens` is
never saved: the head borrows the target's embedding at serve time.

Two config flavours, both loadable by stage 3 (`hf_layer_ids` reads either):
* ours (train.output): `eagle_config.eagle_aux_hidden_state_layer_ids` are HF
  `output_hidden_states` indices, `eagle_config.layer_id_convention` = "hf_hidden_states_index";
* exported (`eagle3 export`, stage2_train.export): top-level ids = HF indices (vLLM),
  `eagle_config` ids = HF - 1 (SGLang), `eagle_config.hf_hidden_states_layer_ids` = HF.
Both carry `ttt_position_rule` = "t+k": TTT step k (draft depth k) is rotated at
position t + k. Heads without it were trained with another rule and are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"
ARCHITECTURE = "LlamaForCausalLMEagle3"

WEIGHT_KEYS = (
    "fc.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)

# Fields copied from the target's config into the head's (all overridable).
TARGET_FIELDS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "hidden_act", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)

# Rotary rule of the training-time-test unroll, recorded in every head's config.
POSITION_RULE_KEY = "ttt_position_rule"
POSITION_RULE = "t+k"
HF_CONVENTION = "hf_hidden_states_index"


class HeadError(RuntimeError):
    pass


def make_head_config(target_config: dict, *, draft_vocab_size: int, layer_ids: list[int],
                     overrides: Optional[dict] = None, training: Optional[dict] = None) -> dict:
    """A Llama config describing the one-layer EAGLE-3 head for this target."""
    cfg: dict[str, Any] = {k: target_config[k] for k in TARGET_FIELDS if target_config.get(k) is not None}
    # Families whose rope fields live under another name (older configs): keep theta.
    if "rope_parameters" in cfg and "rope_theta" not in cfg:
        theta = (cfg["rope_parameters"] or {}).get("rope_theta")
        if theta is not None:
            cfg["rope_theta"] = theta
    cfg.setdefault("head_dim", target_config["hidden_size"] // target_config["num_attention_heads"])
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    cfg.setdefault("hidden_act", "silu")
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg["tie_word_embeddings"] = False
    # Engines build biases from these flags (vLLM llama_eagle3.py reads attention_bias); the head has none.
    cfg["attention_bias"] = False
    cfg["mlp_bias"] = False
    cfg.update({
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "draft_vocab_size": int(draft_vocab_size),
        "target_hidden_size": int(target_config["hidden_size"]),
        "target_model_type": target_config.get("model_type"),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids),
                         "layer_id_convention": HF_CONVENTION},
        POSITION_RULE_KEY: POSITION_RULE,
    })
    for flag in ("attention_bias", "mlp_bias"):
        if (overrides or {}).get(flag):
            raise HeadError(f"model override {flag}: true is not supported: EAGLE-3 heads have no biases "
                            "(SGLang and vLLM load none)")
    cfg.update(overrides or {})
    if training is not None:
        cfg["training"] = training
    return cfg


def save_head(out_dir: str | Path, tensors: dict, config: dict) -> Path:
    """Write config.json + model.safetensors; checks the key set first."""
    from safetensors.torch import save_file

    keys = set(tensors)
    missing, extra = set(WEIGHT_KEYS) - keys, keys - set(WEIGHT_KEYS)
    if missing or extra:
        raise HeadError(f"head tensors do not match the layout: missing {sorted(missing)}, extra {sorted(extra)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (HEAD_WEIGHTS + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk in its own words
        tmp.unlink(missing_ok=True)
        from schemas.disk import disk_full, looks_disk_full

        if looks_disk_full(e, out):
            raise disk_full(e, out / HEAD_WEIGHTS, "the head there is unchanged") from e
        raise
    tmp.replace(out / HEAD_WEIGHTS)
    (out / HEAD_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False))
    return out


def check_export_dir(out_dir: str | Path, force: bool = False) -> None:
    """Where `eagle3 export` may write: a new or empty directory, or (with force) an earlier export of ours.

    What OUT is comes from schemas.dirkind: an export is recognised by the marker the
    export writes (or, for exports made before markers, the `export` block of its
    config.json). A trained head, a model's directory (weights or another config.json,
    a stray model.safetensors included), a cache or anyone else's files are never
    written into, force or not.
    """
    from schemas.dirkind import classify

    d = classify(out_dir)
    if d.kind in ("missing", "empty"):
        return
    if d.kind == "export":
        if not force:
            raise HeadError(f"export: {out_dir} is not empty; pass --force to overwrite the export there "
                            f"(or choose a new directory)")
        return
    what = {"file": "is a file", "head": "holds a trained head (a train.output, not an export)",
            "model": "holds a model", "cache": "holds an eagle3 cache", "sweep": "holds a sweep"}.get(
        d.kind, "holds files eagle3 did not write")
    raise HeadError(f"export: {out_dir} {what} ({d.why}); refusing to write into it, even with --force "
                    f"(--force overwrites only an earlier export). Choose a new directory")


def load_head(head_dir: str | Path) -> tuple[dict, dict]:
    """(config, tensors) of a head directory, checked against the layout."""
    from safetensors.torch import load_file

    d = Path(head_dir)
    if not (d / HEAD_CONFIG).is_file() or not (d / HEAD_WEIGHTS).is_file():
        raise HeadError(f"{d} is not a head directory (needs {HEAD_CONFIG} and {HEAD_WEIGHTS})")
    try:
        config = json.loads((d / HEAD_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HeadError(f"{d / HEAD_CONFIG}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise HeadError(f"{d / HEAD_CONFIG}: not a JSON object")
    tensors = load_file(str(d / HEAD_WEIGHTS))
    missing = set(WEIGHT_KEYS) - set(tensors)
    if missing:
        raise HeadError(f"{d / HEAD_WEIGHTS}: missing tensors {sorted(missing)}")
    if ARCHITECTURE not in config.get("architectures", []):
        raise HeadError(f"{d / HEAD_CONFIG}: architectures must include {ARCHITECTURE}")
    from schemas.finite import tensor_nonfinite

    bad = tensor_nonfinite(tensors)
    if bad:  # a head trained into NaN drafts garbage that verification silently rejects
        raise HeadError(f"{d / HEAD_WEIGHTS}: non-finite weights (inf/NaN) in {', '.join(bad[:4])}"
                        f"{' and more' if len(bad) > 4 else ''}; the head is unusable: retrain it")
    return config, tensors


def hf_layer_ids(config: dict) -> list[int]:
    """The head's aux layer ids as HF `output_hidden_states` indices, from either flavour."""
    ec = config.get("eagle_config") or {}
    if "hf_hidden_states_layer_ids" in ec:  # an exported head keeps the HF ids here
        return [int(i) for i in ec["hf_hidden_states_layer_ids"]]
    conv = ec.get("layer_id_convention", HF_CONVENTION)
    if conv == HF_CONVENTION:
        return [int(i) for i in ec.get("eagle_aux_hidden_state_layer_ids", [])]
    raise HeadError(f"head layer ids use the '{conv}' convention and do not record the HF ids")


def check_servable(config: dict, where: str) -> list[int]:
    """Refuse a head stage 3 would draft with wrongly; returns its HF layer ids.

    A head must record the rotary rule it was trained with (POSITION_RULE) and its
    3 aux layer ids in a known convention.
    """
    rule = config.get(POSITION_RULE_KEY)
    if rule != POSITION_RULE:
        got = "has none" if rule is None else f"is {rule!r}"
        raise HeadError(f"{where}: {POSITION_RULE_KEY} {got}; this version drafts TTT step k at position t + k "
                        f"('{POSITION_RULE}', as SGLang and vLLM serve it). Heads trained before that rule rotated "
                        f"every step at t: retrain the head (eagle3 train)")
    ids = hf_layer_ids(config)
    if len(ids) != 3:
        raise HeadError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids must list 3 layer ids, got {ids!r}")
    return ids
