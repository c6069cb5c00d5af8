"""stage2_train.objectives against the peers' formulas: speculators 0.9.0 and SpecForge 0.2.0.

    python bench/objectives_oracle.py [--quick] [--rows 2048 --vocab 512] [--json OUT] [--tol 1e-5]

The peers run in their own venv, used only as a test oracle (EAGLE3_PEERS_PYTHON, else
.venv-peers/bin/python of this checkout):

    python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 numpy
    .venv-peers/bin/pip install --no-deps speculators==0.9.0 specforge==0.2.0

bench/objectives_peer.py loads their torch-only loss modules from file there. Two cases:

* full coverage (draft vocab = target vocab = K cached tokens): the formulas must agree to
  fp32 rounding, values and gradients w.r.t. the draft logits, per row:
    ce        = speculators kl_div_loss + H(p)  (KL = CE − entropy; the gradients are equal)
    tv        = speculators tv_loss
    lk_alpha  = speculators neg_log_acceptance_loss = SpecForge compute_lk_loss(alpha)
    lk_lambda = speculators lk_hybrid_loss(eta)
              = SpecForge compute_lk_loss(lambda, kl_scale 1, kl_decay eta) − λ·H(p~)
                (SpecForge's `kl_loss` is its soft CE; per row, i.e. one-position batches: SpecForge
                takes λ, the KL and the TV as means over the batch, we per row)
* partial coverage (draft vocab N < V, top-K < V cached): the acceptance each side uses.
  SpecForge's Σ_D min(p, q) with the full p is the true α; ours must bracket it
  (α_K <= α <= α_hi); speculators renormalises p over the draft vocab, which credits the
  draft with target mass it cannot emit (its α >= the true α).
Exit status 1 when a full-coverage difference exceeds --tol (relative to max(1, |value|)) or a
partial-coverage inequality fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stage2_train.objectives import row_terms  # noqa: E402

PEER = Path(__file__).with_name("objectives_peer.py")
ENV_VAR = "EAGLE3_PEERS_PYTHON"


def oracle_python() -> str | None:
    for p in (os.environ.get(ENV_VAR), str(ROOT / ".venv-peers/bin/python")):
        if p and Path(p).is_file():
            return p
    return None


def run_peer(python: str, draft: np.ndarray, target: np.ndarray, p_on_draft: np.ndarray, eta: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, draft=draft, target=target, p_on_draft=p_on_draft, eta=np.float32(eta))
        r = subprocess.run([python, str(PEER), str(inp), str(outp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the peer oracle failed ({python}):\n{r.stderr[-3000:]}")
        with np.load(outp) as z:
            return {k: z[k] for k in z.files}


def ours(draft: np.ndarray, idx, valid, logp, objective: str, eta: float):
    x = torch.from_numpy(draft).requires_grad_(True)
    t = row_terms(x, idx, valid, logp, objective=objective, eta=eta)
    (g,) = torch.autograd.grad(t.loss.sum(), x)
    return t, t.loss.detach().numpy().astype(np.float64), g.numpy().astype(np.float64)


def _diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


def full_case(python: str, rows: int, vocab: int, eta: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    target = (2.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    draft = (2.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    logp_t = torch.log_softmax(torch.from_numpy(target), -1)
    lp, idx = logp_t.sort(-1, descending=True)          # the cache: every token, identity draft map
    valid = torch.ones_like(idx, dtype=torch.bool)
    p = logp_t.exp().numpy()
    peer = run_peer(python, draft, target, p, eta)
    H = -(p * logp_t.numpy()).sum(-1).astype(np.float64)  # entropy of p (= p~ here)
    out = []

    def row(objective, peer_key, shift=0.0, note=""):
        t, loss, g = ours(draft, idx, valid, lp, objective, eta)
        out.append({"case": "full", "objective": objective, "peer": peer_key, "loss": _diff(loss + shift, peer[peer_key]),
                    "grad": _diff(g, peer[peer_key + "__grad"]), "note": note})
        return t

    row("ce", "speculators_kl", shift=-H, note="ce − H(p) = KL")
    t = row("tv", "speculators_tv")
    row("lk_alpha", "speculators_nla")
    row("lk_alpha", "specforge_alpha")
    row("lk_lambda", "speculators_lk_hybrid")
    lam = np.exp(-eta * t.alpha.numpy().astype(np.float64))
    row("lk_lambda", "specforge_lambda", shift=lam * H, note="+ λ·H(p~): SpecForge blends its soft CE")
    out.append({"case": "full", "objective": "alpha", "peer": "specforge_acceptance",
                "loss": _diff(t.alpha.numpy(), peer["specforge_acceptance"]), "grad": 0.0, "note": "α"})
    return out


def partial_case(python: str, rows: int, vocab: int, eta: float, seed: int) -> dict:
    """V = vocab, draft vocab V/2 (random), top-K = V/8 cached: the acceptance each side sees."""
    rng = np.random.default_rng(seed + 1)
    N, K = vocab // 2, max(vocab // 8, 1)
    target = (2.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    d_ids = np.sort(rng.choice(vocab, N, replace=False))
    draft = (2.0 * rng.standard_normal((rows, N))).astype(np.float32)
    logp_t = torch.log_softmax(torch.from_numpy(target), -1)
    lp, tid = logp_t.topk(K, dim=-1)
    t2d = np.full(vocab, -1, dtype=np.int64)
    t2d[d_ids] = np.arange(N)
    d = torch.from_numpy(t2d)[tid]
    valid = d >= 0
    idx = torch.where(valid, d, torch.zeros_like(d))
    p_on_draft = logp_t.exp().numpy()[:, d_ids]
    peer = run_peer(python, draft, target[:, d_ids], p_on_draft, eta)
    t, _, _ = ours(draft, idx, valid, lp, "tv", eta)
    a_k, a_hi = t.alpha.numpy().astype(np.float64), t.alpha_hi.numpy().astype(np.float64)
    a_true = peer["specforge_acceptance"].astype(np.float64)
    a_spec = 1.0 - peer["speculators_tv"].astype(np.float64)
    eps = 1e-6
    return {"case": "partial", "rows": rows, "vocab": vocab, "draft_vocab": N, "topk": K,
            "mean_alpha_K": float(a_k.mean()), "mean_alpha_true": float(a_true.mean()),
            "mean_alpha_hi": float(a_hi.mean()), "mean_alpha_speculators": float(a_spec.mean()),
            "lower_bound_holds": bool((a_k <= a_true + eps).all()),
            "upper_bound_holds": bool((a_true <= a_hi + eps).all()),
            "speculators_over_credits": bool((a_spec >= a_true - eps).all())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 rows, vocab 64 (seconds)")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--eta", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.vocab = 64, 64
    python = oracle_python()
    if python is None:
        print(f"no peers' oracle venv: set {ENV_VAR} or create .venv-peers (see this script's docstring)")
        return 2
    torch.set_num_threads(1)
    full = full_case(python, a.rows, a.vocab, a.eta, a.seed)
    part = partial_case(python, a.rows, a.vocab, a.eta, a.seed)
    print(f"full coverage: {a.rows} rows, vocab = draft vocab = K = {a.vocab}, eta {a.eta}; "
          "max |ours − peer| / max(1, |peer|)")
    print(f"{'objective':<10} {'peer':<24} {'loss':>10} {'grad':>10}  note")
    for r in full:
        print(f"{r['objective']:<10} {r['peer']:<24} {r['loss']:>10.2e} {r['grad']:>10.2e}  {r['note']}")
    print(f"partial coverage: vocab {part['vocab']}, draft vocab {part['draft_vocab']}, top-{part['topk']} cached: "
          f"mean α_K {part['mean_alpha_K']:.4f} <= true α (SpecForge) {part['mean_alpha_true']:.4f} <= "
          f"α_hi {part['mean_alpha_hi']:.4f}; speculators' renormalised α {part['mean_alpha_speculators']:.4f}")
    ok = all(r["loss"] <= a.tol and r["grad"] <= a.tol for r in full) and \
        part["lower_bound_holds"] and part["upper_bound_holds"] and part["speculators_over_credits"]
    if a.json:
        a.json.write_text(json.dumps({"full": full, "partial": part, "tol": a.tol, "ok": ok}, indent=2))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
