"""train.loss in the TTT unroll (issue 24): the cached top-K reaches the objectives shifted per TTT
step, every objective is weighted by today's position decay and the global count of loss tokens,
ce is the old soft CE to fp32 rounding, and the logged acceptance is Σ_v min(p, q).

References written here: the old soft-CE path (tests/ce_reference.py, main before train.loss), and an
unroll over full distributions: p over the tiny target's whole vocabulary (V <= K, so the cache is
exact), q over the draft vocabulary embedded in V, teacher rows shifted by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ce_reference import ttt_forward_ce
from stage2_train.data import collate
from stage2_train.losses import loss_token_counts, simulated_tau, ttt_forward
from stage2_train.objectives import OBJECTIVES
from stage2_train.precision import compute_context
from test_train_unit import TARGET_CFG
from test_ttt_positions import tiny_head

V, N, S, DECAY, ETA = 24, 12, 3, 0.8, 3.0        # target vocab, draft vocab, TTT steps
TGT = {**TARGET_CFG, "vocab_size": V}
DRAFT = np.arange(V - N, V)                       # tiny_head's draft vocab: the last N target ids
LENGTHS = (13, 9, 6)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def t2d() -> np.ndarray:
    m = np.full(V, -1, dtype=np.int64)
    m[DRAFT] = np.arange(N)
    return m


def make_samples(seed: int, k: int = V, lengths=LENGTHS):
    """Cache samples of a target with full distributions P (float64, [n, V] each) and top-k rows as
    stage 1 stores them (ids, float32 log-probs under the full softmax). About half the rows' top-1
    falls outside the draft vocab."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    samples, P = [], []
    for n in lengths:
        z = 2.5 * rng.standard_normal((n, V))
        lp = (z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32)
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        hidden = torch.randn(n, 3 * 32, generator=g).bfloat16().view(torch.int16).numpy().view(np.uint16)
        samples.append({"input_ids": rng.integers(0, V, n), "loss_mask": (rng.random(n) < 0.8).astype(np.uint8),
                        "hidden": hidden, "topk_ids": ids.astype(np.int32),
                        "topk_logprobs": np.take_along_axis(lp, ids, 1)})
        P.append(np.exp(lp.astype(np.float64)))  # what the cache holds, exactly when k = V
    return samples, P


def double_batch(samples):
    b = collate(samples, t2d())
    return {**b, "hidden": b["hidden"].double()}


def full_reference(m, batch, samples, P, objective: str, eta: float = ETA):
    """(loss, per-step mean α, mean mass outside the draft vocab over counted rows) from full
    distributions; the teacher rows and masks shifted here, by hand (DESIGN.md section 3)."""
    B, L = batch["input_ids"].shape
    hidden, pos, cache = m.fuse(batch["hidden"]), torch.arange(L)[None].expand(B, L), []
    loss, alphas, outs = 0.0, [], []
    for k in range(S):
        ids = torch.zeros(B, L, dtype=torch.long)
        p = torch.zeros(B, L, V, dtype=torch.float64)
        counted = torch.zeros(B, L, dtype=torch.bool)
        for b, (s, pb) in enumerate(zip(samples, P)):
            n = len(s["input_ids"])
            for t in range(n):
                if t + k + 1 < n:
                    ids[b, t], p[b, t] = int(s["input_ids"][t + k + 1]), torch.from_numpy(pb[t + k + 1])
                if t + k + 2 < n:
                    counted[b, t] = bool(s["loss_mask"][t + k + 2])
        hidden = m.ttt_step(hidden, ids, pos, cache)
        q_d = torch.softmax(m.logits(hidden).double(), -1)
        q = torch.zeros(B, L, V, dtype=torch.float64).index_copy(-1, torch.from_numpy(DRAFT), q_d)
        alpha = torch.minimum(p, q).sum(-1)
        alphas.append(float(alpha.detach()[counted].mean()))
        outs.append(float(p[..., : V - N].sum(-1)[counted].mean()))
        rows = counted & (p.argmax(-1) >= V - N)           # loss rows: the target's top-1 is draftable
        pr, qr, a = p[rows][:, DRAFT], q_d[rows], alpha[rows]
        pt = pr / pr.sum(-1, keepdim=True)                 # p~: restricted to the draft vocab, renormalised
        ce = -(pt * qr.log()).sum(-1)
        obj = {"ce": lambda: ce, "tv": lambda: 1 - a, "lk_alpha": lambda: -a.log(),
               "lk_lambda": lambda: (lam := torch.exp(-eta * a.detach())) * (ce + (pt * pt.log()).sum(-1))
               + (1 - lam) * (1 - a)}[objective]()
        loss = loss + DECAY ** k * obj.sum() / rows.sum()
    return loss, alphas, outs


