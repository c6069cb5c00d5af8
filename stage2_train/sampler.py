"""Chunk-aware sample order: what a training epoch reads, decided before it reads anything.

Randomness (all drawn from numpy's Generator seeded with (seed, epoch, SALT), so the
order is a pure function of seed, epoch, the cache's sample layout and the knobs below):
1. the shard order is a random permutation;
2. `open_shards` shards are read at once, each front to back (its samples in stored
   order); the next sample comes from a uniformly random open shard, and an exhausted
   shard is replaced by the next one in the permutation;
3. samples pass through a shuffle buffer of `shuffle_buffer` samples: once it is full,
   each arrival pushes out a uniformly random resident (the tail drains at random);
4. consecutive windows of `window * micro_batch_size` leaving samples are sorted by
   length (little padding), packed into micro-batches of at most `micro_batch_size`
   samples and `max_tokens` padded rows, and the micro-batches of a window shuffled.
Compared with a global shuffle, neighbouring positions are correlated: a shard's
samples arrive in stored order, spread over the time the shard is open (about
`open_shards` x its size arrivals), and the buffer then moves each by about
`shuffle_buffer` positions (tests/test_loader.py measures the mixing). What it buys: every inner chunk of every array is decompressed once per epoch
(shards are read front to back) and the rows in memory are bounded by the buffer.

Resuming at optimizer step s re-plans the epoch (same batches) and skips the first
s * world * accumulation micro-batches: the data stream after a resume is the one an
uninterrupted run would have seen, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SALT = 0xC4A9


@dataclass
class EpochOrder:
    """batches: micro-batches of sample ids, in training order; arrivals: sample ids in read order."""

    batches: list[list[int]]
    arrivals: np.ndarray


def _arrivals(shard_of: np.ndarray, indices: np.ndarray, rng: np.random.Generator, open_shards: int) -> np.ndarray:
    """Sample ids in the order they are read: random shard order, `open_shards` interleaved streams."""
    order = indices[np.argsort(shard_of[indices], kind="stable")]  # by shard, stored order inside
    shards, starts = np.unique(shard_of[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    queue = list(rng.permutation(len(shards)))
    streams: list[list[int]] = []  # [next position, end]
    out = np.empty(len(order), dtype=np.int64)
    n = 0
    while queue or streams:
        while queue and len(streams) < open_shards:
            s = queue.pop(0)
            streams.append([int(starts[s]), int(ends[s])])
        j = int(rng.integers(len(streams))) if len(streams) > 1 else 0
        st = streams[j]
        out[n] = order[st[0]]
        n += 1
        st[0] += 1
        if st[0] == st[1]:
            streams.pop(j)
    return out


def _buffered(arrivals: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """The order samples leave a shuffle buffer of `size` samples."""
    buf: list[int] = []
    out = np.empty(len(arrivals), dtype=np.int64)
    n = 0
    for i in arrivals:
        if len(buf) < size:
            buf.append(int(i))
            continue
        j = int(rng.integers(size))
        out[n], buf[j] = buf[j], int(i)
        n += 1
    for j in rng.permutation(len(buf)):
        out[n] = buf[j]
        n += 1
    return out


def pack(stream: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, *, micro_batch_size: int,
         max_tokens: int, window: int) -> list[list[int]]:
    """Length-sorted windows of the stream packed into micro-batches, shuffled inside each window."""
    batches: list[list[int]] = []
    span = max(1, window * micro_batch_size)
    for w0 in range(0, len(stream), span):
        mine = pack_sorted(stream[w0:w0 + span], lengths, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
        batches.extend(mine[j] for j in rng.permutation(len(mine)))
    return batches


def pack_sorted(win: np.ndarray, lengths: np.ndarray, *, micro_batch_size: int, max_tokens: int) -> list[list[int]]:
    """`win`'s samples sorted by length (longest first) and cut into micro-batches that hold at
    most `micro_batch_size` samples and `max_tokens` padded tokens."""
    win = win[np.argsort(-lengths[win], kind="stable")]
    out: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in win:
        ln = int(lengths[i])
        new_max = max(cur_max, ln)
        if cur and (len(cur) + 1 > micro_batch_size or (len(cur) + 1) * new_max > max_tokens):
            out.append(cur)
            cur, new_max = [], ln
        cur.append(int(i))
        cur_max = new_max
    if cur:
        out.append(cur)
    return out


def chunk_aware_order(shard_of: np.ndarray, lengths: np.ndarray, indices: Sequence[int], *, micro_batch_size: int,
                      max_tokens: int, seed: int, epoch: int, shuffle_buffer: int = 64, open_shards: int = 4,
                      window: int = 32) -> EpochOrder:
    """The epoch's micro-batches (see the module docstring); deterministic in every argument."""
    idx = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, SALT])
    arrivals = _arrivals(np.asarray(shard_of, dtype=np.int64), idx, rng, max(1, open_shards))
    stream = _buffered(arrivals, rng, max(1, shuffle_buffer))
    return EpochOrder(pack(stream, np.asarray(lengths), rng, micro_batch_size=micro_batch_size,
                           max_tokens=max_tokens, window=window), arrivals)
