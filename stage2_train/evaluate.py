"""Offline metrics of a head on cached data: per-position acc/loss (mean ± std) and simulated τ.

Definitions (DESIGN.md section 3, the same code as training: stage2_train.losses, TTT
step k rotated at t + k; heads that do not record that rule are refused):
* acc[k]  = draft top-1 == target top-1 / loss-masked positions, over all tokens;
  acc_std[k] = its token-level std sqrt(acc (1 - acc)); acc_sample_std[k] = std over
  samples of the per-sample accuracy (samples with at least one counted position).
* loss[k] = mean soft CE over loss positions; loss_std[k] = token-level std;
  loss_sample_std[k] = std over samples of the per-sample mean.
* simulated_tau = 1 + Σ_k Π_{j<=k} acc[j].
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from schemas.cache import SHARD_JSON, CacheError, CacheReader, shard_name, shards_dir
from schemas.head import HeadError, check_servable, hf_layer_ids, load_head  # noqa: F401 (hf_layer_ids re-exported)
from stage2_train.data import BatchDataset, cropped_lengths, make_batches, split_indices, to_device
from stage2_train.losses import simulated_tau, ttt_forward
from stage2_train.model import Eagle3Draft
from stage2_train.precision import compute_context
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


@torch.no_grad()
def evaluate_model(model: Eagle3Draft, reader: CacheReader, indices, *, ttt_length: int, decay: float = 0.8,
                   max_tokens: int = 8192, max_length: Optional[int] = None, progress: bool = False,
                   compute_dtype: Optional[torch.dtype] = None) -> dict:
    """Per-position metrics of `model` on the samples `indices` of `reader` (under autocast to
    `compute_dtype` when given: the dtype the head trains and serves in)."""
    vocab = vocab_from_maps(model.d2t.cpu().numpy(), model.t2d.cpu().numpy())
    lengths = cropped_lengths(reader, max_length)
    batches = make_batches(lengths, list(indices), micro_batch_size=256, max_tokens=max_tokens, seed=0, epoch=0,
                           shuffle=False)
    ds = BatchDataset(reader, batches, vocab.target_to_draft(), max_length)
    device = next(model.parameters()).device
    S = ttt_length
    hit = np.zeros(S)
    cnt = np.zeros(S)
    ce_sum = np.zeros(S)
    ce_sq = np.zeros(S)
    ce_n = np.zeros(S)
    per_sample_acc: list[list[float]] = [[] for _ in range(S)]
    per_sample_loss: list[list[float]] = [[] for _ in range(S)]
    tokens = 0
    it = range(len(ds))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", unit="batch", leave=False)
    for j in it:
        batch = to_device(ds[j], device)
        tokens += batch["tokens"]
        with compute_context(device, compute_dtype):
            out = ttt_forward(model, batch, S, decay, keep_per_token=True)
        for k, (ce, h, c, lm) in enumerate(out.per_token):
            ce, h, c, lm = ce.double().cpu(), h.cpu(), c.cpu(), lm.cpu()
            ce_m = ce * lm
            hit[k] += float(h.sum())
            cnt[k] += float(c.sum())
            ce_sum[k] += float(ce_m.sum())
            ce_sq[k] += float((ce_m * ce).sum())
            ce_n[k] += float(lm.sum())
            hs, cs = h.sum(1).double(), c.sum(1).double()
            ls, ln = ce_m.sum(1), lm.sum(1).double()
            per_sample_acc[k] += (hs[cs > 0] / cs[cs > 0]).tolist()
            per_sample_loss[k] += (ls[ln > 0] / ln[ln > 0]).tolist()
    acc = [float(hit[k] / cnt[k]) if cnt[k] else 0.0 for k in range(S)]
    loss = [float(ce_sum[k] / ce_n[k]) if ce_n[k] else float("nan") for k in range(S)]
    loss_std = [math.sqrt(max(0.0, ce_sq[k] / ce_n[k] - loss[k] ** 2)) if ce_n[k] else float("nan") for k in range(S)]

    def _std(v):
        return float(np.std(v)) if len(v) else float("nan")

    return {
        "acc": acc,
        "acc_std": [math.sqrt(a * (1 - a)) for a in acc],
        "acc_sample_std": [_std(v) for v in per_sample_acc],
        "loss": loss,
        "loss_std": loss_std,
        "loss_sample_std": [_std(v) for v in per_sample_loss],
        "simulated_tau": simulated_tau(acc),
        "num_samples": int(len(indices)),
        "num_tokens": int(tokens),
        "counted_tokens": [int(c) for c in cnt],
    }


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
                    progress: bool = False) -> dict:
    """Metrics of a head (directory or Eagle3Draft) on a cache: see the module docstring."""
    if isinstance(head_dir_or_model, Eagle3Draft):
        model = head_dir_or_model
        reader = CacheReader(cache_dir)
        check_head_vs_cache(model.config, reader)
    else:
        reader = CacheReader(cache_dir)
        model = load_model(head_dir_or_model, reader)
    tr = model.config.get("training") or {}
    ttt = cfg.train.ttt_length if cfg is not None else int(tr.get("ttt_length", 7))
    decay = cfg.train.loss_decay if cfg is not None else float(tr.get("loss_decay", 0.8))
    max_len = (cfg.train.max_length if cfg is not None else tr.get("max_length")) or None
    idx = resolve_split(reader, model.config, split, cfg)
    # the precision the head was trained and selected in (train.compute_dtype), so that these numbers
    # reproduce the training's held-out table
    amp = torch.bfloat16 if tr.get("compute_dtype") == "bfloat16" else None
    return evaluate_model(model, reader, idx, ttt_length=ttt, decay=decay, max_length=max_len, progress=progress,
                          compute_dtype=amp)


def metrics_table(m: dict, title: str = "held-out") -> str:
    """The per-position table (markdown): acc and loss, mean ± std over samples."""
    lines = [f"### Per-position metrics ({title}: {m['num_samples']} samples, {m['num_tokens']} tokens)", "",
             "| position | acc (mean ± std) | loss (mean ± std) |", "|---:|---:|---:|"]
    for k, (a, s, l, ls) in enumerate(zip(m["acc"], m["acc_sample_std"], m["loss"], m["loss_sample_std"])):
        lines.append(f"| {k} | {a:.4f} ± {s:.4f} | {l:.4f} ± {ls:.4f} |")
    lines += ["", f"simulated acceptance length τ = 1 + Σ_k Π_(j≤k) acc_j = **{m['simulated_tau']:.3f}**",
              "", "(mean over tokens; ± std over samples)"]
    return "\n".join(lines) + "\n"
