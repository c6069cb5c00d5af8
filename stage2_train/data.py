"""Training data straight from the cache: held-out split, token-budget batches, loader.

* `split_indices`: a seeded held-out share of the samples (`train.val_fraction`), or
  none when an eval cache provides the held-out data.
* `make_batches`: per epoch, a seeded shuffle; samples are sorted by length inside
  windows of a few dozen batches (length bucketing, little padding) and packed into
  micro-batches of at most `micro_batch_size` samples and `max_tokens` padded rows;
  the batch order is shuffled again. Deterministic in (seed, epoch). Used for
  evaluation; training uses the chunk-aware order of `stage2_train.sampler` (same
  packing, but samples read shard by shard through a shuffle buffer).
* `rank_schedule`: which micro-batches this rank runs for each optimizer step: step s,
  accumulation g, rank r takes global micro-batch s*W*G + g*W + r, so one process with
  G accumulation steps and W processes with G/W see the same global batch.
* `make_train_loader`: the chunk loader (`stage2_train.loader`, decode threads, each
  chunk decoded once) or, with `train.num_workers` > 0, `BatchDataset` in DataLoader
  worker processes (one item = one padded micro-batch read sample by sample).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from schemas.cache import CacheReader
from stage2_train.objectives import raw_teacher
from stage2_train.sampler import pack_sorted
from stage2_train.teacher import build_teacher

SPLIT_SALT = 0x5EED
EVAL_SALT = 0xE7A1


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices; the same (n, val_fraction, seed) always gives the same split."""
    if val_fraction <= 0 or n < 2:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    perm = np.random.default_rng([seed, SPLIT_SALT]).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def heldout_subset(indices: Sequence[int], lengths: np.ndarray, max_tokens: Optional[int],
                   seed: int) -> np.ndarray:
    """The held-out samples one evaluation reads: all of them, or with `max_tokens` a seeded random
    subset of at most that many (cropped) tokens (at least one sample), in ascending order."""
    idx = np.asarray(indices, dtype=np.int64)
    if not max_tokens or int(lengths[idx].sum()) <= max_tokens:
        return idx
    perm = idx[np.random.default_rng([seed, EVAL_SALT]).permutation(len(idx))]
    keep = max(1, int(np.searchsorted(np.cumsum(lengths[perm]), max_tokens, side="right")))
    return np.sort(perm[:keep])


