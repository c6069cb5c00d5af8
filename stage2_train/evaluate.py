"""Offline metrics of a head on cached data: per-position acc/loss (mean ± std) and simulated τ.

Definitions (DESIGN.md section 3, the same code as training: stage2_train.losses, TTT
step k rotated at t + k; heads that do not record that rule are refused):
* acc[k]  = draft top-1 == target top-1 / loss-masked positions, over all tokens;
  acc_std[k] = its token-level std sqrt(acc (1 - acc)); acc_sample_std[k] = std over
  samples of the per-sample accuracy (samples with at least one counted position).
* loss[k] = mean soft CE over loss positions; loss_std[k] = token-level std;
  loss_sample_std[k] = std over samples of the per-sample mean.
* loss is the soft CE whatever objective (train.loss) trained the head, so heads compare.
* alpha[k] = mean over the counted positions of Σ_v min(p_v, q_v) over the cached top-K: the
  expected acceptance of a token sampled from the draft at T = 1, an exact lower bound;
  alpha_hi[k] adds min(1 − P_K, 1 − Q_K), the most the mass outside the top-K can add;
  mass_out[k] = mean target mass on top-K tokens outside the draft vocab (stage2_train/objectives.py).
* simulated_tau = 1 + Σ_k Π_{j<=k} acc[j] (greedy); simulated_tau_t1 (and _t1_hi) the same with
  alpha[j] (alpha_hi[j]): sampling at T = 1.

Where and how much: on the head's device, in its compute dtype; at most
`train.eval_max_tokens` tokens (a seeded subset of the held-out samples, the same for
training's evaluations and stage 3's table); with several ranks each evaluates a
contiguous share (`data.rank_share`) and the per-position sums are all-reduced, so
the evaluation takes 1/W of the time and no rank waits on another for long.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from schemas.cache import SHARD_JSON, CacheError, CacheReader, shard_name, shards_dir
from schemas.head import HeadError, check_servable, hf_layer_ids, load_head  # noqa: F401 (hf_layer_ids re-exported)
from stage2_train.collectives import Ranks
from stage2_train.data import BatchDataset, cropped_lengths, heldout_subset, rank_share, split_indices, to_device
from stage2_train.losses import Sums, simulated_tau, ttt_forward
from stage2_train.model import Eagle3Draft
from stage2_train.precision import compute_context
from stage2_train.sampler import pack_sorted
from stage2_train.vocab import vocab_from_maps


def cache_id(reader: CacheReader) -> str:
    """Identity of a cache's content: layer ids + every shard's input_ids/loss_mask checksums."""
    h = hashlib.sha256(json.dumps(reader.layers).encode())
    for k in reader.shard_ids:
        info = json.loads((shards_dir(reader.root) / shard_name(k) / SHARD_JSON).read_text())
        cs = info.get("checksums", {})
        h.update(f"{k}:{cs.get('input_ids')}:{cs.get('loss_mask')};".encode())
    return h.hexdigest()[:16]


def check_head_vs_cache(config: dict, reader: CacheReader, where: str = "head") -> None:
    """A head only makes sense on a cache of the same target, with the same layer ids."""
    cj = reader.root / "cache.json"
    th = int(config.get("target_hidden_size", config.get("hidden_size")))
    if th != reader.hidden_size:
        raise CacheError(f"{cj}: hidden_size is {reader.hidden_size} but the {where} expects target_hidden_size {th}")
    if int(config["vocab_size"]) != reader.vocab_size:
        raise CacheError(f"{cj}: vocab_size is {reader.vocab_size} but the {where} expects {config['vocab_size']}")
    ids = hf_layer_ids(config)
    if ids and ids != reader.layers:
        raise CacheError(f"{cj}: layers are {reader.layers} but the {where} was trained on layers {ids}")


def load_model(head_dir: str | Path, reader: CacheReader, device=None) -> Eagle3Draft:
    config, tensors = load_head(head_dir)
    check_servable(config, str(Path(head_dir) / "config.json"))  # metrics use the t + k rule: refuse older heads
    check_head_vs_cache(config, reader, where=f"head {head_dir}")
    model = Eagle3Draft(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    bad = [m for m in missing if not m.startswith(("embed_tokens.", "rotary."))]
    if bad or unexpected:
        raise HeadError(f"{head_dir}: tensors do not fit the model: missing {bad}, unexpected {unexpected}")
    emb = reader.load_embedding()
    if tuple(emb.shape) != tuple(model.embed_tokens.weight.shape):
        raise CacheError(f"{reader.target_dir()}: embedding is {tuple(emb.shape)}, the head needs "
                         f"{tuple(model.embed_tokens.weight.shape)}")
    model.set_embedding(emb)
    return model.to(device or "cpu").eval()


# Held-out samples are read in storage order, length-sorted inside windows of this many samples
# (little padding; the loader holds about one window of rows).
EVAL_WINDOW = 64
EVAL_BATCH_SAMPLES = 256
# Padded tokens per evaluation batch (forward only: no activations kept). A GPU wants big batches;
# on a CPU a batch's [tokens, hidden] and [tokens, intermediate] activations must stay near the caches
# (the logits are chunked anyway: losses.LOSS_CHUNK_TOKENS): the demo's held-out check
# (30 samples, 9.7k tokens, bf16, 2 cores) took 3.8 s at 2,048 tokens against 7.8 s at 16,384
# (bench/bench_train.py --parts eval).
EVAL_BATCH_TOKENS = 16384
CPU_EVAL_BATCH_TOKENS = 2048


def eval_batch_tokens(device) -> int:
    """The padded-token budget of one evaluation batch on `device`."""
    return CPU_EVAL_BATCH_TOKENS if torch.device(device).type == "cpu" else EVAL_BATCH_TOKENS


# Per-position sums behind the metrics: token level (hit/cnt, ce_*) and over samples (acc_s*, loss_s*).
EVAL_ROWS = ("hit", "cnt", "ce_sum", "ce_sq", "ce_n", "acc_s", "acc_s2", "acc_sn", "loss_s", "loss_s2", "loss_sn",
             "alpha_sum", "alpha_hi_sum", "mass_out_sum")
# the rows ttt_forward sums itself (over the counted positions: the acc denominator "cnt")
UNROLL_ROWS = ("alpha_sum", "alpha_hi_sum", "mass_out_sum")


def _eval_batches(reader: CacheReader, mine: np.ndarray, lengths: np.ndarray, t2d: np.ndarray,
                  max_length: Optional[int], max_tokens: int, threads: int) -> tuple[Iterable[dict], int]:
    """This rank's samples as collated batches: the chunk loader (each chunk decoded once), or
    sample by sample for caches whose arrays it cannot read."""
    batches: list[list[int]] = []
    for w0 in range(0, len(mine), EVAL_WINDOW):
        batches += pack_sorted(mine[w0:w0 + EVAL_WINDOW], lengths, micro_batch_size=EVAL_BATCH_SAMPLES,
                               max_tokens=max_tokens)
    if not batches:
        return [], 0
    try:
        from stage2_train.loader import CacheLoader

        loader = CacheLoader(reader, mine, batches, t2d, max_length, threads=threads, prefetch=2, read_ahead=2)
        return loader, len(batches)
    except ValueError:  # a layout the chunk loader does not read
        ds = BatchDataset(reader, batches, t2d, max_length)
        return (ds[j] for j in range(len(ds))), len(batches)


def _batch_sums(out, sums: Sums) -> None:
    """Token- and sample-level sums of one batch (all on the device; see the module docstring)."""
    rows: dict[str, list] = {k: [] for k in EVAL_ROWS if k not in UNROLL_ROWS}
    for ce, h, c, lm in out.per_token:
        ce, lm = ce.double(), lm.double()
        ce_m = ce * lm
        hs, cs = h.sum(1).double(), c.sum(1).double()
        ls, ln = ce_m.sum(1), lm.sum(1)
        acc_s = torch.where(cs > 0, hs / cs.clamp_min(1), 0.0)  # per-sample means, samples with counts only
        loss_s = torch.where(ln > 0, ls / ln.clamp_min(1), 0.0)
        for name, v in (("hit", hs.sum()), ("cnt", cs.sum()), ("ce_sum", ce_m.sum()), ("ce_sq", (ce_m * ce).sum()),
                        ("ce_n", ln.sum()), ("acc_s", acc_s.sum()), ("acc_s2", (acc_s ** 2).sum()),
                        ("acc_sn", (cs > 0).sum()), ("loss_s", loss_s.sum()), ("loss_s2", (loss_s ** 2).sum()),
                        ("loss_sn", (ln > 0).sum())):
            rows[name].append(v)
    sums.add({k: torch.stack(v) for k, v in rows.items()})
    sums.add({k: out.sums[k] for k in UNROLL_ROWS})


def _metrics(h: dict, num_samples: int) -> dict:
    """The metrics (module docstring) from all-reduced sums."""
    S = len(h["hit"])

    def ratio(a, b, empty):
        return [a[k] / b[k] if b[k] else empty for k in range(S)]

    def std(s, s2, n):
        return [math.sqrt(max(0.0, s2[k] / n[k] - (s[k] / n[k]) ** 2)) if n[k] else float("nan") for k in range(S)]

    acc = ratio(h["hit"], h["cnt"], 0.0)
    loss = ratio(h["ce_sum"], h["ce_n"], float("nan"))
    alpha, alpha_hi = ratio(h["alpha_sum"], h["cnt"], 0.0), ratio(h["alpha_hi_sum"], h["cnt"], 0.0)
    return {
        "acc": acc,
        "acc_std": [math.sqrt(a * (1 - a)) for a in acc],
        "acc_sample_std": std(h["acc_s"], h["acc_s2"], h["acc_sn"]),
        "loss": loss,
        "loss_std": std(h["ce_sum"], h["ce_sq"], h["ce_n"]),
        "loss_sample_std": std(h["loss_s"], h["loss_s2"], h["loss_sn"]),
        "simulated_tau": simulated_tau(acc),
        "alpha": alpha,
        "alpha_hi": alpha_hi,
        "mass_out": ratio(h["mass_out_sum"], h["cnt"], 0.0),
        "simulated_tau_t1": simulated_tau(alpha),
        "simulated_tau_t1_hi": simulated_tau(alpha_hi),
        "num_samples": int(num_samples),
        "num_tokens": int(h["tokens"]),
        "counted_tokens": [int(c) for c in h["cnt"]],
        "tokens_per_rank": [int(t) for t in h["tokens_per_rank"]],
    }


@torch.no_grad()
def evaluate_model(model: Eagle3Draft, reader: CacheReader, indices, *, ttt_length: int, decay: float = 0.8,
                   max_tokens: Optional[int] = None, max_length: Optional[int] = None, progress: bool = False,
                   compute_dtype: Optional[torch.dtype] = None, ranks: Optional[Ranks] = None,
                   threads: int = 2) -> dict:
    """Per-position metrics of `model` on the samples `indices` of `reader`, on the model's device (under
    autocast to `compute_dtype` when given: the dtype the head trains and serves in).

    With `ranks` (several processes) every rank evaluates its share of the samples and the sums are
    all-reduced: every rank must call this, and every rank returns the same metrics. `threads`: chunk
    decode threads (train.loader_threads); `max_tokens`: padded tokens per batch (default
    `eval_batch_tokens` of the model's device)."""
    device = next(model.parameters()).device
    max_tokens = max_tokens or eval_batch_tokens(device)
    ranks = ranks or Ranks(0, 1, device)
    vocab = vocab_from_maps(model.d2t.cpu().numpy(), model.t2d.cpu().numpy())
    lengths = cropped_lengths(reader, max_length)
    mine = rank_share(indices, lengths, ranks.rank, ranks.world)
    batches, n = _eval_batches(reader, mine, lengths, vocab.target_to_draft(), max_length, max_tokens, threads)
    if progress and ranks.rank == 0:
        from tqdm import tqdm

        batches = tqdm(batches, total=n, desc="eval", unit="batch", leave=False)
    sums = Sums(device)  # every row from the start, in one order: ranks with no samples all-reduce zeros
    sums.add({"tokens": torch.zeros((), dtype=torch.float64, device=device),
              **{k: torch.zeros(ttt_length, dtype=torch.float64, device=device) for k in EVAL_ROWS}})
    for batch in batches:
        batch = to_device(batch, device)
        with compute_context(device, compute_dtype):
            out = ttt_forward(model, batch, ttt_length, decay, keep_per_token=True)
        sums.add({"tokens": batch["valid"].sum()})
        _batch_sums(out, sums)
    share = torch.zeros(ranks.world, dtype=torch.float64, device=device)
    share[ranks.rank] = sums.rows["tokens"]
    sums.add({"tokens_per_rank": share})
    return {**_metrics(sums.all_reduce(ranks).host(), len(indices)), "device": str(device)}


def resolve_split(reader: CacheReader, config: dict, split: str, cfg=None) -> np.ndarray:
    """Sample indices for `split`: "all", or "val" = the held-out samples the head never trained on."""
    n = len(reader)
    if split == "all":
        return np.arange(n, dtype=np.int64)
    if split != "val":
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    tr = config.get("training") or {}
    sp = tr.get("split") or {}
    if sp:  # the head records the split it trained with: that is what was held out
        val_fraction, seed = sp["val_fraction"], sp["seed"]
        same = sp.get("cache_id") == cache_id(reader)
    elif cfg is not None:
        val_fraction, seed = cfg.train.val_fraction, cfg.train.seed
        same = Path(cfg.train_cache).resolve() == reader.root.resolve()
        if cfg.train.eval_cache and Path(cfg.train.eval_cache).resolve() == reader.root.resolve():
            same = False
    else:
        raise HeadError("the head has no training split record: pass cfg= or use split='all'")
    if not same:
        return np.arange(n, dtype=np.int64)  # another cache (an eval cache): all of it is held out
    _, val = split_indices(n, val_fraction, seed)
    if not len(val):
        raise CacheError(f"{reader.root}: no held-out split (train.val_fraction={val_fraction}); "
                         "use split='all' on an eval cache")
    return val


def offline_metrics(head_dir_or_model: Any, cache_dir: str | Path, *, split: str = "val", cfg=None,
                    progress: bool = False, device: Optional[torch.device] = None,
                    max_tokens: Optional[int] = None) -> dict:
    """Metrics of a head (directory or Eagle3Draft) on a cache: see the module docstring.

    device: where the head runs (default: a loaded head goes to the GPU when there is one, a
    model stays where it is). max_tokens: the held-out cap (default train.eval_max_tokens of
    `cfg`, else the cap the head was trained with), the same seeded subset as training's.
    """
    reader = CacheReader(cache_dir)
    if isinstance(head_dir_or_model, Eagle3Draft):
        model = head_dir_or_model if device is None else head_dir_or_model.to(device)
        check_head_vs_cache(model.config, reader)
    else:
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        model = load_model(head_dir_or_model, reader, device=device)
    tr = model.config.get("training") or {}
    ttt = cfg.train.ttt_length if cfg is not None else int(tr.get("ttt_length", 7))
    decay = cfg.train.loss_decay if cfg is not None else float(tr.get("loss_decay", 0.8))
    max_len = ((cfg.train.max_length or cfg.data.max_length) if cfg is not None else tr.get("max_length")) or None
    if max_tokens is None:
        max_tokens = cfg.train.eval_max_tokens if cfg is not None else tr.get("eval_max_tokens")
    seed = cfg.train.seed if cfg is not None else int(tr.get("seed", 0))
    idx = heldout_subset(resolve_split(reader, model.config, split, cfg), cropped_lengths(reader, max_len),
                         max_tokens, seed)
    # the precision the head was trained and selected in (train.compute_dtype), so that these numbers
    # reproduce the training's held-out table
    amp = torch.bfloat16 if tr.get("compute_dtype") == "bfloat16" else None
    return evaluate_model(model, reader, idx, ttt_length=ttt, decay=decay, max_length=max_len, progress=progress,
                          compute_dtype=amp)


def metrics_table(m: dict, title: str = "held-out") -> str:
    """The per-position table (markdown): acc and loss, mean ± std over samples; alpha [lower, upper bound]."""
    lines = [f"### Per-position metrics ({title}: {m['num_samples']} samples, {m['num_tokens']} tokens)", "",
             "| position | acc (mean ± std) | alpha [≤ alpha_hi] | loss (mean ± std) |", "|---:|---:|---:|---:|"]
    for k, (a, s, l, ls) in enumerate(zip(m["acc"], m["acc_sample_std"], m["loss"], m["loss_sample_std"])):
        lines.append(f"| {k} | {a:.4f} ± {s:.4f} | {m['alpha'][k]:.4f} [{m['alpha_hi'][k]:.4f}] | "
                     f"{l:.4f} ± {ls:.4f} |")
    lines += ["", f"simulated acceptance length τ = 1 + Σ_k Π_(j≤k) acc_j = **{m['simulated_tau']:.3f}** (greedy)"]
    lines += [f"sampling at T = 1: τ = 1 + Σ_k Π_(j≤k) alpha_j = **{m['simulated_tau_t1']:.3f}** "
              f"(≤ {m['simulated_tau_t1_hi']:.3f} with alpha_hi)"]
    lines += ["", "(mean over tokens; ± std over samples; alpha = Σ_v min(p, q) over the cached top-K, a lower "
              "bound; alpha_hi adds the most the mass outside the top-K can give)"]
    return "\n".join(lines) + "\n"
