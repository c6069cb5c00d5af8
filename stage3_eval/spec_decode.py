"""Speculative decoding (chain and tree) and the plain baseline, on one KV-cache path.

A cycle: the root (last accepted token, known) plus the drafted nodes go through
the target in ONE forward pass over the cached prefix; the longest acceptable path
is kept, the target adds one bonus token, both caches keep only accepted entries.
The prompt's last token is the first root, so the first new token is already
speculated; the prefill pass (prompt minus its last token) yields no token.

tau = new tokens / target forward passes of the decoding cycles (prefill excluded):
plain decoding gives exactly 1, an oracle chain of k tokens k + 1 per cycle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from stage3_eval.target_runner import TargetRunner
from stage3_eval.tree import DraftTree, accept_draft, build_tree, greedy_accept, sample_accept, sample_from, \
    target_probs, verify_mask, verify_positions


@dataclass
class DecodeSettings:
    method: str = "chain"          # chain | tree | plain
    draft_tokens: int = 5          # chain
    top_k: int = 4                 # tree
    depth: int = 5
    total_tokens: int = 24
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def tree_shape(self) -> tuple[int, int, int]:
        if self.method == "chain":
            return 1, self.draft_tokens, self.draft_tokens
        return self.top_k, self.depth, self.total_tokens

    @property
    def max_depth(self) -> int:
        return self.tree_shape()[1] if self.method != "plain" else 0


@dataclass
class GenResult:
    tokens: list[int]
    forward_passes: int            # decoding passes (prefill excluded)
    prefill_passes: int
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per cycle
    drafted_depths: list[int] = field(default_factory=list)  # depth of the tree drafted per cycle
    wall_s: float = 0.0
    stopped_by: str = "length"     # eos | length

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tau(self) -> float:
        return self.new_tokens / max(self.forward_passes, 1)


def _finish(out: list[int], new: list[int], eos: set[int], max_new: int) -> tuple[list[int], bool]:
    """Append `new` to `out` up to eos (included) or the token budget; True when done."""
    for i, t in enumerate(new):
        out.append(t)
        if t in eos or len(out) >= max_new:
            return new[: i + 1], True
    return new, False


@torch.no_grad()
def generate(target: TargetRunner, drafter, prompt_ids: list[int], s: DecodeSettings, *,
             eos_ids: Optional[set[int]] = None, gen: Optional[torch.Generator] = None,
             accept=None) -> GenResult:
    """Decode `prompt_ids` with the target, speculatively unless s.method == 'plain'.

    accept: the acceptance rule when sampling (default tree.accept_draft; tests inject wrong ones)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    eos = set(target.eos_ids if eos_ids is None else eos_ids)
    spec = s.method != "plain"
    sampling = s.temperature > 0
    t0 = time.perf_counter()
    cache = target.new_cache()
    if spec:
        drafter.reset()
    p = len(prompt_ids)
    dev = target.device  # every tensor handed to the target is made there; the drafter moves its own
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
    res = GenResult(tokens=[], forward_passes=0, prefill_passes=0)
    if p > 1:
        o = target.forward(cache, ids[:-1], torch.arange(p - 1, device=dev), want_logits=False, want_aux=spec)
        res.prefill_passes = 1
        if spec:
            drafter.commit(o.aux, ids[1:], torch.arange(p - 1, device=dev))
    root, n = int(prompt_ids[-1]), p - 1  # root token and its position
    top_k, depth, total = s.tree_shape() if spec else (1, 0, 0)
    out: list[int] = []
    while True:
        tree = build_tree(drafter, top_k=top_k, depth=depth, total_tokens=total, temperature=s.temperature,
                          gen=gen) if spec else None
        N = tree.size if tree is not None else 0
        root_t = torch.full((1,), root, dtype=torch.long, device=dev)
        tokens = torch.cat((root_t, tree.tokens.to(dev))) if N else root_t
        # top_k == 1 grows a chain by construction: known without reading the tree back
        mask = None if (N == 0 or top_k == 1) else verify_mask(tree)
        pos = verify_positions(tree, n).to(dev) if N else torch.full((1,), n, dtype=torch.long, device=dev)
        o = target.forward(cache, tokens, pos, mask, want_aux=spec)
        res.forward_passes += 1
        if sampling:
            P = target_probs(o.logits, s.temperature, s.top_p)
            path, bonus = sample_accept(tree, P, gen, accept or accept_draft) if N else ([], sample_from(P[0], gen))
        else:
            nxt = o.logits.argmax(-1)
            path, bonus = greedy_accept(tree, nxt) if N else ([], int(nxt[0]))
        new = (tree.tokens[path].tolist() if path else []) + [bonus]
        if spec:
            res.accept_lengths.append(len(path))
            res.drafted_depths.append(int(tree.depth.max()) if N else 0)
        kept, done = _finish(out, new, eos, s.max_new_tokens)
        if done:
            break
        keep = torch.tensor([0] + [i + 1 for i in path], dtype=torch.long, device=dev)
        if N:
            target.prune(cache, n, keep)
        if spec:
            drafter.commit(o.aux[keep], torch.tensor(new, dtype=torch.long, device=dev),
                           n + torch.arange(len(new), device=dev))
        n += len(new)
        root = bonus
    res.tokens = out
    res.stopped_by = "eos" if out and out[-1] in eos else "length"
    res.wall_s = time.perf_counter() - t0
    return res
