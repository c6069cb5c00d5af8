"""The training-time-test unroll: loss Σ_k decay^k loss_k, per-position acc_k and loss_k.

loss_k: soft cross-entropy between the draft's distribution and the teacher (target
restricted to the draft vocab, renormalised), averaged over positions where the
loss mask is 1 and the teacher's top-1 is in the draft vocab.
acc_k: positions where draft top-1 == teacher top-1 / loss-masked positions (a
teacher top-1 outside the draft vocab counts as a miss: the draft cannot emit it).
Simulated acceptance length: 1 + Σ_k Π_{j<=k} acc_j.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stage2_train.teacher import step_view


@dataclass
class TTTOut:
    loss: torch.Tensor          # scalar, the weighted training loss
    loss_sum: torch.Tensor      # [S] Σ CE over loss positions, per step (detached, float64)
    loss_n: torch.Tensor        # [S] number of loss positions
    correct: torch.Tensor       # [S] draft top-1 == teacher top-1 on loss positions
    counted: torch.Tensor       # [S] loss-masked positions (accuracy denominator)
    per_token: list | None = None  # per step (ce [B,L], correct [B,L], counted [B,L], loss_mask [B,L])


def simulated_tau(acc) -> float:
    tau, prod = 1.0, 1.0
    for a in acc:
        prod *= float(a)
        tau += prod
    return tau


# Positions per chunk of the [positions, draft vocab] logits (times the batch size in rows).
LOSS_CHUNK_TOKENS = 2048


def _chunk_ce(model, out: torch.Tensor, idx: torch.Tensor, prob: torch.Tensor):
    """Soft CE against the teacher and the draft's top-1, for one chunk of positions."""
    logits = model.logits(out)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    ce = -(prob * logp.gather(-1, idx)).sum(-1)
    return ce, logp.argmax(-1)


def chunked_ce(model, out: torch.Tensor, idx: torch.Tensor, prob: torch.Tensor,
               chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce [B, L], draft top-1 [B, L]) with at most one chunk's [rows, N] logits alive.

    Under autograd each chunk is checkpointed: backward recomputes its logits instead
    of keeping [B, L, N] of them per TTT step.
    """
    B, L = out.shape[:2]
    step = max(1, chunk_tokens // max(B, 1))
    if step >= L:
        parts = [_chunk_ce(model, out, idx, prob)]
    else:
        grad = torch.is_grad_enabled() and out.requires_grad
        parts = []
        for a in range(0, L, step):
            args = (out[:, a:a + step], idx[:, a:a + step], prob[:, a:a + step])
            parts.append(checkpoint(_chunk_ce, model, *args, use_reentrant=False) if grad else _chunk_ce(model, *args))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def ttt_forward(model, batch: dict, ttt_length: int, decay: float = 0.8, *, keep_per_token: bool = False,
                loss_chunk_tokens: int = LOSS_CHUNK_TOKENS) -> TTTOut:
    """Unroll `ttt_length` steps of the draft on one padded batch (see stage2_train.teacher).

    Rows are at their own positions t; the model's `ttt_step` rotates step k at t + k.
    """
    hidden = model.fuse(batch["hidden"])
    B, L = batch["input_ids"].shape
    pos = torch.arange(L, device=hidden.device).unsqueeze(0).expand(B, L)
    cache: list = []
    total = hidden.new_zeros((), dtype=torch.float32)
    rows: list = []  # kept on the device; one host sync at the end
    per_token = [] if keep_per_token else None
    for k in range(ttt_length):
        v = step_view(batch, k)
        out = model.ttt_step(hidden, v.input_ids, pos, cache)
        ce, top = chunked_ce(model, out, v.idx, v.prob, loss_chunk_tokens)   # [B, L]
        lm = v.loss_mask.to(ce.dtype)
        n = lm.sum()
        loss_k = (ce * lm).sum() / n.clamp_min(1.0)
        total = total + (decay ** k) * loss_k
        with torch.no_grad():
            hit = (top == v.top1) & v.loss_mask
            rows.append(torch.stack([(ce * lm).sum(), n, hit.sum().float(), v.counted.sum().float()]))
            if per_token is not None:
                per_token.append((ce.detach(), hit, v.counted, v.loss_mask))
        hidden = out
    stats = torch.stack(rows, dim=1).detach().double().cpu()  # [4, S]
    return TTTOut(total, stats[0], stats[1], stats[2], stats[3], per_token)
