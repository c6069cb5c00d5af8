"""A native MiniCPM4 (model_type `minicpm`) for transformers 5, without remote code.

MiniCPM4 is a Llama-shaped decoder (GQA, SwiGLU MLP, RMSNorm, rotary positions) with
three muP scalings on top:

* the input embeddings are multiplied by `scale_emb`,
* every residual branch (attention and MLP) by `scale_depth / sqrt(num_hidden_layers)`,
* the final hidden state is divided by `hidden_size / dim_model_base` before `lm_head`.

Everything else is transformers' own Llama code: attention through
`ALL_ATTENTION_FUNCTIONS` (eager, sdpa, flash-attention), `DynamicCache`,
`GenerationMixin`, and the `longrope` rotary embedding of `modeling_rope_utils`
(short factors while the sequence is at most `original_max_position_embeddings` long,
long factors beyond, cos/sin scaled by sqrt(1 + ln(s)/ln(original)) with
s = max_position_embeddings / original_max_position_embeddings when s > 1).
MiniCPM's own remote code builds its cos/sin table once for `max_position_embeddings`,
so it picks the factor set by that length instead of the sequence's; the two agree
whenever max_position_embeddings == original_max_position_embeddings, which holds for
the published MiniCPM4 / 4.1 configs.

transformers decides the factor set per forward call, by the largest position in the
batch (vLLM: by max_model_len), so in a padded batch that crosses the original length
every row uses the long factors, and a KV-cached decode that crosses it keeps the
short-factor keys already cached; both are moot when, as in MiniCPM4, the original
length is the model's whole context.

The checkpoint's weight names load unchanged (see `CHECKPOINT_WEIGHT_NAMES`).
`sparse_config` (InfLLM v2 sparse attention, CUDA kernels) is accepted and ignored
with a warning: this model always runs dense attention, which equals the sparse
kernel below its dense window and differs only at long context.

`register()` makes AutoConfig / AutoModelForCausalLM resolve `minicpm` to these classes
(used whenever `trust_remote_code` is false); `check_config_dict()` turns fields this
model cannot honour into errors that name the field.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding)

MODEL_TYPE = "minicpm"

# Per layer N; plus the three model-level names below. Same names as the public
# checkpoints (and as vLLM's / GPTQModel's MiniCPM weight loaders expect).
LAYER_WEIGHT_NAMES = (
    "model.layers.{n}.self_attn.q_proj.weight",
    "model.layers.{n}.self_attn.k_proj.weight",
    "model.layers.{n}.self_attn.v_proj.weight",
    "model.layers.{n}.self_attn.o_proj.weight",
    "model.layers.{n}.mlp.gate_proj.weight",
    "model.layers.{n}.mlp.up_proj.weight",
    "model.layers.{n}.mlp.down_proj.weight",
    "model.layers.{n}.input_layernorm.weight",
    "model.layers.{n}.post_attention_layernorm.weight",
)
MODEL_WEIGHT_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

SUPPORTED_ROPE_TYPES = ("default", "longrope")

# Fields of other MiniCPM generations that change the architecture; a config that sets
# them under model_type `minicpm` describes a model this module cannot run.
_UNSUPPORTED_FIELDS = {
    "q_lora_rank": "multi-head latent attention (MiniCPM3); use model_type minicpm3",
    "kv_lora_rank": "multi-head latent attention (MiniCPM3); use model_type minicpm3",
    "qk_nope_head_dim": "multi-head latent attention (MiniCPM3); use model_type minicpm3",
    "qk_rope_head_dim": "multi-head latent attention (MiniCPM3); use model_type minicpm3",
    "num_experts": "mixture-of-experts MLP (MiniCPM-MoE)",
    "mixer_types": "hybrid lightning attention (MiniCPM-SALA)",
}


class MiniCPM4ConfigError(ValueError):
    """A MiniCPM config field the native model does not support (the message names it)."""


def checkpoint_weight_names(num_layers: int) -> list[str]:
    return list(MODEL_WEIGHT_NAMES) + [n.format(n=i) for i in range(num_layers) for n in LAYER_WEIGHT_NAMES]


def _rope_dict(d: dict) -> Optional[dict]:
    return d.get("rope_scaling") or d.get("rope_parameters")


def check_config_dict(d: dict[str, Any], where: str = "config") -> list[str]:
    """Errors for fields the native model cannot honour; returns warnings (e.g. sparse_config).

    Raises MiniCPM4ConfigError naming `where` and the field.
    """
    for field, why in _UNSUPPORTED_FIELDS.items():
        if d.get(field) not in (None, 0, []):
            raise MiniCPM4ConfigError(f"{where}: field '{field}' = {d[field]!r} is not supported by the native "
                                      f"MiniCPM4 model ({why})")
    if d.get("use_mup") is False:
        raise MiniCPM4ConfigError(f"{where}: field 'use_mup' = false is not supported by the native MiniCPM4 "
                                  f"model (it always applies scale_emb, scale_depth and dim_model_base)")
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    for field in ("kv_channels", "head_dim"):
        v = d.get(field)
        if v is not None and hidden and heads and int(v) != hidden // heads:
            raise MiniCPM4ConfigError(f"{where}: field '{field}' = {v} differs from hidden_size / "
                                      f"num_attention_heads = {hidden // heads}; the native MiniCPM4 model "
                                      f"requires them equal")
    rope = _rope_dict(d)
    if rope:
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise MiniCPM4ConfigError(f"{where}: field 'rope_scaling.rope_type' = {rtype!r} is not supported by "
                                      f"the native MiniCPM4 model (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rtype == "longrope":
            missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings")
                       if rope.get(k) is None]
            if missing:
                raise MiniCPM4ConfigError(f"{where}: field 'rope_scaling.{missing[0]}' is required for longrope")
            half = (hidden // heads) // 2 if hidden and heads else None
            for k in ("short_factor", "long_factor"):
                if half is not None and len(rope[k]) != half:
                    raise MiniCPM4ConfigError(f"{where}: field 'rope_scaling.{k}' has {len(rope[k])} values; "
                                              f"longrope needs head_dim / 2 = {half}")
    notes = []
    if d.get("sparse_config"):
        notes.append(f"{where}: 'sparse_config' is set (InfLLM v2 sparse attention); the native MiniCPM4 model "
                     f"runs dense attention, which matches the sparse kernel up to its dense window and "
                     f"differs only at long context")
    return notes


@strict
class MiniCPM4Config(LlamaConfig):
    """LlamaConfig plus MiniCPM's muP fields; `rope_scaling` (longrope) is read by PreTrainedConfig."""

    model_type = MODEL_TYPE

    vocab_size: int = 73448
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    scale_emb: int | float = 12
    scale_depth: int | float = 1.4
    dim_model_base: int | float = 256
    sparse_config: dict | None = None

    def __post_init__(self, **kwargs):
        fields = {k: getattr(self, k, None) for k in ("hidden_size", "num_attention_heads", "head_dim",
                                                      "sparse_config")}
        fields["rope_scaling"] = kwargs.get("rope_scaling") or self.rope_parameters
        warn_notes(check_config_dict({**kwargs, **fields}, where=f"{MODEL_TYPE} config"))
        self._explicit_longrope_factor(kwargs)
        super().__post_init__(**kwargs)

    def _explicit_longrope_factor(self, kwargs: dict) -> None:
        """MiniCPM's configs leave longrope's `factor` implicit (max_position_embeddings /
        original); transformers computes the same value but warns on every load. Spell it out."""
        legacy = isinstance(kwargs.get("rope_scaling"), dict)
        rs = kwargs["rope_scaling"] if legacy else self.rope_parameters
        if not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "longrope" or "factor" in rs:
            return
        orig = rs.get("original_max_position_embeddings")
        if not orig:
            return
        rs = dict(rs, factor=self.max_position_embeddings / orig)
        if legacy:
            kwargs["rope_scaling"] = rs
        else:
            self.rope_parameters = rs

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logits_scaling(self) -> float:
        return self.hidden_size / self.dim_model_base


