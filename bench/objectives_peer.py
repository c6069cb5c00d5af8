"""Runs INSIDE the peers' oracle venv: speculators' and SpecForge's loss formulas on given logits.

    python objectives_peer.py IN.npz OUT.npz

Imports torch, numpy and the two peers' loss modules only, loaded from their files
(speculators/losses/eager.py, specforge/core/lk_loss.py: torch-only modules) so neither
package's heavy __init__ runs. Never imports this project. See bench/objectives_oracle.py.

IN:  draft [R, N] float32 draft logits; target [R, N] float32 target logits over the draft vocab
     (full-coverage case: the whole target vocab); p_on_draft [R, N] float32 the target's
     probabilities on the draft vocab, not renormalised (SpecForge's target_p_on_draft);
     eta float.
OUT: per row, each peer loss and its gradient w.r.t. the draft logits.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch


def load(package: str, rel: str, name: str):
    spec = importlib.util.find_spec(package)  # top-level only: does not import the package
    path = Path(spec.submodule_search_locations[0]) / rel
    s = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def with_grad(fn, draft: torch.Tensor):
    x = draft.clone().requires_grad_(True)
    loss = fn(x)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().numpy(), g.numpy()


def speculators_rows(eager, draft, target, eta):
    """speculators' eager losses take [1, seq, N] draft and target logits, return [1, seq]."""
    t = target[None]
    fns = {"kl": lambda x: eager.kl_div_loss(x[None], t)[0],
           "tv": lambda x: eager.tv_loss(x[None], t)[0],
           "nla": lambda x: eager.neg_log_acceptance_loss(x[None], t)[0],
           "lk_hybrid": lambda x: eager.lk_hybrid_loss(x[None], t, eta=eta)[0]}
    return {f"speculators_{k}": with_grad(f, draft) for k, f in fns.items()}


def specforge_rows(lk, draft, p_on_draft, p_renorm, eta):
    """SpecForge per row: each row a batch of one position, so its batch means are the row's values.

    Its Eagle-3 model feeds compute_lk_loss the soft cross-entropy −Σ p~ log q (LogSoftmaxLoss, a
    Triton kernel not loaded here) as `kl_loss`: computed the same way below."""
    out = {}
    for kind in ("alpha", "lambda"):
        losses, grads = [], []
        for r in range(draft.shape[0]):
            def fn(x, r=r):                                       # x: [1, N], row r
                mask = torch.ones(1, 1, 1)
                acc, log_acc = lk.compute_acceptance_rate(logits=x[None], target_probs=p_on_draft[r][None, None],
                                                          position_mask=mask)
                soft_ce = -(p_renorm[r] * torch.log_softmax(x[0].float(), -1)).sum()
                return lk.compute_lk_loss(kl_loss=soft_ce, acceptance_rate=acc, log_acceptance_rate=log_acc,
                                          lk_loss_type=kind, kl_scale=1.0, kl_decay=eta)
            loss, g = with_grad(fn, draft[r:r + 1])
            losses.append(loss)
            grads.append(g[0])
        out[f"specforge_{kind}"] = (np.array(losses, dtype=np.float32), np.stack(grads))
    # the acceptance SpecForge logs: Σ_D min(p, q) with p not renormalised
    q = torch.softmax(draft.float(), -1)
    out["specforge_acceptance"] = (lk.expected_acceptance_rate(p_on_draft, q).numpy(), np.zeros_like(draft.numpy()))
    return out


def main(inp: str, outp: str):
    d = np.load(inp)
    draft = torch.from_numpy(d["draft"])
    target = torch.from_numpy(d["target"])
    p_on_draft = torch.from_numpy(d["p_on_draft"])
    eta = float(d["eta"])
    eager = load("speculators", "losses/eager.py", "speculators_losses_eager")
    lk = load("specforge", "core/lk_loss.py", "specforge_core_lk_loss")
    p_renorm = p_on_draft / p_on_draft.sum(-1, keepdim=True)
    res = {**speculators_rows(eager, draft, target, eta), **specforge_rows(lk, draft, p_on_draft, p_renorm, eta)}
    flat = {}
    for k, (loss, g) in res.items():
        flat[k] = loss
        flat[k + "__grad"] = g
    np.savez(outp, **flat)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python objectives_peer.py IN.npz OUT.npz")
    main(sys.argv[1], sys.argv[2])
