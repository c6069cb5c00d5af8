"""Lossless check for sampling (T > 0): do the emitted tokens follow the target's distribution?

Speculative sampling is lossless when the output sequence is distributed exactly as the
target's own sampling: x_j | x_<j ~ p_j, the target's distribution (temperature, top-p) after
the prefix and x_<j. Token identity cannot show that at T > 0; this test does.

From fixed prefixes, `runs` seeded runs each emit `tokens` tokens (no stop token). One target
pass over prefix + tokens gives every p_j; each emitted token at a position j >= 1 (past the
first drafted one, where acceptance of earlier drafts matters) becomes a randomised
probability-integral transform

    u = Σ_{v before x_j} p_j(v) + V·p_j(x_j),   V ~ U(0, 1),   tokens ordered by p_j descending.

Under losslessness the u are independent U(0, 1) (Rosenblatt), whatever the prefixes, the
head or the tree. The test: Pearson's chi-square of the u in `bins` equal bins, df = bins − 1,
rejecting at `level`. Its power: against any alternative whose binned u-distribution is at
total variation δ from uniform, the statistic is noncentral chi-square with noncentrality at
least 4·n·δ² (bins even), so the test detects δ >= `min_tv` with probability >= `power`; the
report states that δ for its n. A rule that favours the draft's tokens (e.g. accepting
whenever q > p) moves u toward the draft's favourites and fails (tests/test_sampling_check.py).
The first token (j = 0) is checked by tests/test_spec_decode.py's chi-square on its own.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from stage3_eval.spec_decode import DecodeSettings, generate
from stage3_eval.tree import target_probs

DEFAULT_BINS = 10
DEFAULT_LEVEL = 1e-3
POWER = 0.9


def pit(p_rows: torch.Tensor, tokens: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Randomised PIT of tokens [n] under p_rows [n, V] (descending-probability order), V draws v [n]."""
    p = p_rows.double()
    px = p.gather(-1, tokens[:, None])                                    # [n, 1]
    # tokens strictly before x in the order (p descending, then id ascending)
    ids = torch.arange(p.shape[-1], device=p.device)[None]
    before = (p > px) | ((p == px) & (ids < tokens[:, None]))
    return (torch.where(before, p, torch.zeros_like(p)).sum(-1) + v.double() * px[:, 0]).clamp(0.0, 1.0)


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square(df) > x)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(max(x, 0.0) / 2, dtype=torch.float64)))


def chi2_crit(df: int, level: float) -> float:
    """The (1 − level) quantile of chi-square(df), by bisection on chi2_sf."""
    lo, hi = 0.0, df + 20.0 * math.sqrt(2 * df) + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > level else (lo, mid)
    return hi


def ncx2_sf(x: float, df: int, lam: float) -> float:
    """P(noncentral chi-square(df, lam) > x): the Poisson(lam/2) mixture of central ones."""
    if lam <= 0:
        return chi2_sf(x, df)
    h = lam / 2
    j = torch.arange(0, int(h + 12 * math.sqrt(h) + 60), dtype=torch.float64)
    w = torch.exp(-h + j * math.log(h) - torch.lgamma(j + 1))
    sf = torch.special.gammaincc((df + 2 * j) / 2, torch.full_like(j, max(x, 0.0) / 2))
    return float((w * sf).sum())


def min_detectable_tv(n: int, bins: int = DEFAULT_BINS, level: float = DEFAULT_LEVEL,
                      power: float = POWER) -> Optional[float]:
    """The smallest TV distance of the binned u-distribution from uniform detected with `power`."""
    if n <= 0:
        return None
    df = bins - 1
    crit = chi2_crit(df, level)
    lo, hi = 0.0, 1.0
    if ncx2_sf(crit, df, 4 * n * hi * hi) < power:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ncx2_sf(crit, df, 4 * n * mid * mid) < power else (lo, mid)
    return hi


def uniformity_test(u: torch.Tensor, bins: int = DEFAULT_BINS, level: float = DEFAULT_LEVEL) -> dict:
    """Pearson's chi-square of u in `bins` equal bins against uniform, with the test's power."""
    n = int(u.numel())
    counts = torch.bincount((u.double() * bins).long().clamp(0, bins - 1), minlength=bins).double()
    exp = n / bins
    stat = float(((counts - exp) ** 2).sum() / exp) if n else 0.0
    df = bins - 1
    crit = chi2_crit(df, level)
    return {"n": n, "bins": bins, "statistic": stat, "df": df, "critical": crit, "level": level,
            "p_value": chi2_sf(stat, df) if n else None, "pass": bool(n) and stat <= crit,
            "power": POWER, "min_tv": min_detectable_tv(n, bins, level), "counts": counts.long().tolist()}


@torch.no_grad()
def _target_rows(runner, prefix: list[int], tokens: list[int], s: DecodeSettings) -> torch.Tensor:
    """p_j for j = 1..len(tokens)-1: the target's sampling distribution after prefix + tokens[:j]."""
    seq = torch.tensor(list(prefix) + list(tokens[:-1]), dtype=torch.long, device=runner.device)[None]
    logits = runner.model(input_ids=seq, use_cache=False).logits[0, len(prefix):]  # rows for tokens[1:]
    return target_probs(logits, s.temperature, s.top_p)


def sampling_check(runner, drafter, prefixes: list[list[int]], s: DecodeSettings, *, runs: int, tokens: int,
                   seed: int = 0, bins: int = DEFAULT_BINS, level: float = DEFAULT_LEVEL, accept=None,
                   progress=None) -> dict:
    """Run the check (module docstring) for one head/method at s.temperature > 0; `accept` injects a rule."""
    if s.temperature <= 0:
        raise ValueError("the sampling check needs temperature > 0")
    if tokens < 2:
        raise ValueError("the sampling check needs tokens >= 2 (it tests positions after the first)")
    s = DecodeSettings(**{**s.__dict__, "max_new_tokens": tokens})
    vgen = torch.Generator().manual_seed(seed + 7919)  # PIT randomisation: its own stream
    us, impossible = [], 0
    for pi, prefix in enumerate(prefixes):
        for r in range(runs):
            gen = torch.Generator(device=runner.device).manual_seed(seed + 1_000_003 * pi + r)
            out = generate(runner, drafter, prefix, s, eos_ids=set(), gen=gen, accept=accept).tokens
            p = _target_rows(runner, prefix, out, s)
            x = torch.tensor(out[1:], dtype=torch.long, device=p.device)
            px = p.gather(-1, x[:, None])[:, 0]
            impossible += int((px <= 0).sum())
            us.append(pit(p, x, torch.rand(x.numel(), generator=vgen, dtype=torch.float64).to(p.device)).cpu())
            if progress is not None:
                progress()
    res = uniformity_test(torch.cat(us) if us else torch.zeros(0, dtype=torch.float64), bins, level)
    res.update(temperature=s.temperature, top_p=s.top_p, prefixes=len(prefixes), runs=runs, tokens=tokens,
               impossible_tokens=impossible)
    res["pass"] = res["pass"] and impossible == 0
    return res