class MiniCPM4ScaledEmbedding(nn.Embedding):
    """nn.Embedding times `scale_emb`; `embed_scale` is what stage 1 records for the head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int], embed_scale: float):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scalar_embed_scale = float(embed_scale)
        self.embed_scale = nn.Buffer(torch.tensor(float(embed_scale)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class MiniCPM4DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block with each residual branch scaled by scale_depth / sqrt(L)."""

    def __init__(self, config: MiniCPM4Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = config.residual_scale

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                use_cache: Optional[bool] = False,
                position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs) -> torch.Tensor:
        if cache is None and "past_key_values" in kwargs:  # older callers
            cache = kwargs.pop("past_key_values")
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + attn * self.residual_scale
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + mlp * self.residual_scale


class MiniCPM4PreTrainedModel(LlamaPreTrainedModel):
    config: MiniCPM4Config
    config_class = MiniCPM4Config
    _no_split_modules = ["MiniCPM4DecoderLayer"]
    _can_record_outputs = {"hidden_states": MiniCPM4DecoderLayer}

    def _init_weights(self, module):
        PreTrainedModel._init_weights(self, module)
        if isinstance(module, MiniCPM4ScaledEmbedding):
            init.constant_(module.embed_scale, module.scalar_embed_scale)


class MiniCPM4Model(MiniCPM4PreTrainedModel, LlamaModel):
    """LlamaModel.forward over MiniCPM4's embedding and layers."""

    def __init__(self, config: MiniCPM4Config):
        MiniCPM4PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = MiniCPM4ScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                    embed_scale=config.scale_emb)
        self.layers = nn.ModuleList([MiniCPM4DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = LlamaModel.forward


class MiniCPM4ForCausalLM(MiniCPM4PreTrainedModel, LlamaForCausalLM):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPM4Config):
        MiniCPM4PreTrainedModel.__init__(self, config)
        self.model = MiniCPM4Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                                  position_ids=position_ids, cache=cache,
                                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        h = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(h / self.config.logits_scaling)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type `minicpm` to the native classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, MiniCPM4Config, exist_ok=True)
    AutoModel.register(MiniCPM4Config, MiniCPM4Model, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPM4Config, MiniCPM4ForCausalLM, exist_ok=True)


