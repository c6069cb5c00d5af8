"""The chunk-aware sampler and the threaded chunk loader: determinism, exact resume,
content equal to sample-by-sample reads, every chunk decoded once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.cache import CacheReader
from schemas.cache_read import ChunkedArray
from schemas.config import load_config
from stage1_extract.extract import run_extract
from stage2_train.data import collate, rank_schedule
from stage2_train.loader import CacheLoader
from stage2_train.sampler import chunk_aware_order
from tiny import sharegpt_rows, tiny_target, write_jsonl


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(30, seed=11, turns=2))
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                           "extract": {"cache": str(tmp / "cache"), "samples_per_shard": 7, "topk": 4,
                                       "layers": [1, 3, 5], "chunk_rows": 24}})
    return CacheReader(run_extract(cfg, progress=False))


def order_of(r: CacheReader, seed=0, epoch=0, idx=None, **kw):
    shard_of = np.array([ref.shard for ref in r.refs])
    idx = np.arange(len(r)) if idx is None else idx
    kw = {"micro_batch_size": 3, "max_tokens": 400, "shuffle_buffer": 5, "open_shards": 2, **kw}
    return chunk_aware_order(shard_of, r.lengths(), idx, seed=seed, epoch=epoch, **kw)


def test_order_is_seeded_complete_and_within_budget(reader):
    a, b = order_of(reader), order_of(reader)
    assert a.batches == b.batches and np.array_equal(a.arrivals, b.arrivals)
    assert order_of(reader, epoch=1).batches != a.batches
    assert order_of(reader, seed=1).batches != a.batches
    flat = sorted(i for bt in a.batches for i in bt)
    assert flat == list(range(len(reader)))
    ln = reader.lengths()
    assert all(len(bt) <= 3 and (len(bt) == 1 or len(bt) * max(ln[bt]) <= 400) for bt in a.batches)
    # shards are read front to back: inside one shard, arrivals keep the stored order
    for k in reader.shard_ids:
        locs = [reader.refs[i].local for i in a.arrivals if reader.refs[i].shard == k]
        assert locs == sorted(locs)


def test_shuffle_buffer_mixes_shards(reader):
    """With one shard open and no buffer the order is shard by shard; the buffer and open shards mix it."""
    flat = lambda o: [reader.refs[i].shard for b in o.batches for i in b]  # noqa: E731
    seq = flat(order_of(reader, open_shards=1, shuffle_buffer=1, micro_batch_size=1, window=1))
    assert sum(x != y for x, y in zip(seq, seq[1:])) == len(reader.shard_ids) - 1
    mixed = flat(order_of(reader, open_shards=3, shuffle_buffer=8, micro_batch_size=1, window=1))
    assert sum(x != y for x, y in zip(mixed, mixed[1:])) > 3 * len(reader.shard_ids)


def _same(b1: dict, b2: dict) -> None:
    assert b1.keys() == b2.keys()
    for k in b1:
        if isinstance(b1[k], torch.Tensor):
            assert b1[k].dtype == b2[k].dtype and torch.equal(b1[k], b2[k]), k
        else:
            assert b1[k] == b2[k], k


@pytest.mark.parametrize("max_length", [None, 30])
def test_batches_equal_sample_by_sample_reads(reader, max_length):
    o = order_of(reader)
    t2d = np.arange(reader.vocab_size)
    got = list(CacheLoader(reader, o.arrivals, o.batches, t2d, max_length, threads=3, prefetch=2))
    assert len(got) == len(o.batches)
    for b, ids in zip(got, o.batches):
        _same(b, collate([reader.sample(i) for i in ids], t2d, max_length, sample_ids=ids))


def test_resume_at_any_position_equals_the_uninterrupted_stream(reader):
    """Rank 1 of 2, accumulation 2: the stream from step s equals the tail of the full stream."""
    o = order_of(reader, micro_batch_size=1)
    t2d = np.arange(reader.vocab_size)
    full = rank_schedule(o.batches, rank=1, world_size=2, grad_accum=2)
    ref = list(CacheLoader(reader, o.arrivals, full, t2d, threads=2))
    for s in (1, 3):
        tail = rank_schedule(order_of(reader, micro_batch_size=1).batches, rank=1, world_size=2, grad_accum=2,
                             start_step=s)
        got = list(CacheLoader(reader, o.arrivals, tail, t2d, threads=2))
        assert len(got) == len(ref) - 2 * s
        for a, b in zip(got, ref[2 * s:]):
            _same(a, b)


def test_every_chunk_is_decoded_once(reader, monkeypatch):
    calls: list = []
    real = ChunkedArray.chunk

    def counting(self, i, **kw):
        calls.append((str(self.file), i))
        return real(self, i, **kw)

    monkeypatch.setattr(ChunkedArray, "chunk", counting)
    o = order_of(reader)
    list(CacheLoader(reader, o.arrivals, o.batches, np.arange(reader.vocab_size), threads=2))
    assert len(calls) == len(set(calls))
    n_chunks = sum(sh.array(f).n_chunks for sh in reader.shards.values()
                   for f in ("input_ids", "loss_mask", "hidden", "topk_ids", "topk_logprobs"))
    assert len(calls) == n_chunks and n_chunks > 5 * len(reader.shard_ids)


def test_stopping_early_leaves_no_thread_behind(reader):
    """Every thread the loader starts (decode pool, reader, collate, whatever their names) has
    ended shortly after the consumer stops early; none is left waiting forever."""
    import threading
    import time

    o = order_of(reader)
    before = set(threading.enumerate())
    it = iter(CacheLoader(reader, o.arrivals, o.batches, np.arange(reader.vocab_size), threads=2))
    next(it)
    started = set(threading.enumerate()) - before
    assert len(started) >= 3  # 2 decode threads at least one of which ran, the reader, the collate thread
    it.close()
    deadline = time.monotonic() + 10
    for t in started:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = sorted(t.name for t in started if t.is_alive())
    assert not alive, f"threads still alive 10 s after the consumer stopped: {alive}"
