"""`eagle3 export --to speculators`: the head in the `speculators` library's config layout.

vLLM recognises this layout by its `speculators_config` block
(vllm/transformers_utils/config.py:787-811 in vLLM 0.32.0): `vllm serve OUT` then runs
the verifier named in the config as the target and the head as its EAGLE-3 drafter.
vLLM builds the draft's config from `transformer_layer_config` plus the top-level
`draft_vocab_size`, `target_hidden_size`, `norm_before_residual` (default TRUE there,
while our head adds the raw hidden to the attention output: written false) and
`eagle_aux_hidden_state_layer_ids` (HF indices, as for any vLLM EAGLE-3 head)
(vllm/transformers_utils/configs/speculators/algos.py:15-50). The weights are the
ones of the unified export: vLLM renames `midlayer.` to `layers.0.` itself
(vllm/model_executor/models/llama_eagle3.py:291).
SGLang and stage 3 do not read this layout (its architecture is `Eagle3Speculator`);
use the default export for them.
"""
from __future__ import annotations

import copy
from pathlib import Path

from schemas.head import HEAD_CONFIG, POSITION_RULE_KEY, HeadError, load_head

ARCHITECTURE = "Eagle3Speculator"
# Our head-level fields that live outside the transformer layer's config in this layout.
TOP_LEVEL = ("draft_vocab_size", "target_hidden_size", POSITION_RULE_KEY, "export", "training")
DROPPED = ("architectures", "eagle_config", "eagle_aux_hidden_state_layer_ids")


def check_options(verifier: str | None, speculative_tokens: int) -> None:
    if not verifier:
        raise HeadError("export --to speculators needs --verifier (the target model vLLM will serve)")
    if speculative_tokens < 1:
        raise HeadError(f"export --to speculators: --speculative-tokens must be >= 1, got {speculative_tokens}")


def speculators_config(exported: dict, *, verifier: str, speculative_tokens: int) -> dict:
    """The speculators config for a head whose unified export config is `exported`."""
    check_options(verifier, speculative_tokens)
    layer = {k: copy.deepcopy(v) for k, v in exported.items() if k not in TOP_LEVEL + DROPPED}
    layer["architectures"] = ["LlamaForCausalLM"]
    out = {
        "architectures": [ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": int(exported["draft_vocab_size"]),
        "target_hidden_size": int(exported.get("target_hidden_size", exported["hidden_size"])),
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": list(exported["eagle_aux_hidden_state_layer_ids"]),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens)}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(verifier)},
        },
    }
    for k in TOP_LEVEL:
        if k in exported and k not in out:
            out[k] = copy.deepcopy(exported[k])
    out["export"] = {**exported.get("export", {}), "format": "speculators"}
    return out


def to_speculators(unified_dir: str | Path, *, verifier: str, speculative_tokens: int) -> Path:
    """Rewrite the config of a unified export (stage2_train.export) in the speculators layout."""
    import json

    d = Path(unified_dir)
    config, _ = load_head(d)
    cfg = speculators_config(config, verifier=verifier, speculative_tokens=speculative_tokens)
    tmp = d / (HEAD_CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    tmp.replace(d / HEAD_CONFIG)
    written = json.loads((d / HEAD_CONFIG).read_text())
    if written["eagle_aux_hidden_state_layer_ids"] != config["eagle_aux_hidden_state_layer_ids"]:
        raise HeadError(f"{d / HEAD_CONFIG}: layer ids were not written as {config['eagle_aux_hidden_state_layer_ids']}")
    return d