def grads(m) -> dict:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_in_the_unroll_equals_the_full_distribution_reference(objective):
    """Loss and gradients of ttt_forward (checkpointed chunks of 2 positions) against the full-vocab
    unroll; the logged alpha, alpha_hi and mass_out against Σ_v min(p, q) and the mass outside."""
    samples, P = make_samples(0)
    m = tiny_head(n_draft=N, target=TGT).double()
    batch = double_batch(samples)
    out = ttt_forward(m, batch, S, DECAY, objective=objective, lk_eta=ETA, loss_chunk_tokens=6)
    out.loss.backward()
    got = grads(m)
    m.zero_grad()
    ref, alphas, outs = full_reference(m, batch, samples, P, objective)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-6, atol=1e-9)
    for n, g in grads(m).items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)  # ce, lk_lambda: p~ is fp32
    s = out.sums
    np.testing.assert_allclose((s["alpha_sum"] / s["counted"]).tolist(), alphas, rtol=1e-9)
    np.testing.assert_allclose((s["alpha_hi_sum"] / s["counted"]).tolist(), alphas, rtol=1e-6)  # exact cache
    np.testing.assert_allclose((s["mass_out_sum"] / s["counted"]).tolist(), outs, rtol=1e-6)
    assert 0.1 < min(alphas) < max(alphas) < 0.9 and min(outs) > 0.2       # a case where nothing is trivial


def test_alpha_bounds_bracket_the_true_acceptance_when_the_cache_holds_part_of_p():
    samples, P = make_samples(1, k=6)
    m = tiny_head(n_draft=N, target=TGT).double()
    batch = double_batch(samples)
    with torch.no_grad():
        s = ttt_forward(m, batch, S, DECAY).sums
        _, alphas, _ = full_reference(m, batch, samples, P, "ce")
    lo, hi = (s["alpha_sum"] / s["counted"]).tolist(), (s["alpha_hi_sum"] / s["counted"]).tolist()
    for a, b, c in zip(lo, alphas, hi):
        assert a < b < c, (a, b, c)


