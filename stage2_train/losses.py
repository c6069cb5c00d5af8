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


def ttt_forward(model, batch: dict, ttt_length: int, decay: float = 0.8, *, keep_per_token: bool = False) -> TTTOut:
    """Unroll `ttt_length` steps of the draft on one padded batch (see stage2_train.teacher)."""
    hidden = model.fuse(batch["hidden"])
    B, L = batch["input_ids"].shape
    pos = torch.arange(L, device=hidden.device).unsqueeze(0).expand(B, L)
    key_padding = batch.get("valid")
    cache: list = []
    total = hidden.new_zeros((), dtype=torch.float32)
    rows: list = []  # kept on the device; one host sync at the end
    per_token = [] if keep_per_token else None
    for k in range(ttt_length):
        v = step_view(batch, k)
        out = model.ttt_step(hidden, v.input_ids, pos, cache, key_padding=key_padding)
        logits = model.logits(out).float()
        logp = F.log_softmax(logits, dim=-1)
        ce = -(v.prob * logp.gather(-1, v.idx)).sum(-1)          # [B, L]
        lm = v.loss_mask.to(ce.dtype)
        n = lm.sum()
        loss_k = (ce * lm).sum() / n.clamp_min(1.0)
        total = total + (decay ** k) * loss_k
        with torch.no_grad():
            hit = (logits.argmax(-1) == v.top1) & v.loss_mask
            rows.append(torch.stack([(ce * lm).sum(), n, hit.sum().float(), v.counted.sum().float()]))
            if per_token is not None:
                per_token.append((ce.detach(), hit, v.counted, v.loss_mask))
        hidden = out
    stats = torch.stack(rows, dim=1).detach().double().cpu()  # [4, S]
    return TTTOut(total, stats[0], stats[1], stats[2], stats[3], per_token)