def rank_share(indices: Sequence[int], lengths: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank r's part of `indices` (ascending, i.e. in storage order): W contiguous runs with about the
    same number of tokens each, so each rank reads whole chunks of few shards."""
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    if world == 1 or not len(idx):
        return idx
    ends = np.cumsum(lengths[idx])
    mid = ends - lengths[idx] / 2.0  # a sample goes to the rank whose token range holds its middle
    owner = np.minimum((mid * world / ends[-1]).astype(np.int64), world - 1)
    return idx[owner == rank]


def make_batches(lengths: np.ndarray, indices: Sequence[int], *, micro_batch_size: int, max_tokens: int,
                 seed: int, epoch: int, shuffle: bool = True, window: int = 32) -> list[list[int]]:
    """Micro-batches (lists of sample indices) for one epoch."""
    idx = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        idx = idx[rng.permutation(len(idx))]
    batches: list[list[int]] = []
    span = max(1, window * micro_batch_size)
    for w0 in range(0, len(idx), span):
        batches += pack_sorted(idx[w0:w0 + span], lengths, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
    if shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[j] for j in order]
    return batches


def steps_per_epoch(num_batches: int, world_size: int, grad_accum: int) -> int:
    return num_batches // (world_size * grad_accum)


def rank_schedule(batches: list, *, rank: int, world_size: int, grad_accum: int,
                  start_step: int = 0) -> list:
    """This rank's micro-batches, in order, for optimizer steps start_step.. of the epoch."""
    out = []
    per = world_size * grad_accum
    for s in range(start_step, steps_per_epoch(len(batches), world_size, grad_accum)):
        for g in range(grad_accum):
            out.append(batches[s * per + g * world_size + rank])
    return out


class BatchDataset(torch.utils.data.Dataset):
    """Item j = the padded micro-batch of samples `batches[j]` (dict of tensors)."""

    def __init__(self, reader: CacheReader, batches: list[list[int]], target_to_draft: np.ndarray,
                 max_length: Optional[int] = None):
        self.reader = reader
        self.batches = batches
        self.t2d_map = np.asarray(target_to_draft, dtype=np.int64)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        return collate([self.reader.sample(i) for i in self.batches[j]], self.t2d_map, self.max_length,
                       sample_ids=self.batches[j])


def cropped_lengths(reader: CacheReader, max_length: Optional[int]) -> np.ndarray:
    ln = reader.lengths()
    return np.minimum(ln, max_length) if max_length else ln


def collate(samples: list[dict], target_to_draft: np.ndarray, max_length: Optional[int] = None,
            sample_ids: Optional[Sequence[int]] = None, hidden: Optional[np.ndarray] = None) -> dict:
    """Right-pad samples into [B, L] tensors and rebuild the teacher: restricted to the draft vocab and
    renormalised (t_idx, t_prob, t_top1), and the raw top-K the objectives and the acceptance read
    (t_valid: entry inside the draft vocab, t_logp: the cached full-vocab log-probs; -inf on padding).

    `hidden`: the batch's bf16 bits [B, L, 3H], already filled and zero-padded (the chunk
    loader writes rows straight into it); then the samples need no 'hidden'.
    """
    if max_length:
        samples = [{k: v[:max_length] for k, v in s.items()} for s in samples]
    B = len(samples)
    L = max(len(s["input_ids"]) for s in samples)
    K = samples[0]["topk_ids"].shape[1]
    input_ids = np.zeros((B, L), dtype=np.int64)
    loss_mask = np.zeros((B, L), dtype=bool)
    valid = np.zeros((B, L), dtype=bool)
    filled = hidden is not None
    if not filled:
        hidden = np.zeros((B, L, int(np.prod(samples[0]["hidden"].shape[1:]))), dtype=np.uint16)
    t_idx = np.zeros((B, L, K), dtype=np.int64)
    t_prob = np.zeros((B, L, K), dtype=np.float32)
    t_top1 = np.full((B, L), -1, dtype=np.int64)
    t_valid = np.zeros((B, L, K), dtype=bool)
    t_logp = np.full((B, L, K), -np.inf, dtype=np.float32)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n] = s["input_ids"]
        loss_mask[b, :n] = s["loss_mask"].astype(bool)
        valid[b, :n] = True
        if not filled:
            hidden[b, :n] = s["hidden"].reshape(n, hidden.shape[2])
        t_idx[b, :n], t_prob[b, :n], t_top1[b, :n] = build_teacher(s["topk_ids"], s["topk_logprobs"],
                                                                   target_to_draft)
        _, t_valid[b, :n], t_logp[b, :n] = raw_teacher(s["topk_ids"], s["topk_logprobs"], target_to_draft)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "loss_mask": torch.from_numpy(loss_mask),
        "valid": torch.from_numpy(valid),
        "hidden": torch.from_numpy(hidden.view(np.int16)).view(torch.bfloat16),  # fresh buffer: no copy
        "t_idx": torch.from_numpy(t_idx),
        "t_prob": torch.from_numpy(t_prob),
        "t_top1": torch.from_numpy(t_top1),
        "t_valid": torch.from_numpy(t_valid),
        "t_logp": torch.from_numpy(t_logp),
        "tokens": int(valid.sum()),
        "sample_ids": list(sample_ids) if sample_ids is not None else [],
    }


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def make_loader(dataset: BatchDataset, num_workers: int) -> torch.utils.data.DataLoader:
    kw = {}
    if num_workers > 0:
        kw = {"num_workers": num_workers, "prefetch_factor": 4, "persistent_workers": False}
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                       pin_memory=torch.cuda.is_available(), **kw)


def make_train_loader(reader: CacheReader, arrivals: np.ndarray, batches: list[list[int]],
                      target_to_draft: np.ndarray, max_length: Optional[int], *, num_workers: int = 0,
                      threads: int = 2, prefetch: int = 4, read_ahead: int = 40):
    """This rank's micro-batches, collated, in order (see the module docstring); the chunk loader
    holds the rows of about `read_ahead` of them."""
    if num_workers > 0:
        return make_loader(BatchDataset(reader, batches, target_to_draft, max_length), num_workers)
    from stage2_train.loader import CacheLoader

    return CacheLoader(reader, arrivals, batches, target_to_draft, max_length, threads=threads, prefetch=prefetch,
                       read_ahead=read_ahead)
