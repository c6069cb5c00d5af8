"""log q_v = logits_v − logsumexp(logits) at K chosen columns, and the row argmax, without a [rows, N] fp32 copy.

Every objective reads the draft's log-softmax only at the K cached teacher columns (and the argmax
for accuracy). Written as `log_softmax(logits.float()).gather(idx)` that costs, per TTT step and
per chunk, an fp32 copy of the logits, the log-softmax, a separate argmax, and in backward a zeroed
[rows, N] gradient for the gather's scatter, the log-softmax backward and a cast back: seven or
eight passes over [rows, N] tensors, about a third of a bf16 CPU training step (issue 21 profile).

Here the forward reads the logits once (max with its index, then Σ exp in fp32) and keeps only the
logits (in their own dtype) and the row's log-sum-exp for backward; the backward writes the gradient
once:  d/dx_j = Σ_k g_k [j = idx_k] − softmax_j · Σ_k g_k.  Rows are processed in blocks through one
fp32 scratch buffer, small enough to stay in a CPU core's L2 cache between the passes (and reused: a
fresh multi-MiB tensor per block costs page faults that take 7x the arithmetic on CPU).
"""
from __future__ import annotations

import torch

# Elements of one block's fp32 scratch: 2^19 = 2 MiB on CPU (one core's L2), 2^24 = 64 MiB elsewhere.
CPU_BLOCK_ELEMENTS = 1 << 19
DEVICE_BLOCK_ELEMENTS = 1 << 24


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32; fp64 for float64 logits


def _block_rows(x: torch.Tensor) -> int:
    cap = CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1, cap // max(1, x.shape[-1]))


def _blocks(x: torch.Tensor, acc: torch.dtype):
    """(row slice, an fp32/fp64 copy of those rows in one reused scratch buffer) over the rows of x [rows, N]."""
    R = _block_rows(x)
    scratch = torch.empty(min(R, x.shape[0]), x.shape[1], dtype=acc, device=x.device)
    for a in range(0, x.shape[0], R):
        b = slice(a, a + R)
        yield b, scratch[:min(R, x.shape[0] - a)].copy_(x[b])


class _GatheredLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor):
        x = logits.reshape(-1, logits.shape[-1])
        ix = idx.reshape(-1, idx.shape[-1])
        acc = _acc(x)
        lse = torch.empty(x.shape[0], 1, dtype=acc, device=x.device)
        top1 = torch.empty(x.shape[0], 1, dtype=torch.int64, device=x.device)
        for b, xf in _blocks(x, acc):
            m, top1[b] = xf.max(-1, keepdim=True)
            # a row of -inf only (never from a linear layer) would give nan here, as log_softmax does
            lse[b] = xf.sub_(m).exp_().sum(-1, keepdim=True).log_().add_(m)
        logq = x.gather(-1, ix).to(acc) - lse
        ctx.save_for_backward(logits, idx, lse)
        ctx.mark_non_differentiable(top1)
        return logq.view(idx.shape), top1.view(idx.shape[:-1])

    @staticmethod
    def backward(ctx, g_logq, _g_top1):
        logits, idx, lse = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        ix = idx.reshape(-1, idx.shape[-1])
        g = g_logq.reshape(ix.shape).to(lse.dtype)
        neg_total = -g.sum(-1, keepdim=True)
        dx = torch.empty_like(x)
        for b, p in _blocks(x, lse.dtype):
            dx[b] = p.sub_(lse[b]).exp_().mul_(neg_total[b]).scatter_add_(-1, ix[b], g[b])
        return dx.view(logits.shape), None


def gathered_log_softmax(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits)[..., idx] [..., K] in fp32 (fp64 for float64 logits), argmax [...] int64).

    logits [..., N] of any float dtype (upcast exactly, so the argmax is the logits' own); idx [..., K]
    int64 column ids (repeats allowed: their gradients add, as a gather's do). Differentiable in logits.
    """
    return _GatheredLogSoftmax.apply(logits, idx)
