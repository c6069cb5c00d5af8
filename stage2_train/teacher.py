"""The teacher rebuilt from the cache, and THE one place where stage 2 shifts positions.

Cache row t holds x_t, loss_mask_t, the target's features computed at t and the
target's top-K log-probs for x_{t+1} (DESIGN.md section 3). The draft's TTT step k
at index t reads

    hidden    : fused f_t (step 0) or the draft's own step-(k-1) output at t
    embedding : x_{t+k+1}
    teacher   : cache row t+k+1   (the target's distribution over x_{t+k+2}: the renormalised
                teacher idx/prob/top1 and the raw top-K valid/logp the objectives read)
    counted   : loss_mask[t+k+2] == 1 (and, for the loss, the teacher's top-1 in the draft vocab)
    position  : t + k (rotary; applied by the model's ttt_step, schemas.head.POSITION_RULE)

`step_view` is the only function that applies these offsets; everything else
(trainer, evaluation, benchmarks) goes through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def build_teacher(topk_ids: np.ndarray, topk_logprobs: np.ndarray, target_to_draft: np.ndarray):
    """Per cache row: the target distribution restricted to the draft vocab, renormalised.

    Returns (idx int64 [T,K] draft ids (0 where unused), prob float32 [T,K] summing to 1
    over the top-K entries inside the draft vocab (all 0 when none is), top1 int64 [T]:
    draft id of the target's top-1, -1 when it falls outside the draft vocab).
    """
    d = target_to_draft[np.asarray(topk_ids, dtype=np.int64)]          # [T, K], -1 = outside
    inside = d >= 0
    lp = np.asarray(topk_logprobs, dtype=np.float32)
    lp = np.where(inside, lp, -np.inf)
    m = lp.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(inside, np.exp(lp - m), 0.0).astype(np.float32)
    s = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, s, out=np.zeros_like(p), where=s > 0)
    top1 = d[:, 0].copy() if d.shape[1] else np.full(d.shape[0], -1, dtype=np.int64)
    return np.where(inside, d, 0), p, top1


def shift(x: torch.Tensor, n: int, fill) -> torch.Tensor:
    """y[:, t] = x[:, t + n] (time is dim 1); rows past the end get `fill`."""
    if n == 0:
        return x
    y = torch.full_like(x, fill)
    if n < x.shape[1]:
        y[:, : x.shape[1] - n] = x[:, n:]
    return y


@dataclass
class StepView:
    input_ids: torch.Tensor   # [B, L]    x_{t+k+1}
    idx: torch.Tensor         # [B, L, K] teacher draft ids (row t+k+1)
    prob: torch.Tensor        # [B, L, K] teacher probabilities (row t+k+1)
    valid: torch.Tensor       # [B, L, K] top-K entry inside the draft vocab (row t+k+1; False past the end)
    logp: torch.Tensor        # [B, L, K] cached full-vocab log-probs (row t+k+1; -inf past the end)
    top1: torch.Tensor        # [B, L]    teacher top-1 draft id, -1 outside the draft vocab
    counted: torch.Tensor     # [B, L]    loss_mask[t+k+2]: the accuracy denominator
    loss_mask: torch.Tensor   # [B, L]    counted & top-1 inside the draft vocab: loss positions


def step_view(batch: dict, k: int) -> StepView:
    """Inputs and teacher of TTT step k, aligned to index t (see the module docstring).

    `batch` holds right-padded [B, L] tensors input_ids, loss_mask (0 on padding),
    t_idx, t_prob, t_top1 (from `build_teacher`) and t_valid, t_logp (the raw top-K,
    stage2_train.objectives.raw_teacher).
    """
    counted = shift(batch["loss_mask"], k + 2, 0).bool()
    top1 = shift(batch["t_top1"], k + 1, -1)
    return StepView(
        input_ids=shift(batch["input_ids"], k + 1, 0),
        idx=shift(batch["t_idx"], k + 1, 0),
        prob=shift(batch["t_prob"], k + 1, 0),
        valid=shift(batch["t_valid"], k + 1, False),
        logp=shift(batch["t_logp"], k + 1, -math.inf),
        top1=top1,
        counted=counted,
        loss_mask=counted & (top1 >= 0),
    )
