"""Attention of one training-time-test step without T x T tensors kept for backward.

Step k's query at position t attends to the step-0 keys at positions <= t (causal)
and to its own position's keys of steps 1..k (the "diagonal"). Written as one
softmax over both sets:

    o_t = (Z0_t * o0_t + sum_j exp(s_jt) v_jt) / (Z0_t + sum_j exp(s_jt))

with o0 the causal attention over the step-0 keys, Z0 = exp(lse0) its softmax
normaliser and s_jt the diagonal scores (one dot product per position). Exact, not an
approximation; o0 and lse0 both carry gradients. Two ways to get them:

* fused (CPU): the flash-attention kernel returns lse0 with o0 (one pass over the
  scores), and its backward takes the lse gradient too: dS = P * (dP - D + g_lse), where
  the kernel computes D_t = dO_t . O_t, so one extra head-dim column (q, k, v: 0; O: -g_lse;
  dO: 1) makes it compute D_t - g_lse_t. Saved for backward: q, k, v, o0, lse0.
* blockwise (elsewhere, and the reference): `scaled_dot_product_attention` for o0, and
  `causal_lse` recomputing the scores in fp32 query chunks, forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one [B, heads, chunk, T] fp32 score block (2^26 = 256 MiB).
SCORE_BLOCK_ELEMENTS = 1 << 26


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for bf16/fp16/fp32 inputs, float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_rows(q: torch.Tensor) -> int:
    B, H, T, _ = q.shape
    return max(1, min(T, SCORE_BLOCK_ELEMENTS // max(1, B * H * T)))


def _block_scores(q: torch.Tensor, k: torch.Tensor, a: int, b: int, scale: float) -> torch.Tensor:
    """fp32 scores of queries a..b-1 against keys 0..b-1, -inf above the causal diagonal."""
    acc = _acc(q)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run this matmul in bf16 despite .to(acc)
        s = torch.matmul(q[:, :, a:b].to(acc), k[:, :, :b].to(acc).transpose(-1, -2)) * scale
    rows = torch.arange(a, b, device=q.device)[:, None]
    cols = torch.arange(b, device=q.device)[None, :]
    return s.masked_fill(cols > rows, float("-inf"))


class _CausalLSE(torch.autograd.Function):
    """lse_t = log sum_{s<=t} exp(scale q_t . k_s), [B, H, T] (fp32, or float64 for float64 inputs); blockwise forward and backward."""

    @staticmethod
    def forward(ctx, q, k, scale: float):
        T = q.shape[2]
        C = _chunk_rows(q)
        lse = torch.empty(q.shape[:3], dtype=_acc(q), device=q.device)
        for a in range(0, T, C):
            b = min(T, a + C)
            lse[:, :, a:b] = torch.logsumexp(_block_scores(q, k, a, b, scale), dim=-1)
        ctx.save_for_backward(q, k, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, g):
        # d lse_t / d q_t = scale sum_s p_ts k_s ;  d lse_t / d k_s = scale p_ts q_t
        q, k, lse = ctx.saved_tensors
        T, C, scale = q.shape[2], _chunk_rows(q), ctx.scale
        acc = _acc(q)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        for a in range(0, T, C):
            b = min(T, a + C)
            p = torch.exp(_block_scores(q, k, a, b, scale) - lse[:, :, a:b, None])
            gp = p * g[:, :, a:b, None].to(acc)
            dq[:, :, a:b] = torch.matmul(gp, k[:, :, :b].to(acc)) * scale
            dk[:, :, :b] += torch.matmul(gp.transpose(-1, -2), q[:, :, a:b].to(acc)) * scale
        return dq.to(q.dtype), dk.to(k.dtype), None


def causal_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Under autocast the inputs are rounded to its dtype (as a matmul there would round them) and the
    scores and their log-sum-exp are accumulated in fp32 (stage2_train/precision.py)."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k = q.to(dt), k.to(dt)
    return _CausalLSE.apply(q, k, scale)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
FUSED = True   # False: the blockwise path everywhere (tests compare the two)


class _FlashCPU(torch.autograd.Function):
    """(o, lse) of causal attention from the CPU flash kernel; gradients through both."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        o, lse = _FLASH_CPU(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, g_o, g_lse):
        q, k, v, o, lse = ctx.saved_tensors
        if g_o is None:
            g_o = torch.zeros_like(o)
        if g_lse is None:
            g_lse = torch.zeros_like(lse)
        d = q.shape[-1]
        col = q.new_zeros(q.shape[:-1] + (1,))

        def wide(x, extra):
            return torch.cat((x, extra), dim=-1)

        dq, dk, dv = _FLASH_CPU_BWD(wide(g_o, torch.ones_like(col)), wide(q, col), wide(k, col), wide(v, col),
                                    wide(o, -g_lse.to(o.dtype).unsqueeze(-1)), lse, 0.0, True, scale=ctx.scale)
        return dq[..., :d], dk[..., :d], dv[..., :d], None


def _fused(q: torch.Tensor) -> bool:
    return FUSED and q.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BWD is not None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B,H,T,d] in q's dtype, lse [B,H,T] fp32 (float64 for float64)) of causal attention."""
    scale = q.shape[-1] ** -0.5
    if _fused(q):
        # the raw kernel takes one dtype; under autocast RoPE leaves q, k in fp32 while v is bf16:
        # run it in the dtype autocast would give F.scaled_dot_product_attention
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else \
            torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        o, lse = _FlashCPU.apply(q.to(dt), k.to(dt), v.to(dt), scale)
        return o, lse.to(_acc(q))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), causal_lse(q, k, scale)


def ttt_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor,
                  diag_k: list[torch.Tensor], diag_v: list[torch.Tensor]) -> torch.Tensor:
    """q [B,H,T,d]; k0/v0 the step-0 keys/values; diag_k/v those of steps 1..k (all [B,H,T,d], heads
    already expanded). Returns the attention output [B,H,T,d] in q's dtype."""
    if not diag_k:
        return F.scaled_dot_product_attention(q, k0, v0, is_causal=True)
    scale = q.shape[-1] ** -0.5
    acc = _acc(q)
    o0, lse0 = causal_attention(q, k0, v0)                                          # [B,H,T,d], [B,H,T]
    sd = torch.stack([(q.to(acc) * kj.to(acc)).sum(-1) for kj in diag_k], dim=-1) * scale  # [B,H,T,k]
    lse = torch.logsumexp(torch.cat((lse0[..., None], sd), dim=-1), dim=-1, keepdim=True)
    o = torch.exp(lse0[..., None] - lse) * o0.to(acc)
    wd = torch.exp(sd - lse)
    for j, vj in enumerate(diag_v):
        o = o + wd[..., j:j + 1] * vj.to(acc)
    return o.to(q.dtype)
