"""The training-time-test unroll: loss Σ_k decay^k loss_k, per-position acc_k, loss_k and alpha_k.

loss_k: the objective `train.loss` (stage2_train/objectives.py: ce, the default soft
cross-entropy against the teacher restricted to the draft vocab and renormalised; tv,
lk_alpha, lk_lambda from the raw cached top-K) averaged over positions where the loss
mask is 1 and the teacher's top-1 is in the draft vocab. In training the average is over
the whole optimizer step (all micro-batches of all ranks: `loss_token_counts`, summed by
the trainer), so every loss token weighs the same, on any number of ranks, whatever the
objective. The per-position sums a batch reports (TTTOut.sums) are named rows that `Sums`
carries and all-reduces whatever they are.
acc_k: positions where draft top-1 == teacher top-1 / loss-masked positions (a
teacher top-1 outside the draft vocab counts as a miss: the draft cannot emit it).
alpha_k: the expected acceptance of a sampled draft token, Σ_v min(p_v, q_v) over the cached
top-K (an exact lower bound; alpha_hi_k adds the most the mass outside the top-K can give),
averaged over the same positions as acc_k.
Simulated acceptance length: 1 + Σ_k Π_{j<=k} acc_j (greedy); with alpha_j, sampling at T = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from stage2_train.objectives import DEFAULT_LK_ETA, RowTerms, check_objective, chunk_terms
from stage2_train.teacher import StepView, step_view


@dataclass
class TTTOut:
    """One micro-batch's unroll.

    loss: scalar, Σ_k decay^k loss_sum_k / loss_tokens_k (see `ttt_forward`).
    sums: per-position sums, each [S] float64 on the batch's device, detached: loss_sum
    (Σ objective over loss positions), loss_n (loss positions), correct (draft top-1 == teacher
    top-1 on loss positions), counted (loss-masked positions, the accuracy denominator), and
    over the counted positions alpha_sum (Σ α_K, the acceptance's lower bound), alpha_hi_sum
    (Σ its upper bound) and mass_out_sum (Σ target mass on top-K tokens outside the draft vocab).
    A new objective or metric adds a row here; `Sums` and the trainer carry any row.
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    per_token: list | None = None  # per step (loss [B,L], correct [B,L], counted [B,L], loss_mask [B,L])

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


def chunked_terms(model, out: torch.Tensor, v: StepView, objective: str = "ce", eta: float = DEFAULT_LK_ETA,
                  chunk_tokens: int = LOSS_CHUNK_TOKENS) -> RowTerms:
    """The objective and acceptance terms [B, L] of one TTT step (stage2_train.objectives.RowTerms),
    with at most one chunk's [rows, N] logits alive.

    Under autograd each chunk is checkpointed: backward recomputes its logits instead
    of keeping [B, L, N] of them per TTT step.
    """
    B, L = out.shape[:2]
    step = max(1, chunk_tokens // max(B, 1))
    teacher = (v.idx, v.valid, v.logp, v.prob)
    if step >= L:
        parts = [chunk_terms(model, out, *teacher, objective, eta)]
    else:
        grad = torch.is_grad_enabled() and out.requires_grad
        parts = []
        for a in range(0, L, step):
            args = (out[:, a:a + step], *(t[:, a:a + step] for t in teacher), objective, eta)
            parts.append(checkpoint(chunk_terms, model, *args, use_reentrant=False) if grad
                         else chunk_terms(model, *args))
    return RowTerms(*(torch.cat(c, dim=1) for c in zip(*parts)))


def loss_token_counts(batch: dict, ttt_length: int) -> torch.Tensor:
    """[S] loss positions per TTT step of a batch (float64, on the batch's device), before any forward:
    the denominators of loss_k. The trainer sums them over the step's micro-batches and ranks."""
    return torch.stack([step_view(batch, k).loss_mask.sum() for k in range(ttt_length)]).to(torch.float64)


def ttt_forward(model, batch: dict, ttt_length: int, decay: float = 0.8, *, objective: str = "ce",
                lk_eta: float = DEFAULT_LK_ETA, keep_per_token: bool = False,
                loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, loss_tokens: Optional[torch.Tensor] = None) -> TTTOut:
    """Unroll `ttt_length` steps of the draft on one padded batch (see stage2_train.teacher).

    Rows are at their own positions t; the model's `ttt_step` rotates step k at t + k.
    loss = Σ_k decay^k (Σ objective_k over this batch's loss positions) / loss_tokens[k]. By default
    loss_tokens is this batch's own count (a per-batch mean); the trainer passes the count of
    the whole optimizer step over all ranks, so that every loss token weighs the same.
    objective, lk_eta: train.loss, train.lk_eta (stage2_train.objectives).
    """
    check_objective(objective, lk_eta)
    hidden = model.fuse(batch["hidden"])
    B, L = batch["input_ids"].shape
    pos = torch.arange(L, device=hidden.device).unsqueeze(0).expand(B, L)
    cache: list = []
    loss_sums: list = []  # [S] differentiable Σ objective_k
    rows: list = []  # kept on the device: no host sync here
    per_token = [] if keep_per_token else None
    for k in range(ttt_length):
        v = step_view(batch, k)
        out = model.ttt_step(hidden, v.input_ids, pos, cache)
        t = chunked_terms(model, out, v, objective, lk_eta, loss_chunk_tokens)   # each [B, L]
        lm = v.loss_mask.to(t.loss.dtype)
        loss_sums.append((t.loss * lm).sum())
        with torch.no_grad():
            hit = (t.top1 == v.top1) & v.loss_mask
            over_counted = [torch.where(v.counted, x, 0.0).sum(dtype=torch.float64)
                            for x in (t.alpha, t.alpha_hi, t.mass_out)]
            rows.append(torch.stack([lm.sum().double(), hit.sum().double(), v.counted.sum().double(),
                                     *over_counted]))
            if per_token is not None:
                per_token.append((t.loss.detach(), hit, v.counted, v.loss_mask))
        hidden = out
    loss_k = torch.stack(loss_sums)  # fp32 (fp64 for a float64 head)
    stats = torch.stack(rows, dim=1)  # [6, S] float64
    n = stats[0] if loss_tokens is None else loss_tokens
    weights = decay ** torch.arange(ttt_length, device=loss_k.device, dtype=torch.float64)
    loss = (loss_k * (weights / n.clamp_min(1.0)).to(loss_k.dtype)).sum()
    sums = {"loss_sum": loss_k.detach().double(), "loss_n": stats[0], "correct": stats[1], "counted": stats[2],
            "alpha_sum": stats[3], "alpha_hi_sum": stats[4], "mass_out_sum": stats[5]}
    return TTTOut(loss, sums, per_token)
