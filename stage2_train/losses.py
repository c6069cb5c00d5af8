"""The training-time-test unroll: loss Σ_k decay^k loss_k, per-position acc_k and loss_k.

loss_k: soft cross-entropy between the draft's distribution and the teacher (target
restricted to the draft vocab, renormalised), averaged over positions where the
loss mask is 1 and the teacher's top-1 is in the draft vocab. In training the average
is over the whole optimizer step (all micro-batches of all ranks: `loss_token_counts`,
summed by the trainer), so every loss token weighs the same, on any number of ranks.
The per-position CE lives in `_chunk_ce`; the per-position sums a batch reports
(TTTOut.sums) are named rows that `Sums` carries and all-reduces whatever they are.
acc_k: positions where draft top-1 == teacher top-1 / loss-masked positions (a
teacher top-1 outside the draft vocab counts as a miss: the draft cannot emit it).
Simulated acceptance length: 1 + Σ_k Π_{j<=k} acc_j.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stage2_train.teacher import step_view


STAT_ROWS = ("loss_sum", "loss_n", "correct", "counted")


@dataclass
class TTTOut:
    """One micro-batch's unroll.

    loss: scalar, Σ_k decay^k loss_sum_k / loss_tokens_k (see `ttt_forward`).
    sums: per-position sums, each [S] float64 on the batch's device, detached: loss_sum
    (Σ CE over loss positions), loss_n (loss positions), correct (draft top-1 == teacher
    top-1 on loss positions), counted (loss-masked positions, the accuracy denominator).
    A new objective or metric adds a row here; `Sums` and the trainer carry any row.
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    per_token: list | None = None  # per step (ce [B,L], correct [B,L], counted [B,L], loss_mask [B,L])

    loss_sum = property(lambda self: self.sums["loss_sum"])
    loss_n = property(lambda self: self.sums["loss_n"])
    correct = property(lambda self: self.sums["correct"])
    counted = property(lambda self: self.sums["counted"])


class Sums:
    """Named sums (float64 tensors of any shape, on one device), added to, then all-reduced in one collective.

    Rows appear when first added, in the same order on every rank (all ranks run the same code).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.rows: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> "Sums":
        for name, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64, device=self.device) if not isinstance(v, torch.Tensor) \
                else v.detach().to(torch.float64)
            self.rows[name] = self.rows[name] + v if name in self.rows else v.clone()
        return self

    def all_reduce(self, ranks) -> "Sums":
        """Sum over ranks (stage2_train.collectives.Ranks): one collective for every row."""
        if not self.rows:
            return self
        flat = torch.cat([v.reshape(-1) for v in self.rows.values()])
        ranks.all_reduce(flat)
        at = 0
        for name, v in self.rows.items():
            self.rows[name] = flat[at:at + v.numel()].view(v.shape)
            at += v.numel()
        return self

    def host(self) -> dict[str, list | float]:
        """The rows as Python numbers (one device-to-host copy)."""
        if not self.rows:
            return {}
        flat = torch.cat([v.reshape(-1) for v in self.rows.values()]).cpu().tolist()
        out, at = {}, 0
        for name, v in self.rows.items():
            vals = flat[at:at + v.numel()]
            out[name] = vals[0] if v.dim() == 0 else vals
            at += v.numel()
        return out


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


def loss_token_counts(batch: dict, ttt_length: int) -> torch.Tensor:
    """[S] loss positions per TTT step of a batch (float64, on the batch's device), before any forward:
    the denominators of loss_k. The trainer sums them over the step's micro-batches and ranks."""
    return torch.stack([step_view(batch, k).loss_mask.sum() for k in range(ttt_length)]).to(torch.float64)


def ttt_forward(model, batch: dict, ttt_length: int, decay: float = 0.8, *, keep_per_token: bool = False,
                loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, loss_tokens: Optional[torch.Tensor] = None) -> TTTOut:
    """Unroll `ttt_length` steps of the draft on one padded batch (see stage2_train.teacher).

    Rows are at their own positions t; the model's `ttt_step` rotates step k at t + k.
    loss = Σ_k decay^k (Σ CE_k over this batch's loss positions) / loss_tokens[k]. By default
    loss_tokens is this batch's own count (a per-batch mean); the trainer passes the count of
    the whole optimizer step over all ranks, so that every loss token weighs the same.
    """
    hidden = model.fuse(batch["hidden"])
    B, L = batch["input_ids"].shape
    pos = torch.arange(L, device=hidden.device).unsqueeze(0).expand(B, L)
    cache: list = []
    ce_sums: list = []  # [S] differentiable Σ CE_k
    rows: list = []  # kept on the device: no host sync here
    per_token = [] if keep_per_token else None
    for k in range(ttt_length):
        v = step_view(batch, k)
        out = model.ttt_step(hidden, v.input_ids, pos, cache)
        ce, top = chunked_ce(model, out, v.idx, v.prob, loss_chunk_tokens)   # [B, L]
        lm = v.loss_mask.to(ce.dtype)
        ce_sums.append((ce * lm).sum())
        with torch.no_grad():
            hit = (top == v.top1) & v.loss_mask
            rows.append(torch.stack([lm.sum(), hit.sum().float(), v.counted.sum().float()]))
            if per_token is not None:
                per_token.append((ce.detach(), hit, v.counted, v.loss_mask))
        hidden = out
    ce_k = torch.stack(ce_sums)  # fp32 (fp64 for a float64 head)
    stats = torch.stack(rows, dim=1).double()  # [3, S]
    n = stats[0] if loss_tokens is None else loss_tokens
    weights = decay ** torch.arange(ttt_length, device=ce_k.device, dtype=torch.float64)
    loss = (ce_k * (weights / n.clamp_min(1.0)).to(ce_k.dtype)).sum()
    sums = {"loss_sum": ce_k.detach().double(), "loss_n": stats[0], "correct": stats[1], "counted": stats[2]}
    return TTTOut(loss, sums, per_token)
