"""Background shard writer: rows go to the shard's files as they arrive, off the compute path.

The compute loop hands over trimmed per-batch results (`put_batch`) through a bounded
queue (`extract.writer_queue` batches). The writer thread puts each sample's rows at
their place in the shard's arrays (schemas.cache_write.ShardStream): an inner chunk is
compressed (by `threads` threads) and appended to its array's file as soon as all its
rows are there, whatever order the batches come in (they are length-sorted inside
windows of consecutive samples, see stage1_extract.extract). At the end of the shard
come the small arrays, shard.json and the atomic rename.

Host memory of the writer, whatever the shard's size (DESIGN.md section 8), in rows of
features (row bytes = 3H*2 + K*6, +6 with fp8 scales; ~25 KB for MiniCPM4-8B):
  queued batches      <= writer_queue * max_tokens_per_batch
  partly filled chunks < window_tokens + chunk_rows (only chunks whose other rows belong to
                         samples of the window not yet computed; typically the edges of the
                         samples done, a few chunk_rows each: `peak_held_rows` reports it)
  chunks compressing  <= (threads + 1) * chunk_rows per row array
plus the shard's token ids and loss mask (5 bytes a token) and its token counts (8 bytes
a vocabulary entry).
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from schemas.cache import shards_dir


class WriterError(RuntimeError):
    pass


def default_writer_threads(n: int = 0) -> int:
    """extract.writer_threads; 0 = up to 4 cores (one H100's MiniCPM4-8B output needs ~2, bench_extract)."""
    import os

    return int(n) if n and n > 0 else max(1, min(4, (os.cpu_count() or 1)))


@dataclass
class ShardPlan:
    """What shard k will hold, known before any forward pass."""

    shard: int
    sample_index: np.ndarray  # int64 [N], ascending
    input_ids: list  # N int32 arrays
    loss_mask: list  # N uint8 arrays
    offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        lens = np.array([len(x) for x in self.input_ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclass
class BatchResult:
    """Trimmed outputs of one batch: rows of samples `local` (shard-local ids) back to back."""

    shard: int
    local: list[int]
    hidden: Any  # torch bf16 [rows, 3, H], or fp8: uint8 [rows, 3, H + 2] (e4m3 bits + fp16 scale bytes)
    topk_ids: Any  # torch int32 [rows, K]
    topk_logprobs: Any  # torch float16 [rows, K]
    ready: Optional[Any] = None  # a CUDA event to wait on before reading (non-blocking D2H)


class _ShardFill:
    """One shard's rows arriving batch by batch, in any order, each sample put at its rows."""

    def __init__(self, plan: ShardPlan, stream, vocab_size: int, fp8: bool):
        self.plan, self.stream, self.fp8, self.vocab_size = plan, stream, fp8, vocab_size
        self.filled = np.zeros(len(plan.sample_index), dtype=bool)
        self.peak_held_rows = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.loss_tokens = 0

    def add(self, b: BatchResult) -> None:
        from schemas.cache import bf16_to_bits

        if b.ready is not None:
            b.ready.synchronize()
        if self.fp8:  # packed rows: e4m3 bits then the fp16 scale's two bytes (schemas.fp8.pack)
            packed = b.hidden.numpy()
            hid = packed[..., :-2]
            scale = np.ascontiguousarray(packed[..., -2:]).view(np.float16)[..., 0]
        else:
            hid, scale = bf16_to_bits(b.hidden), None
        ids, lps = b.topk_ids.numpy(), b.topk_logprobs.numpy()
        p, o, row, k = self.plan, self.plan.offsets, 0, self.plan.shard
        n_rows = sum(int(o[j + 1] - o[j]) for j in b.local)
        if n_rows != hid.shape[0]:
            raise WriterError(f"shard {k}: batch has {hid.shape[0]} rows, its samples {n_rows}")
        for j in b.local:
            if self.filled[j]:
                raise WriterError(f"shard {k}: sample {j} was handed over twice")
            a, n = int(o[j]), int(o[j + 1] - o[j])
            self._count(j)
            s = self.stream
            s.put("input_ids", a, np.asarray(p.input_ids[j], dtype=np.int32))
            s.put("loss_mask", a, np.asarray(p.loss_mask[j], dtype=np.uint8))
            s.put("hidden", a, hid[row:row + n])
            if self.fp8:
                s.put("hidden_scale", a, scale[row:row + n])
            s.put("topk_ids", a, ids[row:row + n])
            s.put("topk_logprobs", a, lps[row:row + n])
            self.filled[j] = True
            row += n
        self.peak_held_rows = max(self.peak_held_rows, self.stream.held_rows)

    def _count(self, j: int) -> None:
        """Loss-masked token counts (token_counts) and the vocabulary check of sample j."""
        p = self.plan
        tokens = np.asarray(p.input_ids[j])
        masked = tokens[np.asarray(p.loss_mask[j]).astype(bool)]
        if masked.size and int(masked.max()) >= self.vocab_size:
            raise WriterError(f"shard {p.shard}: token id {int(masked.max())} >= vocab size {self.vocab_size}")
        self.counts += np.bincount(masked, minlength=self.vocab_size)
        self.loss_tokens += int(masked.size)

    def finish(self, extra: dict) -> dict:
        p = self.plan
        if not self.filled.all():
            missing = np.flatnonzero(~self.filled)[:5].tolist()
            raise WriterError(f"shard {p.shard}: samples {missing} were never filled")
        return self.stream.finish(p.offsets, p.sample_index.astype(np.int64), self.counts,
                                  loss_tokens=self.loss_tokens, extra=extra)


class ShardWriter:
    """Usage: begin_shard(plan) -> put_batch(...)* -> end_shard(k) ... -> close()."""

    def __init__(self, cache_root: str | Path, *, hidden_size: int, topk: int, vocab_size: int,
                 compressor: str = "zstd", chunk_rows: int = 2048, queue_size: int = 4,
                 shard_extra: Optional[Callable[[ShardPlan], dict]] = None,
                 on_commit: Optional[Callable[[dict], None]] = None, hidden_dtype: str = "bf16",
                 threads: int = 0):
        self.root = Path(cache_root)
        self.hidden_size, self.topk, self.vocab_size = hidden_size, topk, vocab_size
        self.compressor, self.chunk_rows = compressor, chunk_rows
        self.fp8 = hidden_dtype in ("fp8", "float8_e4m3fn")
        self.threads = default_writer_threads(threads)
        self.raw_bytes = 0  # bytes of the arrays written (for MB/s figures)
        self.shard_extra = shard_extra or (lambda plan: {})
        self.on_commit = on_commit
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: Optional[BaseException] = None
        self.wait_s = 0.0  # compute time spent blocked on a full queue
        self.flush_s = 0.0  # writer-thread time spent reordering, compressing and writing
        self.peak_held_rows = 0  # largest reorder buffer seen (rows)
        self.committed: list[dict] = []
        self._fill: Optional[_ShardFill] = None
        self._current: Optional[int] = None  # the shard begun last
        self._claim = None  # the worker's claim on the cache (claim_worker), held until close()/abort()
        self._owner = None  # this process's owner lock: its temporary shards are not reclaimed while held
        self._thread = threading.Thread(target=self._run, name="eagle3-writer", daemon=True)
        self._thread.start()

    def claim_worker(self, rank: int, world: int) -> None:
        """Claim worker id rank/world on the cache: a second process with the same id (it would
        write the same shards) fails here, naming the first. Released by close()/abort() or death."""
        from schemas.cache import worker_claim
        from schemas.locks import LockBusy, LockError

        claim = worker_claim(self.root, rank, world)
        try:
            self._claim = claim.acquire()
        except LockError:
            self.abort()
            raise
        except LockBusy:
            self.abort()
            raise WriterError(f"{self.root}: extract worker {rank}/{world} is already running on this cache "
                              f"({claim.holder()}); two processes with one worker id would write the same shards. "
                              f"Wait for it to finish, or give this run another --worker") from None

    def _release_locks(self) -> None:
        for lock in (self._owner, self._claim):
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ producer side
    @property
    def depth(self) -> int:
        return self.q.qsize()

    def _put(self, item) -> None:
        t0 = time.perf_counter()
        while True:
            self._raise_if_failed()
            try:
                self.q.put(item, timeout=0.5)
                break
            except queue.Full:
                continue
        self.wait_s += time.perf_counter() - t0

    def begin_shard(self, plan: ShardPlan) -> None:
        self._put(("begin", plan))

    def put_batch(self, b: BatchResult) -> None:
        self._put(("batch", b))

    def end_shard(self, k: int) -> None:
        self._put(("end", k))

    def close(self) -> None:
        """Wait for every queued shard to be written; re-raise a writer failure."""
        try:
            self._put(None)
            self._thread.join()
            self._raise_if_failed()
        finally:
            self._release_locks()

    def abort(self) -> None:
        """Stop without writing what is still queued (after a compute error)."""
        self.error = self.error or WriterError("aborted")
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=60)
        self._release_locks()

    def _raise_if_failed(self) -> None:
        if self.error is not None and not (isinstance(self.error, WriterError) and str(self.error) == "aborted"):
            raise WriterError(f"the shard writer failed: {self.error}") from self.error

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            if self.error is not None:
                continue  # drain so that the producer never blocks forever
            t0 = time.perf_counter()
            try:
                kind, payload = item
                if kind == "begin":
                    self._begin(payload)
                elif self._fill is None:
                    pass  # a shard that another worker layout committed before this one began it
                elif kind == "batch":
                    self._fill.add(payload)
                    self.peak_held_rows = max(self.peak_held_rows, self._fill.peak_held_rows)
                elif kind == "end":
                    self._flush(self._fill)
                    self._fill = None
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
                self.error = self._failed(e)
            self.flush_s += time.perf_counter() - t0
        if self._fill is not None:  # aborted mid-shard: its temporary files go
            self._fill.stream.abort()
            self._fill = None

    def _begin(self, plan: ShardPlan) -> None:
        from schemas.cache import ShardCommitted
        from schemas.cache_write import ShardStream
        from schemas.leftovers import owner_lock, reclaim

        self._current = plan.shard
        if self._owner is None:  # before the first temporary shard exists
            self._owner = owner_lock(self.root).acquire()
        reclaim(self.root)  # temporary shards of writers that are gone, on any host
        T, H, K = plan.num_tokens, self.hidden_size, self.topk
        shapes = {"input_ids": (T,), "loss_mask": (T,), "hidden": (T, 3, H), "topk_ids": (T, K),
                  "topk_logprobs": (T, K), **({"hidden_scale": (T, 3)} if self.fp8 else {})}
        try:
            stream = ShardStream(self.root, plan.shard, shapes, chunk_rows=self.chunk_rows,
                                 hidden_dtype="float8_e4m3fn" if self.fp8 else "bfloat16",
                                 compressor=self.compressor, threads=self.threads)
        except ShardCommitted as e:  # another worker layout wrote the same (deterministic) shard
            print(f"extract: {e}; keeping it", file=sys.stderr, flush=True)
            return
        self._fill = _ShardFill(plan, stream, self.vocab_size, self.fp8)

    def _flush(self, fill: _ShardFill) -> dict:
        """The end of a shard: the last chunks, the small arrays, shard.json, the atomic rename."""
        from schemas.cache import ShardCommitted

        try:
            info = fill.finish(self.shard_extra(fill.plan))
        except ShardCommitted as e:  # another worker layout wrote the same (deterministic) shard first
            print(f"extract: {e}; keeping it", file=sys.stderr, flush=True)
            return {}
        self.raw_bytes += int(info["raw_bytes"])
        self.committed.append(info)
        if self.on_commit is not None:
            self.on_commit(info)
        return info

    def _failed(self, e: BaseException) -> BaseException:
        """Abort the shard being written (its temporary files go); a full disk gets a message naming it."""
        from schemas.disk import disk_full, is_disk_full

        k = self._current
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill.stream.abort()  # on a full disk this frees the space
        if is_disk_full(e):
            what = f"shard {k}" if k is not None else "a shard"
            return disk_full(e, shards_dir(self.root), f"{what} was not committed (its temporary files are "
                             f"removed; committed shards are intact)")
        return e
