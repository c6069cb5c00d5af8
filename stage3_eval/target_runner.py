"""The target side of speculative decoding: one HF forward per cycle over a KV cache.

`TargetRunner.forward` runs the target on new tokens at explicit positions, with an
optional boolean tree mask over the *new* tokens (the cached prefix is always fully
visible), and returns the logits plus the three auxiliary hidden states the head
reads (layer ids = indices into HF's `output_hidden_states`, from the head config).
`prune` keeps only the accepted cache entries, contiguous (a chain) or not (a tree
path), so the cache afterwards is the one plain decoding of the same tokens builds.
The plain greedy baseline uses the same `forward` with one token a step.

Tree masks. Only some attention implementations read an arbitrary 4D mask: sdpa
and eager do; flash-attention reads a 4D mask as a 2D padding mask (the tree
becomes garbage), and remote code built on the legacy 4D-mask helpers inverts it.
So a tree pass runs with `sdpa` whatever the target was loaded with (chain, prefill
and plain decoding keep the loaded implementation), and `check_tree_verify` (run
before any decoding) compares tree-verify logits with plain sequential decoding:
it keeps the first mask convention that agrees (transformers' additive one, else
the legacy 1 = attend one) and refuses to go on when none does, whatever the cause.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Optional

import torch


class TargetRunError(RuntimeError):
    pass


MASK_ATTN = ("sdpa", "eager")  # implementations that read an arbitrary additive 4D mask
TREE_ATTN = "sdpa"             # what a tree pass switches to when the target uses another one
# How a 4D tree mask is encoded: transformers' additive 0/-inf, or the legacy 1 = attend that
# remote code built on _prepare_4d_causal_attention_mask expects (it inverts the mask itself).
MASK_CONVENTIONS = ("additive", "binary")

# A small fixed tree for the start-up check: two roots' children, a grandchild on each
# branch and one great-grandchild, so rows see siblings and cousins they must not attend to.
CHECK_PARENTS = (-1, -1, 0, 1, 2, 0)


def check_tolerance(dtype) -> float:
    """Allowed max |tree - sequential| logit difference, relative to the largest logit.

    Batched and one-token passes round differently: measured on SmolLM2-135M (30 layers,
    CPU) 1.1e-6 relative in fp32 and 1.5e-2 in bf16 (0.58 at a largest logit of 40). A wrong mask changes
    logits by O(1) relative (measured on the tests' tiny model: 0.85 for a mask ignored
    as flash-attention does, 1.1 for an inverted one), far above both."""
    return 6e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3


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
        self.attn_implementation = getattr(cfg, "_attn_implementation", None)
        # every config object the model's modules read their attention implementation from
        self._attn_configs = list({id(c): c for c in (getattr(m, "config", None) for m in model.modules())
                                   if hasattr(c, "_attn_implementation_internal")}.values())
        self.tree_check: Optional[dict] = None
        self.mask_convention = MASK_CONVENTIONS[0]  # check_tree_verify may switch it
        self.pack_one_token = _slow_one_row_sdpa(self.device, self.dtype, self.attn_implementation, cfg)

    def _tree_mask_4d(self, tree_mask: torch.Tensor, S: int) -> torch.Tensor:
        """[1, 1, T, S+T] over the cached prefix (always visible) and the new rows."""
        T = tree_mask.shape[0]
        if self.mask_convention == "additive":  # 0 = attend, dtype-min = masked (transformers' own)
            full = torch.zeros(1, 1, T, S + T, dtype=self.dtype, device=self.device)
            full[0, 0, :, S:].masked_fill_(~tree_mask, torch.finfo(self.dtype).min)
        else:  # "binary": 1 = attend, 0 = masked (legacy _prepare_4d_causal_attention_mask helpers invert it)
            full = torch.ones(1, 1, T, S + T, dtype=self.dtype, device=self.device)
            full[0, 0, :, S:] = tree_mask.to(self.dtype)
        return full

    @contextlib.contextmanager
    def mask_capable_attention(self):
        """Run the body with an attention implementation that reads a 4D mask (see the module doc)."""
        if self.attn_implementation in MASK_ATTN or self.attn_implementation is None:
            yield
            return
        saved = [(c, c._attn_implementation_internal) for c in self._attn_configs]
        try:
            for c, _ in saved:
                c._attn_implementation_internal = TREE_ATTN
            yield
        finally:
            for c, v in saved:
                c._attn_implementation_internal = v

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
        attn = contextlib.nullcontext()
        if tree_mask is None and T == 1 and self.pack_one_token:
            # an all-visible additive mask: with a mask, transformers' sdpa folds a GQA group's query heads
            # into rows of one kv head (pack_gqa) instead of handing PyTorch's CPU kernel one query row
            kw["attention_mask"] = torch.zeros(1, 1, 1, S + 1, dtype=self.dtype, device=self.device)
        if tree_mask is not None:
            # A 4D float mask (HF passes it through untouched) in the convention the check chose;
            # implementations that cannot read one are switched to sdpa for this pass.
            kw["attention_mask"] = self._tree_mask_4d(tree_mask.to(self.device), S)
            attn = self.mask_capable_attention()
        if want_aux:
            if self.layer_ids is None:
                raise TargetRunError("aux hidden states asked for but no layer ids were given")
            # transformers 5 keeps only the listed states (None elsewhere); code that only
            # tests truthiness returns them all, indexed the same way
            kw["output_hidden_states"] = sorted(set(self.layer_ids))
        if not want_logits:
            kw["logits_to_keep"] = 1
        with attn:
            out = self.model(input_ids=input_ids.view(1, T).to(self.device), **kw)
        aux = None
        if want_aux:
            hs = out.hidden_states
            if self.layer_ids is None:
                raise TargetRunError("aux hidden states asked for but no layer ids were given")
            aux = torch.cat([hs[i][0] for i in self.layer_ids], dim=-1)
        logits = out.logits[0].float() if want_logits else None
        return TargetOut(logits=logits, aux=aux)

    @torch.no_grad()
    def check_tree_verify(self, prompt_ids: list[int], tol: Optional[float] = None) -> dict:
        """Tree-verify logits against plain sequential decoding; picks the mask convention or refuses.

        A prefix of `prompt_ids` is prefilled, then one tree pass verifies the nodes of
        CHECK_PARENTS (tokens taken from the prompt); each row must give the logits a
        cache-free forward over prefix + that row's path gives. The additive convention
        (transformers' own) is tried first, then the legacy 1 = attend one; the first that
        agrees is kept in `mask_convention`. Raises TargetRunError when none does.
        """
        ids = [int(t) for t in prompt_ids][:16]
        if len(ids) < 2:
            raise TargetRunError("the tree-verification check needs a prompt of at least 2 tokens")
        tol = check_tolerance(self.dtype) if tol is None else tol
        tried = {}
        for conv in MASK_CONVENTIONS:
            self.mask_convention = conv
            res = self._compare_tree_with_sequential(ids, tol)
            tried[conv] = res
            if res["ok"]:
                break
        self.tree_check = {**res, "tol": tol, "mask_convention": conv, "attn_implementation": self.attn_implementation,
                           "tree_attn_implementation": self.attn_implementation
                           if self.attn_implementation in MASK_ATTN else TREE_ATTN,
                           "tried": {c: r["rel_diff"] for c, r in tried.items()}}
        if not res["ok"]:
            self.mask_convention = MASK_CONVENTIONS[0]
            worst = ", ".join(f"{c}: rows {r['rows_bad']} off by up to {r['max_abs_diff']:.3g}"
                              for c, r in tried.items())
            raise TargetRunError(
                f"tree verification disagrees with sequential decoding on a {len(CHECK_PARENTS)}-node test "
                f"tree with every mask convention ({worst}; largest logit {res['max_abs_logit']:.3g}, allowed "
                f"{tol:g} x that). The target's attention does not honour a 4D tree mask (loaded with "
                f"attn_implementation={self.attn_implementation!r}, tree passes use "
                f"{self.tree_check['tree_attn_implementation']!r}). Load the target with "
                f"target.attn_implementation: sdpa or eager, or evaluate with eval.method: [chain] "
                f"(chains pass no mask)")
        return self.tree_check

    @torch.no_grad()
    def _compare_tree_with_sequential(self, ids: list[int], tol: float) -> dict:
        from stage3_eval.tree import DraftTree, verify_mask, verify_positions

        n, dev = len(ids) - 1, self.device
        toks = [ids[(3 * i + 1) % len(ids)] for i in range(len(CHECK_PARENTS))]
        tree = DraftTree.from_parents(toks, list(CHECK_PARENTS), device=dev)
        cache = self.new_cache()
        self.forward(cache, torch.tensor(ids[:-1], device=dev), torch.arange(n, device=dev),
                     want_logits=False, want_aux=False)
        rows = torch.cat((torch.tensor(ids[-1:], device=dev), tree.tokens))
        got = self.forward(cache, rows, verify_positions(tree, n), verify_mask(tree), want_aux=False).logits
        ref = []
        for r in range(tree.size + 1):
            path = [] if r == 0 else tree.anc[r - 1].nonzero().flatten().tolist()
            seq = torch.tensor(ids + [toks[j] for j in path], device=dev)[None]
            ref.append(self.model(input_ids=seq, use_cache=False).logits[0, -1].float())
        ref = torch.stack(ref)
        scale = max(float(ref.abs().max()), 1.0)
        err = (got - ref).abs().amax(-1)
        bad = (err > tol * scale).nonzero().flatten().tolist()
        diff = float(err.max())
        return {"max_abs_diff": diff, "max_abs_logit": scale, "rel_diff": diff / scale, "rows_bad": bad,
                "ok": not bad}

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


def _slow_one_row_sdpa(device, dtype, attn_implementation, cfg) -> bool:
    """True where a one-token pass without a mask hits PyTorch's slow CPU SDPA path: bf16/fp16 on a CPU,
    sdpa, grouped kv heads, and only full-attention layers (a 4D mask replaces the model's own masks, so
    a sliding window would be lost). Measured with SmolLM2 (9 query / 3 kv heads, 300 cached tokens): 0.22 ms
    per layer for the single query row against 0.05 packed; a plain greedy step, the baseline every speed-up
    divides by, 59.9-60.4 ms against 52.4-53.2 (bench/bench_verify.py --dtypes bfloat16 --threads 1, T=1)."""
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    types = getattr(cfg, "layer_types", None)
    full = all(t == "full_attention" for t in types) if types else not getattr(cfg, "sliding_window", None)
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and attn_implementation == "sdpa"
            and isinstance(heads, int) and isinstance(kv, int) and kv < heads and full)
