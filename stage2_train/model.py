"""The EAGLE-3 draft head (DESIGN.md section 5).

One decoder layer whose attention reads cat(input_layernorm(embedding),
hidden_norm(hidden)) (2h wide), a SwiGLU MLP, a final norm and an lm_head over the
draft vocab. Two ways to run the layer:

* `step`: inference with a KV cache and an optional explicit boolean mask (chain
  and tree drafting in stage 3);
* `ttt_step`: the training-time-test unroll. Step k's query at row t is rotated at
  position t + k and attends causally to the step-0 keys (positions <= t) and to
  its own row's keys of steps 1..k (each rotated at t + j). The diagonal part is
  per-position dot products, so the unroll costs O(T^2 + k T) rather than
  O((kT)^2), and its memory is linear in T (stage2_train.ttt_attention).

The head has no bias parameters whatever the target's config says: the EAGLE-3
layout that SGLang and vLLM load has none (schemas.head forces the flags off).

Norms, MLP and RoPE come from transformers' Llama modules, built from the head's
config (itself derived from the target's config: rope theta/scaling, head dims).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from stage2_train.ttt_attention import ttt_attention


def _llama_config(cfg: dict) -> LlamaConfig:
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "eagle_config", "training")}
    # No biases anywhere in the head (LlamaMLP reads mlp_bias), whatever an older config says.
    keep.update(attention_bias=False, mlp_bias=False)
    return LlamaConfig(**keep)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, d]; cos/sin [B, T, d]
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _fit(tensors: dict[str, torch.Tensor], key: str, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"the target's layer has no {key}")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"the target's {key} is {tuple(t.shape)}, this head's is {tuple(shape)}")
    return t.float()


class Eagle3Attention(nn.Module):
    def __init__(self, lc: LlamaConfig):
        super().__init__()
        h = lc.hidden_size
        self.num_heads = lc.num_attention_heads
        self.num_kv = lc.num_key_value_heads
        self.head_dim = getattr(lc, "head_dim", None) or h // self.num_heads
        self.q_proj = nn.Linear(2 * h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        rep = self.num_heads // self.num_kv
        return kv if rep == 1 else kv.repeat_interleave(rep, dim=1)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Eagle3Layer(nn.Module):
    def __init__(self, lc: LlamaConfig):
        super().__init__()
        h = lc.hidden_size
        self.self_attn = Eagle3Attention(lc)
        self.mlp = LlamaMLP(lc)
        self.hidden_norm = LlamaRMSNorm(h, eps=lc.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(h, eps=lc.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=lc.rms_norm_eps)

    def attn_input(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.input_layernorm(emb), self.hidden_norm(hidden)), dim=-1)

    def finish(self, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = residual + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """The head. `config` is the head's config.json dict (schemas.head.make_head_config)."""

    def __init__(self, config: dict, embed_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.config = dict(config)
        lc = _llama_config(config)
        h = lc.hidden_size
        th = int(config.get("target_hidden_size", h))
        n = int(config["draft_vocab_size"])
        V = int(config["vocab_size"])
        self.fc = nn.Linear(3 * th, h, bias=False)
        self.midlayer = Eagle3Layer(lc)
        self.norm = LlamaRMSNorm(h, eps=lc.rms_norm_eps)
        self.lm_head = nn.Linear(h, n, bias=False)
        self.rotary = LlamaRotaryEmbedding(lc)
        self.register_buffer("d2t", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(V, dtype=torch.bool))
        # Frozen target embedding: used, never trained, never exported.
        self.embed_tokens = nn.Embedding(V, h)
        self.embed_tokens.weight.requires_grad_(False)
        # Targets that scale their input embedding (MiniCPM scale_emb, Gemma sqrt(h)):
        # stage 1 records the factor in cache.json and the head config carries it.
        self.embed_scale = float(config.get("embed_scale", 1.0) or 1.0)
        if embed_weight is not None:
            self.set_embedding(embed_weight)

    # -- parameters ------------------------------------------------------------------
    def set_embedding(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight.to(self.embed_tokens.weight.dtype))

    def init_output_from(self, weight: torch.Tensor, norm: Optional[torch.Tensor] = None) -> None:
        """lm_head = the target's output rows of the draft vocab (weight [V, H]); final norm = the
        target's (norm [H]): the head then starts out predicting with the target's own output layer.
        Call after set_vocab_map."""
        n, h = self.lm_head.weight.shape
        if weight.shape[1] != h or (norm is not None and norm.shape != (h,)):
            raise ValueError(f"the target's output head is {tuple(weight.shape)} (norm "
                             f"{None if norm is None else tuple(norm.shape)}); this head's lm_head is {(n, h)}")
        rows = self.draft_to_target(torch.arange(n, device=self.d2t.device))
        with torch.no_grad():
            self.lm_head.weight.copy_(weight[rows.to(weight.device)].to(self.lm_head.weight.dtype))
            if norm is not None:
                self.norm.weight.copy_(norm.to(self.norm.weight.dtype))

    def init_layer_from(self, layer: dict[str, torch.Tensor]) -> None:
        """Start the decoder layer from the target's last layer (stage 1's LAYER_FILE, Llama names): the
        MLP, o_proj and norms as they are; q/k/v read the same weights from both halves of their 2h-wide
        input (the embedding and the fused hidden), each scaled by 1/sqrt(2) (two uncorrelated halves
        of equal norm then give the target's activation scale); fc passes the high layer's state
        through (its low and mid columns start at zero). Raises ValueError when a shape does not fit."""
        m, h = self.midlayer, self.lm_head.weight.shape[1]
        th = self.fc.weight.shape[1] // 3
        if th != h:
            raise ValueError(f"the head's hidden size {h} is not the target's {th}")
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                dst = getattr(m.self_attn, name).weight
                w = _fit(layer, f"self_attn.{name}.weight", (dst.shape[0], h)).to(dst.dtype) / 2 ** 0.5
                dst.copy_(torch.cat((w, w), dim=1))
            for name, mod in (("self_attn.o_proj", m.self_attn.o_proj), ("mlp.gate_proj", m.mlp.gate_proj),
                              ("mlp.up_proj", m.mlp.up_proj), ("mlp.down_proj", m.mlp.down_proj)):
                mod.weight.copy_(_fit(layer, f"{name}.weight", tuple(mod.weight.shape)))
            norm = _fit(layer, "input_layernorm.weight", (h,))
            m.input_layernorm.weight.copy_(norm)
            m.hidden_norm.weight.copy_(norm)
            m.post_attention_layernorm.weight.copy_(_fit(layer, "post_attention_layernorm.weight", (h,)))
            self.fc.weight.zero_()
            fc = self.fc.weight
            fc[:, 2 * h:].copy_(torch.eye(h, dtype=fc.dtype, device=fc.device))

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t.to(torch.int64))
        self.t2d.copy_(t2d.to(torch.bool))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors in the serving layout (schemas.head.WEIGHT_KEYS): no embed, no rotary."""
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if not k.startswith(("embed_tokens.", "rotary."))}

    def rotary_buffers(self) -> dict[str, torch.Tensor]:
        """fp32 copies of every float buffer of the rotary module (inv_freq, and the
        original_inv_freq that longrope/dynamic scaling recompute inv_freq from)."""
        return {n: b.detach().clone().float() for n, b in self.rotary.named_buffers() if b.is_floating_point()}

    def restore_rotary_buffers(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back `rotary_buffers()` copies (in fp32, on the buffers' device) after a
        mixed-precision wrapper cast them: RoPE frequencies must stay exact."""
        for name, value in saved.items():
            mod_name, _, buf = name.rpartition(".")
            mod = self.rotary.get_submodule(mod_name) if mod_name else self.rotary
            mod._buffers[buf] = value.to(mod._buffers[buf].device)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # -- pieces ------------------------------------------------------------------------
    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[.., 3*H_target] low/mid/high target states -> [.., h]."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # cast first: the embedding may be the target's bf16 matrix shared with an fp32 head
        e = self.embed_tokens(input_ids).to(self.fc.weight.dtype)
        if self.embed_scale != 1.0:
            e = e * self.embed_scale
        return e

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from the layer's (pre-norm) output hidden."""
        return self.lm_head(self.norm(hidden))

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor):
        cos, sin = self.rotary(x, position_ids)
        return cos.to(x.dtype), sin.to(x.dtype)

    # -- inference ---------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
             past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             attn_mask: Optional[torch.Tensor] = None):
        """One layer pass with a KV cache.

        hidden [B,T,h] (fused target features or the draft's own previous output),
        input_ids [B,T], position_ids [B,T], past (k, v) each [B,kv,S0,d].
        attn_mask: bool [B or 1, 1, T, S0+T], True = attend; default causal over the
        new tokens and full over the past. Returns (out_hidden [B,T,h], (k, v)).
        """
        layer = self.midlayer
        x = layer.attn_input(hidden, self.embed(input_ids))
        cos, sin = self._rope(x, position_ids)
        q, k, v = layer.self_attn.qkv(x, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        T, S = q.shape[2], k.shape[2]
        if attn_mask is None:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        a = layer.self_attn
        o = F.scaled_dot_product_attention(q, a._expand(k), a._expand(v), attn_mask=attn_mask)
        return layer.finish(hidden, a.out(o)), (k, v)

    # -- training ----------------------------------------------------------------------
    def ttt_step(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step of the training-time-test unroll; appends this step's (k, v) to `cache` (expanded
        to the query heads).

        position_ids [B, T] are the rows' own positions t. Step k = len(cache) rotates
        row t at position t + k (POSITION_RULE: the draft token at depth k is served at
        t + k by SGLang, vLLM and stage 3). Step 0 (empty cache) is causal attention over
        its own keys; step k >= 1 adds, for each position t, the keys of position t from
        steps 1..k (see stage2_train.ttt_attention: no T x T tensor is kept for backward).
        Batches are right-padded: a real row never sees a padded key under the causal
        mask, so padding needs no key mask (padded rows carry no loss).
        """
        layer, a = self.midlayer, self.midlayer.self_attn
        x = layer.attn_input(hidden, self.embed(input_ids))
        cos, sin = self._rope(x, position_ids + len(cache))
        q, k, v = a.qkv(x, cos, sin)
        # Keys/values are expanded to the query heads once, when made: every later step reads
        # them again (and autograd then saves one copy, not one per step).
        cache.append((a._expand(k), a._expand(v)))
        o = ttt_attention(q, cache[0][0], cache[0][1], [kj for kj, _ in cache[1:]], [vj for _, vj in cache[1:]])
        return layer.finish(hidden, a.out(o))

    def ttt_reference_mask(self, T: int, k: int) -> torch.Tensor:
        """The explicit [T, (k+1)T] mask that `ttt_step` implements at step k (for tests)."""
        m = torch.zeros(T, (k + 1) * T, dtype=torch.bool)
        m[:, :T] = torch.ones(T, T, dtype=torch.bool).tril()
        for j in range(1, k + 1):
            m[:, j * T:(j + 1) * T] = torch.eye(T, dtype=torch.bool)
        return m
