"""The training loader: chunk decodes in threads, samples in read order, batches prefetched.

Given an epoch's order (stage2_train.sampler) and the micro-batches this rank runs,
three kinds of threads work ahead of the training step:
* decode threads (`threads`): each decompresses and checks one inner chunk of every
  row array of a shard (numcodecs releases the GIL), a bounded number of chunks ahead;
  each chunk is decoded once (shards are read front to back) and dropped after its
  last sample;
* the reader thread: walks the samples in read (arrival) order, copies each needed
  sample's hidden rows straight into its micro-batch's padded buffer (one copy; the
  small arrays per sample), and stops when it has read what the next `read_ahead`
  batches need (default 40: more than one length-sorting window of the sampler, whose
  first batch needs the whole window read); decode buffers are recycled;
* the collate thread: pads each micro-batch, rebuilds its teacher, pins it (CUDA) and
  queues it (at most `prefetch` batches).
There is no per-sample zarr call and no per-sample file read. Errors in any thread
(a CacheError naming the shard, array and chunk) are raised by the iterator.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from schemas.cache import CacheError, CacheReader

FIELDS = ("input_ids", "loss_mask", "hidden", "topk_ids", "topk_logprobs")


class _Plan:
    """Which samples this rank needs, their rows, the chunks in first-use order and when each can go."""

    def __init__(self, reader: CacheReader, arrivals: np.ndarray, batches: Sequence[Sequence[int]],
                 max_length: Optional[int]):
        needed = {int(i) for b in batches for i in b}
        self.samples = [int(i) for i in arrivals if int(i) in needed]
        if len(self.samples) != len(needed):
            missing = sorted(needed - set(self.samples))[:5]
            raise ValueError(f"batches use samples {missing} that the epoch's order never reads")
        pos = {i: p for p, i in enumerate(self.samples)}
        need = [max(pos[int(i)] for i in b) for b in batches]  # samples read before batch j can run
        self.horizon = np.maximum.accumulate(need).tolist() if need else []  # ... before batches 0..j can
        self.slot = {int(i): (j, r) for j, b in enumerate(batches) for r, i in enumerate(b)}  # sample -> (batch, row)
        self.rows: dict[int, tuple[int, int, int]] = {}  # sample -> (shard, start, stop)
        self.chunk_seq: list[tuple[int, int]] = []
        self.last_use: dict[tuple[int, int], int] = {}
        for p, i in enumerate(self.samples):
            ref = reader.refs[i]
            n = min(ref.length, max_length) if max_length else ref.length
            self.rows[i] = (ref.shard, ref.start, ref.start + n)
            for c in self.chunks_of(reader, ref.shard, ref.start, ref.start + n):
                key = (ref.shard, c)
                if key not in self.last_use:
                    self.chunk_seq.append(key)
                self.last_use[key] = p
        self.batch_len = [max(self.rows[int(i)][2] - self.rows[int(i)][1] for i in b) for b in batches]

    def row_accounting(self, reader: CacheReader) -> tuple[int, int]:
        """(rows this rank decodes: whole inner chunks, each once; rows it trains on: its samples'
        rows after cropping) -- their ratio is what extract.chunk_rows costs (bench/chunk_rows.py)."""
        decoded = sum(reader.shards[s].array("input_ids").chunk_rows for s, _ in self.chunk_seq)
        return decoded, sum(b - a for _, a, b in self.rows.values())

    @staticmethod
    def chunks_of(reader: CacheReader, shard: int, start: int, stop: int) -> range:
        cr = reader.shards[shard].array("input_ids").chunk_rows if stop > start else 1
        return range(start // cr, (stop - 1) // cr + 1) if stop > start else range(0)


class CacheLoader:
    """Iterable of collated micro-batches (`batches`, in order) read with chunk-level prefetch."""

    def __init__(self, reader: CacheReader, arrivals: np.ndarray, batches: Sequence[Sequence[int]],
                 target_to_draft: np.ndarray, max_length: Optional[int] = None, *, threads: int = 2,
                 prefetch: int = 4, read_ahead: int = 40, pin_memory: Optional[bool] = None):
        for sh in reader.shards.values():
            arrs = [sh.array(n) for n in FIELDS] + ([sh.array("hidden_scale")] if "hidden_scale" in sh.layout else [])
            if not all(a.fast for a in arrs) or len({a.chunk_rows for a in arrs if a.shape[0]}) > 1:
                raise CacheError(f"{sh.path}: row arrays are not in the layout the chunk loader reads "
                                 "(use train.num_workers > 0 for the per-sample DataLoader path)")
        self.reader = reader
        self.batches = [list(b) for b in batches]
        self.t2d = np.asarray(target_to_draft, dtype=np.int64)
        self.max_length = max_length
        self.plan = _Plan(reader, arrivals, self.batches, max_length)
        self.threads = max(1, int(threads))
        self.prefetch = max(1, int(prefetch))
        self.read_ahead = max(self.prefetch, int(read_ahead))
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        run = _Run(self)
        try:
            yield from run
        finally:
            run.stop()


class _Run:
    """One pass over the batches: the threads, their shared state and the iterator."""

    def __init__(self, loader: CacheLoader):
        self.L = loader
        self.cond = threading.Condition()
        self.ready: dict[int, list] = {}  # batch -> [hidden buffer, {sample: small rows}]
        self.free: dict[tuple, list] = {}  # recycled decode buffers by (shape, dtype)
        self.free_lock = threading.Lock()
        self.horizon = loader.plan.horizon[min(loader.read_ahead, len(loader.batches) - 1)] if loader.batches else -1
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.out: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.pool = ThreadPoolExecutor(max_workers=loader.threads, thread_name_prefix="eagle3-decode")
        self.reader_t = threading.Thread(target=self._guard, args=(self._read,), daemon=True, name="eagle3-rows")
        self.collate_t = threading.Thread(target=self._guard, args=(self._collate,), daemon=True,
                                          name="eagle3-collate")
        self.reader_t.start()
        self.collate_t.start()

    # ------------------------------------------------------------------ threads
    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the iterator
            with self.cond:
                self.error = self.error or e
                self.cond.notify_all()
            self._put(None)

    def _decode(self, shard: int, c: int) -> dict[str, np.ndarray]:
        sh = self.L.reader.shards[shard]
        out = {}
        for f in FIELDS:
            if f == "hidden" and sh.hidden_dtype != "bfloat16":
                from schemas.fp8 import dequantize_to_bf16_bits

                out[f] = dequantize_to_bf16_bits(sh.array("hidden").chunk(c), sh.array("hidden_scale").chunk(c))
            else:
                a = sh.array(f)
                out[f] = a.chunk(c, out=self._buffer((a.chunk_rows, *a.row_shape), a.dtype))
        return out

    def _buffer(self, shape: tuple, dtype) -> Optional[np.ndarray]:
        with self.free_lock:
            lst = self.free.get((shape, np.dtype(dtype)))
            return lst.pop() if lst else None

    def _recycle(self, chunk: dict[str, np.ndarray]) -> None:
        with self.free_lock:
            for a in chunk.values():
                lst = self.free.setdefault((a.shape, a.dtype), [])
                if len(lst) < 2 * self.L.threads + 2:
                    lst.append(a)

    def _read(self) -> None:
        plan, reader = self.L.plan, self.L.reader
        ahead = 2 * self.L.threads + 1
        futs: dict[tuple[int, int], Future] = {}
        nxt = 0  # next chunk of plan.chunk_seq to submit

        def submit_upto(n: int) -> None:
            nonlocal nxt
            while nxt < min(n, len(plan.chunk_seq)):
                key = plan.chunk_seq[nxt]
                futs[key] = self.pool.submit(self._decode, *key)
                nxt += 1

        chunk_pos = {key: j for j, key in enumerate(plan.chunk_seq)}
        for p, i in enumerate(plan.samples):
            with self.cond:
                while p > self.horizon and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
            shard, a, b = plan.rows[i]
            cs = list(_Plan.chunks_of(reader, shard, a, b))
            if cs:
                submit_upto(chunk_pos[(shard, cs[-1])] + ahead)
            j, row = plan.slot[i]
            with self.cond:
                slot = self.ready.get(j)
                if slot is None:
                    slot = self.ready[j] = [self._hidden_buffer(j, shard), {}]
            small = self._rows(futs, shard, cs, a, b, slot[0][row])
            for c in cs:
                if plan.last_use[(shard, c)] == p:
                    self._recycle(futs.pop((shard, c)).result())
            with self.cond:
                slot[1][i] = small
                self.cond.notify_all()

    def _hidden_buffer(self, j: int, shard: int) -> np.ndarray:
        """Batch j's padded bf16-bits buffer [B, L, 3H] (zeros: padding rows stay zero)."""
        rs = self.L.reader.shards[shard].array("hidden").row_shape
        shape = (len(self.L.batches[j]), self.L.plan.batch_len[j], int(np.prod(rs)))
        if self.L.pin:  # page-locked from the start: the host-to-device copy needs no staging copy
            return torch.zeros(shape, dtype=torch.int16, pin_memory=True).numpy().view(np.uint16)
        return np.zeros(shape, dtype=np.uint16)

    def _rows(self, futs: dict, shard: int, cs: list[int], a: int, b: int, hidden_out: np.ndarray) -> dict:
        """Rows a..b: hidden copied into hidden_out[:b-a] ([L, 3H]), the small arrays returned."""
        small = [f for f in FIELDS if f != "hidden"]
        if not cs:
            return {f: self._empty(shard, f) for f in small}
        cr = self.L.reader.shards[shard].array("input_ids").chunk_rows
        parts = [(futs[(shard, c)].result(), max(a, c * cr) - c * cr, min(b, (c + 1) * cr) - c * cr) for c in cs]
        at = 0
        for d, s, e in parts:
            hidden_out[at:at + e - s] = d["hidden"][s:e].reshape(e - s, -1)
            at += e - s
        if len(parts) == 1:
            d, s, e = parts[0]
            return {f: d[f][s:e].copy() for f in small}
        return {f: np.concatenate([d[f][s:e] for d, s, e in parts]) for f in small}

    def _empty(self, shard: int, f: str) -> np.ndarray:
        arr = self.L.reader.shards[shard].array(f)
        return np.zeros((0, *arr.row_shape), dtype=np.uint16 if f == "hidden" else arr.dtype)

    def _collate(self) -> None:
        from stage2_train.data import collate

        for j, b in enumerate(self.L.batches):
            with self.cond:
                while (j not in self.ready or len(self.ready[j][1]) < len(b)) and self.error is None \
                        and not self.stopped:
                    self.cond.wait()
                if self.error is not None or self.stopped:
                    return
                hidden, got = self.ready.pop(j)
                samples = [got[i] for i in b]
                # the reader may now run as far as the batch `read_ahead` places ahead needs
                self.horizon = self.L.plan.horizon[min(j + 1 + self.L.read_ahead, len(self.L.batches) - 1)]
                self.cond.notify_all()
            batch = collate(samples, self.L.t2d, None, sample_ids=b, hidden=hidden)
            if self.L.pin:
                batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v)
                         for k, v in batch.items()}
            if not self._put(batch):
                return
        self._put(None)

    def _put(self, item) -> bool:
        while not self.stopped:
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ consumer
    def __iter__(self):
        for _ in range(len(self.L.batches)):
            item = self.out.get()
            if item is None:
                break
            yield item
        with self.cond:
            if self.error is not None:
                raise self.error

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        try:
            self.pool.shutdown(wait=False, cancel_futures=True)
        except (AttributeError, TypeError):  # a generator collected at interpreter exit: modules are gone
            pass
