"""The offline table: teacher-forced per-position accuracy and loss on held-out cached data.

Computed by stage 2's `offline_metrics` (stage 3 may import stage 2) on the eval
cache (`extract.eval_cache`, every sample) when it exists, else on the held-out
split of the training cache, on the target's device, at most `train.eval_max_tokens`
tokens. Markdown in the seed's format: "| position | acc | loss |" with mean ± std, and beside
acc the expected acceptance at T = 1, alpha = Σ_v min(p, q) over the cached top-K (a lower bound;
[alpha_hi] its upper bound), with the τ it implies for sampling beside the greedy simulated τ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

KEYS = ("acc", "acc_std", "loss", "loss_std", "simulated_tau", "acc_sample_std", "loss_sample_std",
        "alpha", "alpha_hi", "mass_out", "simulated_tau_t1", "simulated_tau_t1_hi",
        "num_samples", "num_tokens", "device")


def pick_cache(cfg) -> Optional[tuple[str, str]]:
    """(cache dir, split) to evaluate on, or None when no cache exists."""
    if (Path(cfg.eval_cache) / "cache.json").is_file():
        return cfg.eval_cache, "all"
    if (Path(cfg.train_cache) / "cache.json").is_file():
        return cfg.train_cache, "val"
    return None


def offline_table(head_dir: str, cfg, *, progress: bool = False, device=None) -> dict:
    """{acc, acc_std, loss, loss_std, simulated_tau, cache, split, ...} or {"skipped": reason}.

    device: the target's device (the head runs there; default: the GPU when there is one). At most
    train.eval_max_tokens tokens are read (the seeded subset training's evaluations read).
    """
    try:
        from stage2_train.evaluate import offline_metrics
    except ImportError as e:  # stage 2 not installed/complete: the rest of the eval still runs
        return {"skipped": f"stage2_train.evaluate.offline_metrics is unavailable ({e})"}
    where = pick_cache(cfg)
    if where is None:
        return {"skipped": f"no feature cache at {cfg.eval_cache} or {cfg.train_cache}"}
    cache, split = where
    m = offline_metrics(head_dir, cache, split=split, cfg=cfg, progress=progress, device=device)
    out = {k: m[k] for k in KEYS if k in m}
    out.update(cache=str(cache), split=split)
    return out


def offline_markdown(off: dict, title: str = "") -> str:
    if not off or "skipped" in off:
        return f"offline table skipped: {off.get('skipped') if off else 'not computed'}\n"
    alpha = off.get("alpha")  # absent from results written before alpha was logged
    lines = [f"Offline (teacher-forced) {title} on {off['cache']} (split {off['split']}, "
             f"{off.get('num_samples', '?')} samples, {off.get('num_tokens', '?')} tokens)", "",
             "| position | acc | alpha [≤ alpha_hi] | loss |" if alpha else "| position | acc | loss |",
             "|---:|---:|---:|---:|" if alpha else "|---:|---:|---:|"]
    # per-sample std when present (a token-level acc std is just sqrt(p(1-p)))
    acc_sd = off.get("acc_sample_std") or off["acc_std"]
    loss_sd = off.get("loss_sample_std") or off["loss_std"]
    for k, (a, s, l, ls) in enumerate(zip(off["acc"], acc_sd, off["loss"], loss_sd)):
        al = f" {alpha[k]:.4f} [{off['alpha_hi'][k]:.4f}] |" if alpha else ""
        lines.append(f"| {k} | {a:.4f} ± {s:.4f} |{al} {l:.4f} ± {ls:.4f} |")
    spread = "std over samples" if off.get("acc_sample_std") else "token-level std"
    if not alpha:
        return "\n".join(lines + ["", f"(mean ± {spread})", "", f"simulated τ = {off['simulated_tau']:.3f}"]) + "\n"
    lines += ["", f"(mean ± {spread}; alpha = Σ_v min(p, q) over the cached top-K: a lower bound of the acceptance "
              "of a token sampled at T = 1; alpha_hi adds the most the mass outside the top-K can give)", "",
              f"simulated τ = {off['simulated_tau']:.3f} (greedy, from acc)",
              f"simulated τ at T = 1 = {off['simulated_tau_t1']:.3f} (from alpha; "
              f"≤ {off['simulated_tau_t1_hi']:.3f} from alpha_hi)"]
    return "\n".join(lines) + "\n"
