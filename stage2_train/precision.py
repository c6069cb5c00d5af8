"""The head's compute dtype: bf16 autocast over fp32 weights where bf16 is native.

The head is small, so keeping its weights, gradients and AdamW state in fp32 costs
little memory, while running its matmuls in bf16 is 2.6-3.3x faster on an AVX512-BF16
CPU (bench/bench_train_step.py) and the usual choice on GPUs. Under autocast, softmax
and log-softmax run in fp32 (autocast's fp32 list), RMSNorm upcasts itself,
transformers' rotary embedding disables autocast, and the TTT attention accumulates
its log-sum-exp in fp32 (stage2_train.ttt_attention), so only the matmul inputs are
rounded.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from schemas.target import fast_dtype


def resolve_compute_dtype(setting: str, device: torch.device, weights_dtype: str) -> Optional[torch.dtype]:
    """The autocast dtype for `train.compute_dtype`, or None for none.

    A bf16/fp16 DeepSpeed config already keeps the weights in half precision: no autocast.
    """
    if weights_dtype != "float32" or setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if fast_dtype(device) == torch.bfloat16 else None


def compute_context(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device` (a no-op context for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "float32" if dtype is None else str(dtype).replace("torch.", "")
