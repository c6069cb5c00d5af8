"""The fused CPU path of the TTT attention (flash kernel's lse, its gradient folded into the kernel's
backward) against an explicit dense reference written here and against the blockwise path (the
implementation before issue 21: SDPA + a separately recomputed causal log-sum-exp)."""
import pytest
import torch

import stage2_train.ttt_attention as ta
from stage2_train.losses import ttt_forward

from test_train_unit import TARGET_CFG
from test_ttt_positions import _batch, tiny_head


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def dense_reference(q, k, v):
    """(o, lse) of causal attention with the T x T scores written out, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def dense_ttt(q, k0, v0, dk, dv):
    """The TTT step's attention over the explicit [T, (k+1)T] mask (float64)."""
    q, k0, v0 = q.double(), k0.double(), v0.double()
    T, n = q.shape[2], len(dk)
    keys = torch.cat([k0] + [x.double() for x in dk], 2)
    vals = torch.cat([v0] + [x.double() for x in dv], 2)
    mask = torch.zeros(T, (n + 1) * T, dtype=torch.bool)
    mask[:, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    for j in range(1, n + 1):
        mask[:, j * T:(j + 1) * T] = torch.eye(T, dtype=torch.bool)
    s = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vals


def _qkv(dtype, B=2, H=3, T=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) for _ in range(3)]


def _grads(fn, q, k, v, w_o, w_l):
    for x in (q, k, v):
        x.grad = None
    o, lse = fn(q, k, v)
    ((o.double() * w_o).sum() + (lse.double() * w_l).sum()).backward()
    return o.detach().double(), lse.detach().double(), [x.grad.double() for x in (q, k, v)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_fused_output_lse_and_gradients_equal_dense_reference(dtype, tol, monkeypatch):
    monkeypatch.setattr(ta, "FUSED", True)
    q, k, v = _qkv(dtype)
    assert ta._fused(q)
    g = torch.Generator().manual_seed(1)
    w_o, w_l = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(q.shape[:3], generator=g,
                                                                                   dtype=torch.float64)
    got = _grads(ta.causal_attention, q, k, v, w_o, w_l)
    want = _grads(dense_reference, q, k, v, w_o, w_l)
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fused_equals_blockwise_in_bf16_and_handles_a_missing_gradient(monkeypatch):
    q, k, v = _qkv(torch.bfloat16, T=50)
    g = torch.Generator().manual_seed(2)
    w_o, w_l = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(q.shape[:3], generator=g,
                                                                                   dtype=torch.float64)
    res = {}
    for fused in (True, False):
        monkeypatch.setattr(ta, "FUSED", fused)
        res[fused] = _grads(ta.causal_attention, q, k, v, w_o, w_l)
    ref = _grads(dense_reference, q, k, v, w_o, w_l)
    for i, (a, b, r) in enumerate(zip([res[True][0], res[True][1], *res[True][2]],
                                      [res[False][0], res[False][1], *res[False][2]],
                                      [ref[0], ref[1], *ref[2]])):
        scale = r.abs().max()
        # both bf16 paths sit within bf16 rounding of the exact result, and of each other
        assert (a - r).abs().max() <= 0.03 * scale, i
        assert (a - b).abs().max() <= 0.03 * scale, i
    monkeypatch.setattr(ta, "FUSED", True)
    q, k, v = _qkv(torch.float64, T=9)
    o, lse = ta.causal_attention(q, k, v)
    lse.sum().backward()                   # only lse used: the kernel sees a zero output gradient
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    dense_reference(qr, kr, vr)[1].sum().backward()
    torch.testing.assert_close(q.grad, qr.grad, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_ttt_attention_equals_the_explicit_mask(fused, monkeypatch):
    monkeypatch.setattr(ta, "FUSED", fused)
    B, H, T, d = 2, 3, 21, 8
    g = torch.Generator().manual_seed(3)
    mk = lambda: torch.randn(B, H, T, d, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    q, k0, v0 = mk(), mk(), mk()
    dk, dv = [mk(), mk()], [mk(), mk()]
    w = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    leaves = [q, k0, v0, *dk, *dv]
    got_o = ta.ttt_attention(q, k0, v0, dk, dv)
    got = torch.autograd.grad((got_o * w).sum(), leaves)
    want_o = dense_ttt(q, k0, v0, dk, dv)
    want = torch.autograd.grad((want_o * w).sum(), leaves)
    torch.testing.assert_close(got_o, want_o, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_keeps_no_T_by_T_tensor_for_backward():
    q, k, v = _qkv(torch.float32, B=1, H=2, T=256, d=8)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, lse = ta.causal_attention(q, k, v)
    (o.sum() + lse.sum()).backward()
    assert sizes and max(sizes) <= 2 * 256 * 8 < 256 * 256


def test_ttt_forward_loss_and_gradients_same_on_both_paths(monkeypatch):
    """The training step's loss and every gradient: fused == blockwise (fp32 rounding)."""
    V, N, T = 300, 32, 24
    batch = _batch(2, T, V, N, seed=5)
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(ta, "FUSED", fused)
        m = tiny_head(n_draft=N, target={**TARGET_CFG, "vocab_size": V})
        o = ttt_forward(m, batch, 4)
        o.loss.backward()
        out[fused] = (o.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert set(out[True][1]) == set(out[False][1])
    for n, gr in out[True][1].items():
        torch.testing.assert_close(gr, out[False][1][n], rtol=1e-4, atol=1e-6, msg=n)
