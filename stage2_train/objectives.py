"""Per-position training objectives from the cached top-K: ce | tv | lk_alpha | lk_lambda.

Notation, for one row (one position of one TTT step):
  p        the target's next-token distribution over its full vocabulary V (the cache holds
           the log-probs of its top-K tokens T, under the full-vocab softmax: not renormalised)
  q        the draft's distribution over its vocabulary D (a subset of V; q = 0 outside D)
  T∩D      the cached top-K tokens that the draft can emit (`valid`)
  P_K      Σ_{v∈T} p_v, the target mass the cache holds; Q_K = Σ_{v∈T∩D} q_v
  p~       p restricted to T∩D and renormalised (the teacher of DESIGN.md section 3)

Acceptance of a drafted token under speculative sampling is α = Σ_v min(p_v, q_v) = 1 − TV(p, q).
From the cache:
  α_K = Σ_{v∈T∩D} min(p_v, q_v)                        exact lower bound of α (`alpha`)
  α  <= α_K + min(1 − P_K, 1 − Q_K)                     upper bound (`alpha_hi`): the tokens of D
        outside T hold at most 1 − P_K of p and exactly 1 − Q_K of q.
Target mass on top-K tokens outside D (`mass_out`) is mass no draft can cover (α <= 1 − mass_out);
the bound already accounts for it. The acceptance-direct losses use α_K: they never credit the
draft for mass the cache does not show, and renormalise nothing away.

Objectives (per row; names and formulas as the peers', see bench/objectives_oracle.py):
  ce         −Σ p~_v log q_v                 today's soft cross-entropy, unchanged
  tv         1 − α_K                         total variation (speculators `tv`)
  lk_alpha   −log α_K                        LK-α (arXiv 2602.23881; SpecForge `--lk-loss-type alpha`,
                                             speculators `nla`), computed in log space: finite for any
                                             α_K > 0 however small, where the peers floor α
  lk_lambda  λ·KL(p~‖q) + (1 − λ)·(1 − α_K), λ = exp(−η·sg(α_K))   LK-λ per row (speculators `lk_hybrid`;
                                             SpecForge takes λ from the batch mean of α instead)
KL(p~‖q) = ce − H(p~): the same gradient as ce. η = `train.lk_eta` (3, the paper's value);
η = 0 gives KL, η → ∞ gives TV. Rows whose top-K holds no token of the draft vocabulary carry
loss 0 (they are never loss positions: their top-1 is outside the draft vocabulary).

Everything is computed in fp32 (fp64 for float64 logits) with autocast off, from logits of any
dtype; one call holds one chunk's [rows, N] logits (see `chunk_terms`, the function the TTT unroll calls per chunk).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from stage2_train.gathered_log_softmax import gathered_log_softmax

OBJECTIVES = ("ce", "tv", "lk_alpha", "lk_lambda")
DEFAULT_LK_ETA = 3.0


class RowTerms(NamedTuple):
    loss: torch.Tensor       # [...] fp32 (fp64 for float64 logits), differentiable: the objective per row
    top1: torch.Tensor       # [...] int64 draft argmax (draft vocab ids)
    alpha: torch.Tensor      # [...] α_K, exact lower bound of the expected acceptance (detached)
    alpha_hi: torch.Tensor   # [...] α_K + min(1 − P_K, 1 − Q_K), upper bound (detached)
    mass_topk: torch.Tensor  # [...] P_K: target mass on the cached top-K (detached)
    mass_out: torch.Tensor   # [...] target mass on top-K tokens outside the draft vocab (detached)


def check_objective(objective: str, eta: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"lk_eta must be a finite number >= 0, got {eta!r}")


def raw_teacher(topk_ids: np.ndarray, topk_logprobs: np.ndarray, target_to_draft: np.ndarray):
    """Cache rows -> (idx int64 [T,K] draft ids (0 outside), valid bool [T,K], logp float32 [T,K]).

    logp are the cached full-vocab log-probs as they are (every entry, inside the draft vocab or
    not: P_K needs them all); idx matches stage2_train.teacher.build_teacher's."""
    d = np.asarray(target_to_draft)[np.asarray(topk_ids, dtype=np.int64)]
    valid = d >= 0
    return np.where(valid, d, 0), valid, np.asarray(topk_logprobs, dtype=np.float32)