@pytest.mark.parametrize("chunk", [6, 2048])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_ce_matches_the_path_before_train_loss(chunk, amp):
    """train.loss = ce: the loss, every gradient and the old sums of the log_softmax-then-gather path,
    fp32 and under bf16 autocast, with and without checkpointed loss chunks, with the trainer's global
    token count. The fused gathered log-softmax rounds differently in fp32 only: the counts are exact,
    the loss agrees to fp32 rounding, and the gradients to fp32 rounding (bf16 rounding of the
    matmuls' gradient inputs under autocast)."""
    samples, _ = make_samples(2, k=8)
    batch = collate(samples, t2d())
    n_tok = loss_token_counts(batch, S) * 3  # as if the step had other micro-batches
    out = {}
    for name in ("new", "old"):
        m = tiny_head(n_draft=N, target=TGT)
        with compute_context(CPU, amp):
            if name == "new":
                o = ttt_forward(m, batch, S, DECAY, objective="ce", loss_chunk_tokens=chunk, loss_tokens=n_tok)
                loss, sums = o.loss, o.sums
            else:
                loss, sums = ttt_forward_ce(m, batch, S, DECAY, loss_chunk_tokens=chunk, loss_tokens=n_tok)
        loss.backward()
        out[name] = (loss.detach(), sums, grads(m))
    (l1, s1, g1), (l0, s0, g0) = out["new"], out["old"]
    torch.testing.assert_close(l1, l0, rtol=2e-6, atol=0)
    torch.testing.assert_close(s1["loss_sum"], s0["loss_sum"], rtol=2e-6, atol=0)
    assert all(torch.equal(s1[k], s0[k]) for k in ("loss_n", "correct", "counted"))
    tol = dict(rtol=2e-5, atol=1e-7) if amp is None else dict(rtol=2e-2, atol=2e-5)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tol, msg=k)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_weighs_each_loss_token_the_same_across_micro_batches(objective):
    """With the step's global count of loss tokens, micro-batches of 2 + 1 samples give the loss
    and gradients of the 3 samples in one batch (a per-batch mean would not)."""
    samples, _ = make_samples(3, k=8, lengths=(13, 9, 11))
    m = tiny_head(n_draft=N, target=TGT).double()
    whole = double_batch(samples)
    parts = [double_batch(samples[:2]), double_batch(samples[2:])]
    assert all(bool((loss_token_counts(b, S) > 0).all()) for b in parts)
    n_tok = sum(loss_token_counts(b, S) for b in parts)
    assert torch.equal(n_tok, loss_token_counts(whole, S))
    ttt_forward(m, whole, S, DECAY, objective=objective).loss.backward()
    want = grads(m)
    m.zero_grad()
    total = sum(ttt_forward(m, b, S, DECAY, objective=objective, loss_tokens=n_tok).loss for b in parts)
    total.backward()
    for n, g in grads(m).items():
        torch.testing.assert_close(g, want[n], rtol=1e-9, atol=1e-12, msg=n)
    m.zero_grad()
    own = sum(ttt_forward(m, b, S, DECAY, objective=objective).loss for b in parts)  # per-batch means
    own.backward()
    assert any(not torch.allclose(g, want[n], rtol=1e-3) for n, g in grads(m).items())


def test_unknown_objective_is_refused_before_any_work():
    samples, _ = make_samples(0)
    with pytest.raises(ValueError, match="unknown objective 'kl'; choose one of ce, tv, lk_alpha, lk_lambda"):
        ttt_forward(None, collate(samples, t2d()), S, objective="kl")


def test_simulated_tau_at_t1_uses_alpha_in_place_of_acc():
    from stage2_train.evaluate import _metrics

    h = {"hit": [6.0, 3.0], "cnt": [10.0, 10.0], "ce_sum": [1.0, 2.0], "ce_sq": [1.0, 4.0], "ce_n": [4.0, 4.0],
         "acc_s": [0.0] * 2, "acc_s2": [0.0] * 2, "acc_sn": [1.0] * 2, "loss_s": [0.0] * 2, "loss_s2": [0.0] * 2,
         "loss_sn": [1.0] * 2, "alpha_sum": [7.0, 5.0], "alpha_hi_sum": [8.0, 6.0], "mass_out_sum": [1.0, 2.0],
         "tokens": 40, "tokens_per_rank": [40]}
    m = _metrics(h, 3)
    assert m["alpha"] == [0.7, 0.5] and m["alpha_hi"] == [0.8, 0.6] and m["mass_out"] == [0.1, 0.2]
    assert m["simulated_tau"] == pytest.approx(1 + 0.6 + 0.6 * 0.3)
    assert m["simulated_tau_t1"] == pytest.approx(1 + 0.7 + 0.7 * 0.5) == simulated_tau(m["alpha"])
    assert m["simulated_tau_t1_hi"] == pytest.approx(1 + 0.8 + 0.8 * 0.6)
