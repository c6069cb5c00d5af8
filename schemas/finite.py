"""Non-finite values stop the stage that meets them (DESIGN.md section 9).

Three places, three costs:

* Host arrays of stored bits (cache readers, `shards verify`): `has_nonfinite(bits, fmt)`
  tests the exponent field without a temporary array: a value is inf/NaN exactly when
  all its exponent bits are set, i.e. as a signed integer it is >= the exponent mask
  (positive) or as an unsigned one >= sign | mask (negative). Two max-reductions per
  block, the second from cache; `nonfinite_report` (slow path, only after a hit) says
  where.
* Device tensors (stage 1): `device_all_finite(*tensors)` is one min/max reduction per
  tensor and a bool on the device; nothing is copied to the host until the caller
  decides to look (stage1_extract.extract looks one batch later).
* Training (`FiniteWatch`): loss and gradient norm folded into device scalars every
  micro-batch, with the first bad step, and read (one host sync, one all-reduce) only
  when the trainer checks: before a checkpoint or a head is written and at log steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

# stored format -> (unsigned view, signed view, exponent mask, sign bit)
FORMATS = {
    "bf16": (np.uint16, np.int16, 0x7F80, 0x8000),
    "fp16": (np.uint16, np.int16, 0x7C00, 0x8000),
    "e4m3": (np.uint8, np.int8, 0x7F, 0x80),  # float8_e4m3fn: no inf; NaN is S.1111.111
}
BLOCK_BYTES = 1 << 19  # the second reduction of a block reads it from L2 (1 MiB here)


class NonFiniteError(ValueError):
    """Non-finite values where the pipeline needs finite ones; the message says where."""


def has_nonfinite(bits: np.ndarray, fmt: str) -> bool:
    """Does an array of stored bits (bf16 / fp16 as uint16, e4m3 as uint8) hold an inf or a NaN?"""
    unsigned, signed, mask, sign = FORMATS[fmt]
    flat = np.ascontiguousarray(bits).reshape(-1).view(unsigned)
    s = flat.view(signed)
    step = max(1, BLOCK_BYTES // flat.itemsize)
    for i in range(0, flat.size, step):
        if s[i:i + step].max() >= mask or flat[i:i + step].max() >= (sign | mask):
            return True
    return False


def nonfinite_mask(bits: np.ndarray, fmt: str) -> np.ndarray:
    unsigned, _signed, mask, _sign = FORMATS[fmt]
    return (np.asarray(bits).view(unsigned) & mask) == mask


def nonfinite_report(bits: np.ndarray, fmt: str, row0: int = 0, slots: Optional[Sequence] = None) -> str:
    """'N non-finite values (first at row r, layer slot j, column c: inf)': where a hit is (slow path).

    `bits` is [rows, ...]; `slots` names the second axis (e.g. the layer ids of `hidden`)."""
    m = nonfinite_mask(bits, fmt)
    n = int(m.sum())
    if not n:
        return "no non-finite values"
    idx = np.unravel_index(int(np.flatnonzero(m.reshape(-1))[0]), m.shape)
    where = [f"row {row0 + int(idx[0])}"]
    if len(idx) > 2:
        where.append(f"layer {slots[int(idx[1])]}" if slots is not None else
                     f"layer slot {int(idx[1])} of (low, mid, high)")
    if len(idx) > 1:
        where.append(f"column {int(idx[-1])}")
    return f"{n} non-finite value{'s' * (n > 1)} (first at {', '.join(where)}: {_value(bits[idx], fmt)})"


def _value(b, fmt: str) -> str:
    unsigned, _signed, mask, sign = FORMATS[fmt]
    b = int(np.asarray(b).view(unsigned))
    mantissa = b & ~(sign | mask) & np.iinfo(unsigned).max
    if fmt == "e4m3" or mantissa:
        return "nan"
    return "-inf" if b & sign else "inf"


def host_nonfinite(a: np.ndarray) -> int:
    """Count of inf/NaN in a host float array (any float dtype)."""
    return int(a.size - np.count_nonzero(np.isfinite(a))) if np.issubdtype(a.dtype, np.floating) else 0


# --------------------------------------------------------------------------- device tensors


def device_all_finite(*tensors):
    """A bool tensor on the tensors' device: every value of every float tensor is finite.

    One min/max reduction per tensor (aminmax propagates NaN; ±inf shows in the min or the
    max); no host copy, no synchronisation."""
    import torch

    ends = [torch.stack(torch.aminmax(t.detach().reshape(-1))).float() for t in tensors if t.numel()]
    if not ends:
        dev = tensors[0].device if tensors else "cpu"
        return torch.ones((), dtype=torch.bool, device=dev)
    return torch.isfinite(torch.cat([e.to(ends[0].device) for e in ends])).all()


def tensor_nonfinite(tensors: dict) -> list[str]:
    """'name (n of m)' for every float tensor holding inf or NaN (a head's weights, a batch)."""
    import torch

    bad = []
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            n = int(v.numel() - torch.isfinite(v).sum())
            if n:
                bad.append(f"{k} ({n} of {v.numel()})")
    return bad


class FiniteWatch:
    """Is every loss and gradient norm of a training run finite? Asked without a host sync per step.

    `observe(step, loss, grad_norm)` folds the values into a device tensor: per kind (1 loss,
    2 gradient norm) the first step where it was inf/NaN; `check(reduce_min=...)` reads it
    once (one MIN all-reduce of those two numbers across ranks, so every rank stops at the
    same check with the same message) and raises NonFiniteError naming the first bad step and
    what was bad at it, on any rank. A trainer checks before it writes a checkpoint or a head,
    so the last checkpoint written is always a good one, and at its log steps.

    With fp16 loss scaling, an overflowing gradient is expected (the step is skipped and
    the scale lowered): pass grad_norm=None there and watch the loss only.
    """

    LOSS, GRAD = 1, 2
    NEVER = 2 ** 62  # "no bad step yet": larger than any step

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.first_bad = torch.full((2,), self.NEVER, dtype=torch.int64, device=self.device)  # loss, grad norm

    def observe(self, step: int, loss=None, grad_norm=None) -> None:
        import torch

        for i, value in enumerate((loss, grad_norm)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                ok = torch.isfinite(value.detach().to(self.device, non_blocking=True)).all()
                self.first_bad[i] = torch.minimum(self.first_bad[i], torch.where(ok, self.NEVER, int(step)))
            elif not math.isfinite(float(value)):  # already a host number (e.g. DeepSpeed's grad norm)
                self.first_bad[i].clamp_(max=int(step))

    def state(self, reduce_min=None) -> tuple[int, int]:
        """(first bad step or -1, what was bad at it: LOSS | GRAD bits) over every rank: one reduction of two
        numbers, one host sync.

        `reduce_min(t)`: an in-place MIN all-reduce over the ranks (the trainer passes
        stage2_train.collectives.Ranks'); None with one process."""
        key = self.first_bad.clone()
        if reduce_min is not None:
            reduce_min(key)
        loss_step, grad_step = key.tolist()
        step = min(loss_step, grad_step)
        if step >= self.NEVER:
            return -1, 0
        return step, self.LOSS * (loss_step == step) | self.GRAD * (grad_step == step)

    def check(self, where: str = "training", reduce_min=None) -> None:
        step, what = self.state(reduce_min)
        if step < 0:
            return
        names = [n for n, bit in (("the loss", self.LOSS), ("the gradient norm", self.GRAD)) if what & bit]
        raise NonFiniteError(f"{where}: {' and '.join(names) or 'a value'} became non-finite (inf/NaN) at step "
                             f"{step}; stopped before writing anything from it")
