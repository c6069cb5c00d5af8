"""The target side of speculative decoding: one HF forward per cycle over a KV cache.

`TargetRunner.forward` runs the target on new tokens at explicit positions, with an
optional boolean tree mask over the *new* tokens (the cached prefix is always fully
visible), and returns the logits plus the three auxiliary hidden states the head
reads (layer ids = indices into HF's `output_hidden_states`, from the head config).
`prune` keeps only the accepted cache entries, contiguous (a chain) or not (a tree
path), so the cache afterwards is the one plain decoding of the same tokens builds.
The plain greedy baseline uses the same `forward` with one token a step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch


class TargetRunError(RuntimeError):
    pass


@dataclass
class TargetOut:
    logits: Optional[torch.Tensor]  # [T, V] float32 (None when not asked for)
    aux: Optional[torch.Tensor]     # [T, 3H] (None when not asked for)


class TargetRunner:
    def __init__(self, model, layer_ids: Optional[list[int]] = None):
        self.model = model
        self.layer_ids = list(layer_ids) if layer_ids is not None else None
        cfg = model.config
        L = int(getattr(cfg, "num_hidden_layers"))
        if self.layer_ids is not None:
            bad = [i for i in self.layer_ids if not 0 <= i <= L]
            if bad:
                raise TargetRunError(f"aux layer ids {self.layer_ids}: {bad} outside 0..{L} "
                                     f"(the target has {L} layers)")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # transformers 5 renamed past_key_values -> cache; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.eos_ids = _eos_ids(cfg)

    def new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    @staticmethod
    def cache_len(cache) -> int:
        return int(cache.get_seq_length())

    @torch.no_grad()
    def forward(self, cache, input_ids: torch.Tensor, positions: torch.Tensor,
                tree_mask: Optional[torch.Tensor] = None, *, want_logits: bool = True,
                want_aux: bool = True) -> TargetOut:
        """input_ids/positions [T] (int64); tree_mask bool [T, T] (True = attend) or None (causal)."""
        T = int(input_ids.shape[0])
        S = self.cache_len(cache)
        kw = {self._cache_kw: cache, "use_cache": True, "position_ids": positions.view(1, T).to(self.device)}
        if tree_mask is not None:
            # An additive float mask works for every attention implementation (eager adds it,
            # sdpa takes it as is); HF passes a 4D mask through untouched.
            full = torch.zeros(1, 1, T, S + T, dtype=self.dtype, device=self.device)
            full[0, 0, :, S:].masked_fill_(~tree_mask.to(self.device), torch.finfo(self.dtype).min)
            kw["attention_mask"] = full
        if want_aux:
            kw["output_hidden_states"] = True
        if not want_logits:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids.view(1, T).to(self.device), **kw)
        aux = None
        if want_aux:
            hs = out.hidden_states
            if self.layer_ids is None:
                raise TargetRunError("aux hidden states asked for but no layer ids were given")
            aux = torch.cat([hs[i][0] for i in self.layer_ids], dim=-1)
        logits = out.logits[0].float() if want_logits else None
        return TargetOut(logits=logits, aux=aux)

    @staticmethod
    def prune(cache, prefix_len: int, keep: torch.Tensor) -> None:
        """Keep cache rows [0, prefix_len) and prefix_len + keep (sorted, relative indices)."""
        keep = keep.to(torch.long)
        n = int(keep.numel())
        contiguous = bool(n == 0 or (keep == torch.arange(n, device=keep.device)).all())
        idx = None if contiguous else torch.cat((torch.arange(prefix_len, device=keep.device), prefix_len + keep))
        for layer in _layers(cache):
            if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
                continue
            if getattr(layer, "is_sliding", False):
                raise TargetRunError("targets with sliding-window cache layers are not supported by the "
                                     "speculative decoder (their cache cannot be pruned to a tree path)")
            if contiguous:
                layer.keys = layer.keys[..., : prefix_len + n, :]
                layer.values = layer.values[..., : prefix_len + n, :]
            else:
                i = idx.to(layer.keys.device)
                layer.keys = layer.keys.index_select(-2, i)
                layer.values = layer.values.index_select(-2, i)


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TargetRunError(f"unsupported cache type {type(cache).__name__} (needs .layers with keys/values)")
    return layers


def _eos_ids(cfg) -> set[int]:
    e = getattr(cfg, "eos_token_id", None)
    if e is None:
        return set()
    return set(e) if isinstance(e, (list, tuple)) else {int(e)}


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer (for tests and debugging)."""
    return [(layer.keys, layer.values) for layer in _layers(cache)]
