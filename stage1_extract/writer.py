"""Background shard writer: assembly, compression and disk writes run off the compute path.

The compute loop hands over trimmed per-batch results (`put_batch`); a writer thread
copies them into the shard's buffers (rows in sample order, whatever the batch
order) and, once a shard is complete, a flush thread writes it with `schemas.cache.write_shard`
(temp dir, shard.json last, atomic rename), its inner chunks compressed and
checksummed by `threads` threads in parallel (numcodecs releases the GIL). The queue
between compute and the writer is bounded (`extract.writer_queue` batches), and at
most one shard is flushing while the next one fills, so host memory stays bounded
and the target only waits when the disk is the bottleneck.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from schemas.cache import layout, shards_dir, write_shard


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


class _Assembly:
    def __init__(self, plan: ShardPlan, hidden_size: int, topk: int, vocab_size: int, fp8: bool = False):
        self.plan = plan
        T = plan.num_tokens
        self.fp8 = fp8
        self.hidden = np.empty((T, 3, hidden_size), dtype=np.uint8 if fp8 else np.uint16)
        self.hidden_scale = np.empty((T, 3), dtype=np.float16) if fp8 else None
        self.topk_ids = np.empty((T, topk), dtype=np.int32)
        self.topk_logprobs = np.empty((T, topk), dtype=np.float16)
        self.done = np.zeros(len(plan.sample_index), dtype=bool)
        self.vocab_size = vocab_size

    def fill(self, b: BatchResult) -> None:
        from schemas.cache import bf16_to_bits

        if b.ready is not None:
            b.ready.synchronize()
        if self.fp8:  # packed rows: e4m3 bits then the fp16 scale's two bytes (schemas.fp8.pack)
            packed = b.hidden.numpy()
            hid = packed[..., :-2]
            scale = np.ascontiguousarray(packed[..., -2:]).view(np.float16)[..., 0]
        else:
            hid = bf16_to_bits(b.hidden)
        ids = b.topk_ids.numpy()
        lps = b.topk_logprobs.numpy()
        o = self.plan.offsets
        row = 0
        for j in b.local:
            s, e = int(o[j]), int(o[j + 1])
            n = e - s
            self.hidden[s:e] = hid[row:row + n]
            if self.fp8:
                self.hidden_scale[s:e] = scale[row:row + n]
            self.topk_ids[s:e] = ids[row:row + n]
            self.topk_logprobs[s:e] = lps[row:row + n]
            self.done[j] = True
            row += n
        if row != hid.shape[0]:
            raise WriterError(f"shard {self.plan.shard}: batch has {hid.shape[0]} rows, its samples {row}")

    def arrays(self) -> dict[str, np.ndarray]:
        p = self.plan
        if not self.done.all():
            missing = np.flatnonzero(~self.done)[:5].tolist()
            raise WriterError(f"shard {p.shard}: samples {missing} were never filled")
        input_ids = np.concatenate(p.input_ids).astype(np.int32) if p.input_ids else np.zeros(0, np.int32)
        loss_mask = np.concatenate(p.loss_mask).astype(np.uint8) if p.loss_mask else np.zeros(0, np.uint8)
        masked = input_ids[loss_mask.astype(bool)]
        if masked.size and int(masked.max()) >= self.vocab_size:
            raise WriterError(f"shard {p.shard}: token id {int(masked.max())} >= vocab size {self.vocab_size}")
        counts = np.bincount(masked, minlength=self.vocab_size).astype(np.int64)
        out = {"input_ids": input_ids, "loss_mask": loss_mask, "hidden": self.hidden,
               "topk_ids": self.topk_ids, "topk_logprobs": self.topk_logprobs,
               "offsets": p.offsets, "sample_index": p.sample_index.astype(np.int64), "token_counts": counts}
        if self.fp8:
            out["hidden_scale"] = self.hidden_scale
        assert set(out) == set(layout("fp8" if self.fp8 else "bf16"))
        return out


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
        self.raw_bytes = 0  # bytes of arrays handed to write_shard (for MB/s figures)
        self.shard_extra = shard_extra or (lambda plan: {})
        self.on_commit = on_commit
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: Optional[BaseException] = None
        self.wait_s = 0.0  # compute time spent blocked on a full queue
        self.flush_s = 0.0  # time spent compressing + writing shards
        self.committed: list[dict] = []
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle3-flush")
        self._pending: Optional[Future] = None
        self._asm: dict[int, _Assembly] = {}
        self._claim = None  # the worker's claim on the cache (claim_worker), held until close()/abort()
        self._thread = threading.Thread(target=self._run, name="eagle3-writer", daemon=True)
        self._thread.start()

    def claim_worker(self, rank: int, world: int) -> None:
        """Claim worker id rank/world on the cache: a second process with the same id (it would
        write the same shards) fails here, naming the first. Released by close()/abort() or death."""
        from schemas.cache import worker_claim
        from schemas.locks import LockBusy

        claim = worker_claim(self.root, rank, world)
        try:
            self._claim = claim.acquire()
        except LockBusy:
            self.abort()
            raise WriterError(f"{self.root}: extract worker {rank}/{world} is already running on this cache "
                              f"({claim.holder()}); two processes with one worker id would write the same shards. "
                              f"Wait for it to finish, or give this run another --worker") from None

    def _release_claim(self) -> None:
        if self._claim is not None:
            self._claim.release()

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
            self._flusher.shutdown(wait=True)
            self._raise_if_failed()
        finally:
            self._release_claim()

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
        self._flusher.shutdown(wait=True)
        self._release_claim()

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
            try:
                kind, payload = item
                if kind == "begin":
                    self._asm[payload.shard] = _Assembly(payload, self.hidden_size, self.topk, self.vocab_size,
                                                         self.fp8)
                elif kind == "batch":
                    self._asm[payload.shard].fill(payload)
                elif kind == "end":
                    asm = self._asm.pop(payload)
                    arrays = asm.arrays()
                    self._wait_pending()  # at most one shard flushing while the next fills
                    self._pending = self._flusher.submit(self._flush, asm.plan, arrays)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
        try:
            self._wait_pending()
        except BaseException as e:  # noqa: BLE001
            self.error = self.error or e

    def _wait_pending(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def _flush(self, plan: ShardPlan, arrays: dict[str, np.ndarray]) -> dict:
        t0 = time.perf_counter()
        from schemas.cache import ShardCommitted, remove_dead_temp_dirs, remove_own_temp_dir
        from schemas.disk import disk_full, is_disk_full

        # Temp dirs of this shard left by a killed run go; a live process's dir is never touched.
        remove_dead_temp_dirs(self.root, plan.shard)
        try:
            info = write_shard(self.root, plan.shard, arrays, compressor=self.compressor,
                               chunk_rows=self.chunk_rows, extra=self.shard_extra(plan),
                               hidden_dtype="float8_e4m3fn" if self.fp8 else "bfloat16", threads=self.threads)
        except ShardCommitted as e:  # another worker layout wrote the same (deterministic) shard first
            print(f"extract: {e}; keeping it", file=sys.stderr, flush=True)
            return {}
        except Exception as e:  # noqa: BLE001 - zarr may wrap the OSError
            remove_own_temp_dir(self.root, plan.shard)  # on a full disk this frees the space
            if is_disk_full(e):
                raise disk_full(e, shards_dir(self.root), f"shard {plan.shard} was not committed (its temporary "
                                f"files are removed; committed shards are intact)") from e
            raise
        self.flush_s += time.perf_counter() - t0
        self.raw_bytes += int(info["raw_bytes"])
        self.committed.append(info)
        if self.on_commit is not None:
            self.on_commit(info)
        return info