def unregister() -> None:
    """Undo register(): transformers prefers a registered non-library class over a checkpoint's
    remote code even with trust_remote_code=True, so a remote-code load must not see it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    CONFIG_MAPPING._extra_content.pop(MODEL_TYPE, None)
    for mapping in (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        mapping._extra_content.pop(MiniCPM4Config, None)


def warn_notes(notes: list[str]) -> None:
    for n in notes:
        warnings.warn(n, stacklevel=3)


def prepare_load(hf_dir, trust_remote_code: bool) -> bool:
    """Before AutoModel loading: for a `minicpm` config without remote code, validate the
    config (MiniCPM4ConfigError naming config.json and the field), warn about ignored
    fields, and register the native classes. True when the native model will be used."""
    import json
    from pathlib import Path

    f = Path(hf_dir) / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return False  # the loader reports unreadable configs itself
    if d.get("model_type") != MODEL_TYPE:
        return False
    if trust_remote_code and d.get("auto_map"):
        unregister()
        return False
    check_config_dict(d, where=str(f))  # errors name the file; MiniCPM4Config itself warns
    register()
    return True


def remote_code_failure(exc: BaseException, hf_dir) -> Optional[str]:
    """A message for remote modelling code that fails to import or run on this transformers
    (MiniCPM4's imports transformers.modeling_attn_mask_utils, absent from transformers 5.0-5.24)."""
    import json
    from pathlib import Path

    try:
        d = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not d.get("auto_map"):
        return None
    import transformers

    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        what = f"import of '{exc.name}' failed ({what})"
    hint = ("; set target.trust_remote_code: false to use the project's native MiniCPM4 model"
            if d.get("model_type") == MODEL_TYPE else "; set target.trust_remote_code: false to use transformers' "
            "own implementation if it has one")
    return (f"{hf_dir}: the checkpoint's remote modelling code ({d['auto_map'].get('AutoModelForCausalLM', '?')}) "
            f"does not load with transformers {transformers.__version__}: {what}{hint}")
