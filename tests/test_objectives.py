"""stage2_train.objectives against a full-distribution reference written here.

The tiny target's vocabulary fits in K, so the cache is exact and every bound is an equality;
the bound tests use K < V. The reference works in float64 over the whole target vocabulary
(q = 0 outside the draft vocab) and takes gradients by autograd.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ce_reference import _chunk_ce
from stage2_train.objectives import OBJECTIVES, check_objective, chunk_terms, raw_teacher, row_terms
from stage2_train.teacher import build_teacher

V, N, R = 10, 7, 6                               # target vocab, draft vocab, rows
DRAFT_IDS = np.array([0, 2, 3, 5, 6, 8, 9])      # target ids of the draft vocab (d2t)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _t2d(ids=DRAFT_IDS, vocab=V) -> np.ndarray:
    t2d = np.full(vocab, -1, dtype=np.int64)
    t2d[ids] = np.arange(len(ids))
    return t2d


def _case(seed=0, sharp=2.0, rows=R):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(sharp * torch.randn(rows, V, generator=g, dtype=torch.float64), -1)
    logits = (1.5 * torch.randn(rows, N, generator=g, dtype=torch.float64))
    return p, logits


def _cache(p: torch.Tensor, k: int = V):
    """What stage 1 stores: the top-k ids and their full-vocab log-probs (float32)."""
    lp, ids = torch.log(p).float().topk(k, dim=-1)
    return ids.numpy(), lp.numpy()


def _teacher(p, k=V, ids=DRAFT_IDS):
    tid, tlp = _cache(p, k)
    idx, valid, logp = raw_teacher(tid, tlp, _t2d(ids, p.shape[-1]))
    return torch.from_numpy(idx), torch.from_numpy(valid), torch.from_numpy(logp)


def reference(p: torch.Tensor, logits: torch.Tensor, objective: str, eta: float = 3.0, ids=DRAFT_IDS):
    """Full-vocabulary float64 reference: p over V, q over the draft vocab embedded in V."""
    q_d = torch.softmax(logits.double(), -1)
    q = torch.zeros(p.shape, dtype=torch.float64).index_copy(-1, torch.as_tensor(ids), q_d)
    alpha = torch.minimum(p, q).sum(-1)
    p_d = p[:, ids] / p[:, ids].sum(-1, keepdim=True)          # p~: restricted, renormalised
    ce = -(p_d * torch.log(q_d)).sum(-1)
    kl = (p_d * (torch.log(p_d) - torch.log(q_d))).sum(-1)
    if objective == "ce":
        return ce, alpha
    if objective == "tv":
        return 1 - alpha, alpha
    if objective == "lk_alpha":
        return -torch.log(alpha), alpha
    lam = torch.exp(-eta * alpha.detach())
    return lam * kl + (1 - lam) * (1 - alpha), alpha


def _ours(p, logits, objective, eta=3.0, prob=None, k=V):
    idx, valid, logp = _teacher(p, k)
    x = logits.float().clone().requires_grad_(True)
    t = row_terms(x, idx, valid, logp, prob, objective=objective, eta=eta)
    (g,) = torch.autograd.grad(t.loss.sum(), x)
    return t, g


def _ref(p, logits, objective, eta=3.0):
    x = logits.double().clone().requires_grad_(True)
    loss, alpha = reference(p, x, objective, eta)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), alpha.detach(), g


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_values_and_gradients_match_full_reference(objective):
    p, logits = _case(0)
    t, g = _ours(p, logits, objective)
    loss, alpha, g_ref = _ref(p, logits, objective)
    torch.testing.assert_close(t.loss.double(), loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=2e-6)
    # K = V: the cache is exact, so both bounds are the true acceptance
    torch.testing.assert_close(t.alpha.double(), alpha, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(t.alpha_hi.double(), alpha, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(t.mass_topk.double(), torch.ones(R, dtype=torch.float64), rtol=0, atol=2e-6)
    outside = np.setdiff1d(np.arange(V), DRAFT_IDS)
    torch.testing.assert_close(t.mass_out.double(), p[:, outside].sum(-1), rtol=2e-5, atol=2e-6)
    assert t.loss.dtype == torch.float32 and torch.equal(t.top1, logits.float().argmax(-1))


def test_ce_is_todays_soft_ce():
    """With the loader's p~ (build_teacher), ce is the log_softmax-then-gather soft CE of _chunk_ce to fp32
    rounding (the fused gathered log-softmax rounds x − (m + log s), not (x − m) − log s), with the same
    argmax; rebuilt from the raw log-probs it agrees to fp32 rounding too."""
    p, logits = _case(3)
    tid, tlp = _cache(p)
    idx_np, prob_np, _ = build_teacher(tid, tlp, _t2d())
    idx, valid, logp = _teacher(p)
    assert torch.equal(idx, torch.from_numpy(idx_np))
    head = torch.nn.Linear(4, N, bias=False)
    model = type("M", (), {"logits": head})()
    out = torch.randn(R, 4)
    ce_today, top_today = _chunk_ce(model, out, idx, torch.from_numpy(prob_np))
    loss, top1 = chunk_terms(model, out, idx, valid, logp, torch.from_numpy(prob_np), "ce")[:2]
    torch.testing.assert_close(loss, ce_today, rtol=1e-6, atol=1e-6)
    assert torch.equal(top1, top_today)
    rebuilt = chunk_terms(model, out, idx, valid, logp, None, "ce")[0]
    torch.testing.assert_close(rebuilt, ce_today, rtol=1e-6, atol=1e-6)


def test_point_mass_target():
    """p = δ_y: ce = lk_alpha = −log q_y (same gradient), tv = 1 − q_y, lk_lambda between KL and TV."""
    y = [0, 3, 5, 9, 2, 6]  # target ids, all in the draft vocab
    p = torch.full((R, V), 0.0, dtype=torch.float64)
    p[torch.arange(R), y] = 1.0
    _, logits = _case(1)
    idx, valid, logp = _teacher(p.clamp_min(1e-300))
    logp = torch.where(logp < -100, torch.full_like(logp, -math.inf), logp)  # the cache's log 0
    x = logits.float().requires_grad_(True)
    q_y = torch.softmax(x, -1)[torch.arange(R), torch.from_numpy(_t2d()[y])]
    res = {o: row_terms(x, idx, valid, logp, objective=o) for o in OBJECTIVES}
    torch.testing.assert_close(res["ce"].loss, -torch.log(q_y))
    torch.testing.assert_close(res["lk_alpha"].loss, -torch.log(q_y))
    torch.testing.assert_close(res["tv"].loss, 1 - q_y)
    g_ce = torch.autograd.grad(res["ce"].loss.sum(), x, retain_graph=True)[0]
    g_lk = torch.autograd.grad(res["lk_alpha"].loss.sum(), x, retain_graph=True)[0]
    torch.testing.assert_close(g_lk, g_ce)
    lam = torch.exp(-3.0 * q_y.detach())
    torch.testing.assert_close(res["lk_lambda"].loss, lam * -torch.log(q_y) + (1 - lam) * (1 - q_y))


def test_lk_lambda_limits_are_kl_and_tv():
    p, logits = _case(5)
    kl_loss, _, kl_g = _ref(p, logits, "lk_lambda", eta=0.0)
    t0, g0 = _ours(p, logits, "lk_lambda", eta=0.0)
    torch.testing.assert_close(t0.loss.double(), kl_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g0.double(), kl_g, rtol=1e-4, atol=2e-6)
    # η = 0 is KL: the same gradient as ce (KL = ce − H(p~))
    _, g_ce = _ours(p, logits, "ce")
    torch.testing.assert_close(g0, g_ce, rtol=1e-4, atol=1e-6)
    t_inf, g_inf = _ours(p, logits, "lk_lambda", eta=1e5)
    t_tv, g_tv = _ours(p, logits, "tv")
    assert bool((t_tv.alpha > 1e-3).all())  # exp(-1e5 α) = 0 exactly
    assert torch.equal(t_inf.loss, t_tv.loss) and torch.equal(g_inf, g_tv)


def test_lambda_weight_is_not_differentiated():
    """λ = exp(−η·sg(α)): the gradient is λ∇KL + (1 − λ)∇TV, with no term from ∂λ/∂α."""
    p, logits = _case(7)
    t, g = _ours(p, logits, "lk_lambda", eta=3.0)
    _, g_kl = _ours(p, logits, "lk_lambda", eta=0.0)
    _, g_tv = _ours(p, logits, "tv")
    lam = torch.exp(-3.0 * t.alpha)[:, None]
    torch.testing.assert_close(g, lam * g_kl + (1 - lam) * g_tv, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_finite_at_zero_overlap_and_on_empty_rows(objective):
    p, logits = _case(9)
    idx, valid, logp = _teacher(p)
    x = logits.float().clone()
    x[0] = -1e4
    x[0, 6] = 1e4                              # row 0: all draft mass on one token...
    logp[0] = torch.where(idx[0] == 6, torch.tensor(-math.inf), logp[0])  # ...that the target never emits
    valid[1] = False                           # row 1: no top-K token inside the draft vocab
    logp[2], valid[2] = -math.inf, False       # row 2: padding
    x.requires_grad_(True)
    t = row_terms(x, idx, valid, logp, objective=objective)
    (g,) = torch.autograd.grad(t.loss.sum(), x)
    t = t._replace(loss=t.loss.detach())
    assert bool(torch.isfinite(t.loss).all()) and bool(torch.isfinite(g).all())
    assert float(t.alpha[0]) == 0.0 and float(t.alpha[1]) == 0.0
    assert float(t.loss[1]) == 0.0 and float(t.loss[2]) == 0.0 and not g[1:3].any()
    assert float(t.mass_topk[2]) == 0.0
    if objective == "tv":
        assert float(t.loss[0]) == 1.0
    if objective == "lk_alpha":  # −log α_K in log space: large, finite, with a gradient toward overlap
        assert 1e3 < float(t.loss[0]) < 3e4 and g[0].abs().sum() > 0


def test_bounds_with_truncated_cache():
    """K < V: α_K <= α <= α_K + min(1 − P_K, 1 − Q_K), on many random rows and draft vocabs."""
    g = torch.Generator().manual_seed(11)
    Vb, Nb, K, rows = 40, 25, 6, 400
    p = torch.softmax(1.5 * torch.randn(rows, Vb, generator=g, dtype=torch.float64), -1)
    ids = np.sort(np.random.default_rng(0).choice(Vb, Nb, replace=False))
    logits = 1.5 * torch.randn(rows, Nb, generator=g, dtype=torch.float64)
    idx, valid, logp = _teacher(p, K, ids)
    t = row_terms(logits.float(), idx, valid, logp, objective="tv")
    _, alpha = reference(p, logits, "tv", ids=ids)
    assert bool((t.alpha.double() <= alpha + 1e-6).all())
    assert bool((alpha <= t.alpha_hi.double() + 1e-6).all())
    assert bool((t.alpha_hi.double() <= 1 - t.mass_out.double() + 1e-6).all())
    assert float((alpha - t.alpha.double()).max()) > 1e-3  # the truncation is really there
    # the upper bound is attained: q outside T∩D sits exactly where p's remainder is
    q = torch.zeros(Nb, dtype=torch.float64)
    p1 = p[0]
    top = set(torch.topk(p1, K).indices.tolist())
    rest = [j for j, tid in enumerate(ids) if tid not in top]
    q[rest] = p1[ids[rest]]
    inside = [j for j, tid in enumerate(ids) if tid in top]
    q[inside] = (1 - q.sum()) / len(inside)
    t1 = row_terms(torch.log(q).float()[None], idx[:1], valid[:1], logp[:1], objective="tv")
    _, a1 = reference(p[:1], torch.log(q)[None], "tv", ids=ids)
    assert float(t1.alpha[0]) < float(a1[0]) - 1e-3
    if 1 - float(t1.mass_topk[0]) <= 1 - float(q[inside].sum()):  # min picks p's remainder, which q covers
        torch.testing.assert_close(t1.alpha_hi.double(), a1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bf16_autocast(objective):
    """Computed in fp32 inside: bf16 logits give exactly the fp32 result of the same values, and a
    head run under bf16 autocast stays within bf16 rounding of the fp32 head."""
    p, _ = _case(13)
    idx, valid, logp = _teacher(p)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, N, bias=False)
    model = type("M", (), {"logits": head})()
    out = torch.randn(R, 16)
    lb = head(out).bfloat16()
    a, b = row_terms(lb, idx, valid, logp, objective=objective), row_terms(lb.float(), idx, valid, logp,
                                                                            objective=objective)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    def run(autocast: bool):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            t = chunk_terms(model, out, idx, valid, logp, None, objective)
        t[0].sum().backward()
        return t, head.weight.grad.clone()

    (t32, g32), (t16, g16) = run(False), run(True)
    assert t16[0].dtype == torch.float32 and t16[2].dtype == torch.float32
    torch.testing.assert_close(t16[0], t32[0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(t16[2], t32[2], rtol=3e-2, atol=1e-2)
    torch.testing.assert_close(g16, g32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_checkpointed_chunks_match(objective):
    p, _ = _case(17, rows=12)
    idx, valid, logp = _teacher(p)
    torch.manual_seed(1)
    head = torch.nn.Linear(8, N, bias=False)
    model = type("M", (), {"logits": head})()
    out = torch.randn(12, 8, requires_grad=True)

    def grads(chunked: bool):
        head.zero_grad()
        out.grad = None
        if chunked:
            parts = [checkpoint(chunk_terms, model, out[a:a + 5], idx[a:a + 5], valid[a:a + 5], logp[a:a + 5],
                                None, objective, 3.0, use_reentrant=False) for a in range(0, 12, 5)]
            loss = torch.cat([q[0] for q in parts])
        else:
            loss = chunk_terms(model, out, idx, valid, logp, None, objective)[0]
        loss.sum().backward()
        return loss.detach(), head.weight.grad.clone(), out.grad.clone()

    for x, y in zip(grads(True), grads(False)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_bad_objective_and_eta():
    with pytest.raises(ValueError, match="unknown objective 'kl'; choose one of ce, tv, lk_alpha, lk_lambda"):
        check_objective("kl", 3.0)
    for eta in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lk_eta must be a finite number >= 0"):
            check_objective("lk_lambda", eta)


def test_config_keys():
    import typing

    from schemas.config import ConfigError, TrainConfig, load_config

    assert typing.get_args(TrainConfig.model_fields["loss"].annotation) == OBJECTIVES
    raw = {"target": {"path": "t"}}
    c = load_config(raw=raw, overrides=["train.loss=lk_lambda", "train.lk_eta=0"])
    assert (c.train.loss, c.train.lk_eta) == ("lk_lambda", 0.0)
    assert (load_config(raw=raw).train.loss, load_config(raw=raw).train.lk_eta) == ("ce", 3.0)
    with pytest.raises(ConfigError, match=r"'train.loss': Input should be 'ce', 'tv', 'lk_alpha' or 'lk_lambda'"):
        load_config(raw=raw, overrides=["train.loss=kl"])
    # non-finite floats are refused by the one finite-float rule for every config field (issue 22)
    for bad, msg in ((".inf", "must be a finite number, not inf"), (".nan", "must be a finite number, not nan"),
                     ("-1", "Input should be greater than or equal to 0")):
        with pytest.raises(ConfigError, match=f"'train.lk_eta': {msg}"):
            load_config(raw=raw, overrides=[f"train.lk_eta={bad}"])
