"""The draft vocabulary (DESIGN.md section 3), chosen at training time from the cache's token counts.

The N most frequent target tokens over loss-masked positions; ties go to the lower
token id so the choice is deterministic. Ids are kept in ascending target-id order,
so `d2t[i] = target_id_i - i` is non-negative and non-decreasing (what SGLang and
vLLM expect). `t2d[j]` is True when target token j is in the draft vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class VocabError(ValueError):
    pass


@dataclass
class DraftVocab:
    target_ids: np.ndarray   # int64 [N], ascending
    d2t: np.ndarray          # int64 [N]
    t2d: np.ndarray          # bool  [V]
    coverage: float          # share of loss-masked target tokens inside the draft vocab

    @property
    def size(self) -> int:
        return int(len(self.target_ids))

    def target_to_draft(self) -> np.ndarray:
        """int64 [V]: draft id of each target id, -1 outside the draft vocab."""
        m = np.full(len(self.t2d), -1, dtype=np.int64)
        m[self.target_ids] = np.arange(len(self.target_ids), dtype=np.int64)
        return m


def build_draft_vocab(token_counts: np.ndarray, draft_vocab_size: int) -> DraftVocab:
    counts = np.asarray(token_counts, dtype=np.int64)
    V, N = len(counts), int(draft_vocab_size)
    if N > V:
        raise VocabError(f"train.draft_vocab_size {N} is larger than the target's vocabulary ({V} tokens)")
    if N <= 0:
        raise VocabError(f"train.draft_vocab_size must be positive, got {N}")
    # Stable sort on -count: equal counts keep ascending id order.
    order = np.argsort(-counts, kind="stable")[:N]
    ids = np.sort(order).astype(np.int64)
    t2d = np.zeros(V, dtype=bool)
    t2d[ids] = True
    total = int(counts.sum())
    coverage = float(counts[ids].sum() / total) if total else 0.0
    return DraftVocab(target_ids=ids, d2t=ids - np.arange(N, dtype=np.int64), t2d=t2d, coverage=coverage)


def vocab_from_maps(d2t: np.ndarray, t2d: np.ndarray) -> DraftVocab:
    """Rebuild a DraftVocab from a head's d2t/t2d (evaluation of a saved head)."""
    d2t = np.asarray(d2t, dtype=np.int64)
    ids = d2t + np.arange(len(d2t), dtype=np.int64)
    t2d = np.asarray(t2d, dtype=bool)
    if len(ids) and (ids.max() >= len(t2d) or not t2d[ids].all() or int(t2d.sum()) != len(ids)):
        raise VocabError("head's d2t and t2d disagree (d2t names tokens that t2d does not mark)")
    return DraftVocab(target_ids=ids, d2t=d2t, t2d=t2d, coverage=float("nan"))
