"""stage2_train.gathered_log_softmax against log_softmax(logits.float()).gather(idx) and argmax, written here."""
from __future__ import annotations

import pytest
import torch

import stage2_train.gathered_log_softmax as gls


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # 7 rows of 500 a block: several blocks per call and a ragged last one
    monkeypatch.setattr(gls, "CPU_BLOCK_ELEMENTS", 500 * 7)


def reference(x: torch.Tensor, idx: torch.Tensor):
    lp = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
    return lp.gather(-1, idx), lp.argmax(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_values_argmax_and_gradient_match_log_softmax_then_gather(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x0 = (4 * torch.randn(3, 37, 500, generator=g, dtype=torch.float64)).to(dtype)
    idx = torch.randint(0, 500, (3, 37, 16), generator=g)
    w = torch.randn(3, 37, 16, generator=g, dtype=torch.float64)
    got, want = {}, {}
    for fn, out in ((gls.gathered_log_softmax, got), (reference, want)):
        x = x0.clone().requires_grad_(True)
        lq, top1 = fn(x, idx)
        (lq * w.to(lq.dtype)).sum().backward()
        out.update(lq=lq.detach(), top1=top1, grad=x.grad, x=x.detach())
    assert got["lq"].dtype == want["lq"].dtype == torch.promote_types(dtype, torch.float32)
    assert got["grad"].dtype == dtype
    torch.testing.assert_close(got["lq"], want["lq"], rtol=tol, atol=tol)
    assert torch.equal(got["top1"], want["top1"])
    torch.testing.assert_close(got["grad"].double(), want["grad"].double(), rtol=tol, atol=tol if dtype != torch.bfloat16
                               else 2 ** -8 * want["grad"].abs().max().item())
    assert torch.equal(got["x"], x0), "the logits were changed in place"


def test_gradcheck_float64_with_repeated_columns():
    """Repeated ids (the padding entries of a teacher row all read column 0) add their gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 30, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 30, (2, 9, 5), generator=g)
    idx[..., 3:] = 0
    assert torch.autograd.gradcheck(lambda t: gls.gathered_log_softmax(t, idx)[0], (x,))


def test_no_grad_and_a_row_wider_than_a_block():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9000, generator=g)          # 9000 > 3500: one row a block
    idx = torch.randint(0, 9000, (4, 3), generator=g)
    with torch.no_grad():
        lq, top1 = gls.gathered_log_softmax(x, idx)
    rl, rt = reference(x, idx)
    torch.testing.assert_close(lq, rl, rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, rt)
