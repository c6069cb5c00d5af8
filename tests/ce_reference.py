"""The soft-CE training path as it was before train.loss existed (main at 21d6c0a), frozen here as
the reference that `train.loss: ce` must reproduce (loss and gradients): bit for bit until the fused
gathered log-softmax (stage2_train/gathered_log_softmax.py), to fp32 rounding since."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stage2_train.teacher import step_view


def _chunk_ce(model, out: torch.Tensor, idx: torch.Tensor, prob: torch.Tensor):
    """Soft CE against the teacher and the draft's top-1, for one chunk of positions."""
    logits = model.logits(out)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    ce = -(prob * logp.gather(-1, idx)).sum(-1)
    return ce, logp.argmax(-1)


def chunked_ce(model, out, idx, prob, chunk_tokens: int = 2048):
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


def ttt_forward_ce(model, batch: dict, ttt_length: int, decay: float = 0.8, *, loss_chunk_tokens: int = 2048,
                   loss_tokens=None):
    """(loss, {loss_sum, loss_n, correct, counted}) of the old unroll."""
    hidden = model.fuse(batch["hidden"])
    B, L = batch["input_ids"].shape
    pos = torch.arange(L, device=hidden.device).unsqueeze(0).expand(B, L)
    cache, ce_sums, rows = [], [], []
    for k in range(ttt_length):
        v = step_view(batch, k)
        out = model.ttt_step(hidden, v.input_ids, pos, cache)
        ce, top = chunked_ce(model, out, v.idx, v.prob, loss_chunk_tokens)
        lm = v.loss_mask.to(ce.dtype)
        ce_sums.append((ce * lm).sum())
        with torch.no_grad():
            hit = (top == v.top1) & v.loss_mask
            rows.append(torch.stack([lm.sum(), hit.sum().float(), v.counted.sum().float()]))
        hidden = out
    ce_k = torch.stack(ce_sums)
    stats = torch.stack(rows, dim=1).double()
    n = stats[0] if loss_tokens is None else loss_tokens
    weights = decay ** torch.arange(ttt_length, device=ce_k.device, dtype=torch.float64)
    loss = (ce_k * (weights / n.clamp_min(1.0)).to(ce_k.dtype)).sum()
    return loss, {"loss_sum": ce_k.detach().double(), "loss_n": stats[0], "correct": stats[1], "counted": stats[2]}