def _renormalised(lp_in: torch.Tensor, any_valid: torch.Tensor) -> torch.Tensor:
    """p~: softmax of the valid entries' log-probs (the same arithmetic as build_teacher); 0 rows stay 0."""
    m = lp_in.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lp_in - m)
    s = e.sum(-1, keepdim=True)
    return torch.where(any_valid[..., None], e / s.clamp_min(torch.finfo(e.dtype).tiny), torch.zeros_like(e))


def row_terms(logits: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, logp: torch.Tensor,
              prob: Optional[torch.Tensor] = None, *, objective: str = "ce",
              eta: float = DEFAULT_LK_ETA) -> RowTerms:
    """The objective and the acceptance bounds per row.

    logits [..., N] the draft's (any float dtype); idx [..., K] draft ids of the cached top-K (in
    0..N-1, e.g. 0, where not valid; the valid entries are distinct); valid [..., K] bool; logp [..., K] the cached
    log-probs under the target's full-vocab softmax (−inf allowed, e.g. padding); prob [..., K]
    optional p~ as the data loader built it (stage2_train.teacher.build_teacher): given, ce uses it
    as is; else p~ is rebuilt from logp.
    """
    check_objective(objective, eta)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ct = torch.promote_types(logits.dtype, torch.float32)  # fp32; fp64 for a float64 head (tests)
        logq, top1 = gathered_log_softmax(logits, idx)                    # [..., K], [...]
        lp = logp.to(ct)
        neg_inf = torch.full_like(lp, -math.inf)
        lp_in = torch.where(valid, lp, neg_inf)
        any_valid = valid.any(-1)
        ptil = prob.to(ct) if prob is not None else _renormalised(lp_in, any_valid)
        ce = -(ptil * logq).sum(-1)
        p_in, q = lp_in.exp(), logq.exp()
        alpha = torch.where(valid, torch.minimum(p_in, q), torch.zeros_like(q)).sum(-1)
        if objective == "ce":
            loss = ce
        elif objective == "tv":
            loss = 1.0 - alpha
        elif objective == "lk_alpha":
            # log α_K = logsumexp_v min(log p_v, log q_v): exact where α_K underflows in fp32
            lmin = torch.where(any_valid[..., None], torch.minimum(lp_in, logq), torch.zeros_like(logq))
            loss = -torch.logsumexp(lmin, dim=-1)
        else:
            kl = ce + torch.special.xlogy(ptil, ptil).sum(-1)             # ce − H(p~)
            lam = torch.exp(-eta * alpha.detach())
            loss = lam * kl + (1.0 - lam) * (1.0 - alpha)
        loss = torch.where(any_valid, loss, torch.zeros_like(loss))
        with torch.no_grad():
            p_all = lp.exp()
            mass_topk = p_all.sum(-1)
            mass_out = torch.where(valid, torch.zeros_like(p_all), p_all).sum(-1)
            q_k = torch.where(valid, q, torch.zeros_like(q)).sum(-1)
            rest = torch.minimum(1.0 - mass_topk, 1.0 - q_k).clamp_min(0.0)
            a = alpha.detach()
            alpha_hi = torch.minimum(a + rest, torch.ones_like(a))
    return RowTerms(loss, top1, a, alpha_hi, mass_topk, mass_out)


def chunk_terms(model, out: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, logp: torch.Tensor,
                prob: Optional[torch.Tensor] = None, objective: str = "ce",
                eta: float = DEFAULT_LK_ETA) -> tuple:
    """`row_terms` on model.logits(out) for one chunk of positions, as a plain tuple (RowTerms order).

    Safe under torch.utils.checkpoint(use_reentrant=False): a pure function of its tensor inputs,
    so backward recomputes this chunk's [rows, N] logits instead of keeping them.
    """
    return tuple(row_terms(model.logits(out), idx, valid, logp, prob, objective=objective, eta=eta))
