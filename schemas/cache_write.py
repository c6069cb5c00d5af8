"""Write shard arrays as zarr v3 sharded arrays, inner chunk by inner chunk as the rows arrive.

The file layout is exactly zarr's (`sharding_indexed`, index at the end with its
crc32c, one file per array): zarr itself reads what this writes (tested). Doing the
encoding here rather than through zarr gives three things zarr's writer does not:
* rows are written as they arrive, in any order (`ArrayStream`): an inner chunk is
  compressed and appended to the array's file as soon as all its rows are there, so a
  shard is never held in memory (DESIGN.md section 8); the index, written when the array
  is complete, says where each chunk is;
* every inner chunk is compressed and crc32c-checksummed in parallel threads
  (numcodecs releases the GIL), so one shard uses `extract.writer_threads` cores;
* every inner chunk is written, an all-zero one included, so that a chunk missing from
  the index always means damage (zarr skips chunks equal to fill_value by default).

Memory of one `ArrayStream`: the chunks partly filled plus at most `threads + 1` chunks
being compressed (whole chunks are compressed straight from the caller's rows, which
it must not change afterwards). shard.json's checksum of each array is the sha256 of
its inner chunks' sha256 in row order (`chunked_checksum`; `checksum_kind`), computed
per chunk as it is compressed; shards written before that hold the sha256 of the
whole array (`schemas.cache.array_checksum`), and `verify_shard` checks either.

`ShardStream` writes a whole shard that way: a temporary directory named after its
owner, the row arrays streamed, then the small arrays, shard.json (last) and the atomic
rename into place (schemas.cache).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eagle3-compress")
    return _POOLS[threads]


def _codec(compressor: str, itemsize: int) -> tuple[Optional[object], list[dict]]:
    """(numcodecs codec or None, its zarr v3 codec JSON entries)."""
    if compressor == "none":
        return None, []
    if compressor == "zstd":
        from numcodecs import Zstd

        return Zstd(level=1), [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
    if compressor in ("blosc-zstd", "lz4"):
        from numcodecs import Blosc

        cname, clevel = ("zstd", 1) if compressor == "blosc-zstd" else ("lz4", 5)
        return (Blosc(cname=cname, clevel=clevel, shuffle=Blosc.SHUFFLE, blocksize=0),
                [{"name": "blosc", "configuration": {"typesize": itemsize, "cname": cname, "clevel": clevel,
                                                     "shuffle": "shuffle", "blocksize": 0}}])
    raise ValueError(f"unknown compressor '{compressor}' (none, zstd, blosc-zstd, lz4)")


def _crc(b: bytes) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(b)).to_bytes(4, "little")


def encode_chunk(chunk: np.ndarray, codec) -> bytes:
    """One inner chunk -> compressed bytes + crc32c (little-endian) of those bytes."""
    raw = np.ascontiguousarray(chunk)
    body = bytes(codec.encode(raw)) if codec is not None else raw.tobytes()
    return body + _crc(body)


def array_json(shape: tuple, dtype, chunk_rows: int, n_chunks: int, codec_json: list[dict],
               attributes: dict) -> dict:
    rest = [int(s) for s in shape[1:]]
    return {
        "shape": [int(s) for s in shape], "data_type": str(np.dtype(dtype)),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n_chunks) * chunk_rows, *rest]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_rows, *rest],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *codec_json, {"name": "crc32c"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": attributes, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
    }


class _Done:
    """A finished Future's face for chunks encoded in the calling thread."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def done(self) -> bool:
        return True


CHECKSUM_KIND = "sha256 of chunks"  # shard.json `checksum_kind` of shards written by ArrayStream


def _encode_and_digest(chunk: np.ndarray, codec, real_rows: int) -> tuple[bytes, bytes]:
    return encode_chunk(chunk, codec), hashlib.sha256(np.ascontiguousarray(chunk[:real_rows]).data).digest()


def chunked_checksum(a: np.ndarray, chunk_rows: int) -> str:
    """sha256 over the array's dtype, shape and the sha256 of each inner chunk's rows, in row order:
    what shard.json records for each array of a shard written chunk by chunk."""
    h = hashlib.sha256(str(a.dtype).encode() + str(tuple(a.shape)).encode())
    for s in range(0, a.shape[0], max(1, chunk_rows)):
        h.update(hashlib.sha256(np.ascontiguousarray(a[s:s + chunk_rows]).data).digest())
    return h.hexdigest()


class ArrayStream:
    """One array (rows on axis 0) written inner chunk by inner chunk as its rows arrive, in any order.

    `put(start, rows)` hands rows over; an inner chunk is compressed and appended to the
    file as soon as all its rows are there (whole chunks straight from `rows`, which the
    caller must not change afterwards; the others through a chunk buffer). The index maps
    each chunk to its place in the file, so the order of arrival does not matter to any
    reader. `close()` checks that every row came, writes the index + its crc32c and
    returns (bytes written, `chunked_checksum` of the array).
    """

    def __init__(self, path: Path, shape: tuple, dtype, *, chunk_rows: int, compressor: str, attributes: dict,
                 threads: int = 1):
        self.dtype = np.dtype(dtype)
        if self.dtype.byteorder == ">":
            raise ValueError(f"{path}: big-endian arrays are not stored")
        self.path, self.shape = Path(path), tuple(int(s) for s in shape)
        self.rows_total, self.row_shape = self.shape[0], self.shape[1:]
        self.chunk_rows = int(chunk_rows)
        self.n = -(-self.rows_total // self.chunk_rows) if self.rows_total else 0
        self.codec, codec_json = _codec(compressor, self.dtype.itemsize)
        self.threads = max(1, int(threads))
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "zarr.json").write_text(json.dumps(
            array_json(self.shape, self.dtype, self.chunk_rows, self.n, codec_json, attributes), indent=2))
        self.file = None
        if self.n:
            f = self.path.joinpath("c", *(["0"] * len(self.shape)))
            f.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(f, "wb")
        self.cursor = 0  # where `append` puts rows
        self.held_rows = 0  # rows copied into chunks still waiting for other rows
        self._parts: dict[int, list] = {}  # chunk -> [buffer, rows filled]
        self._submitted = np.zeros(self.n, dtype=bool)
        self._pending: deque = deque()  # (chunk, Future of (compressed bytes, sha256)) in file order
        self._index = np.full((self.n, 2), (1 << 64) - 1, dtype="<u8")
        self._digests: list[Optional[bytes]] = [None] * self.n
        self._offset = 0

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_rows, self.rows_total - c * self.chunk_rows)

    def append(self, rows: np.ndarray) -> None:
        """Rows right after the last ones appended."""
        self.put(self.cursor, rows)
        self.cursor += np.asarray(rows).shape[0]

    def put(self, start: int, rows: np.ndarray) -> None:
        """Rows start..start+len(rows)."""
        rows = np.asarray(rows)
        m = rows.shape[0]
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of {rows.dtype}{list(rows.shape[1:])}, the array stores "
                             f"{self.dtype}{list(self.row_shape)}")
        if start < 0 or start + m > self.rows_total:
            raise ValueError(f"{self.path}: rows {start}..{start + m} handed over, the array has {self.rows_total}")
        C, i = self.chunk_rows, 0
        while i < m:
            r = start + i
            c = r // C
            clen = self._chunk_len(c)
            take = min(c * C + clen - r, m - i)
            if self._submitted[c]:
                raise ValueError(f"{self.path}: rows {r}..{r + take} handed over twice (chunk {c} is written)")
            if take == C:  # a whole inner chunk: compressed from the caller's rows, no copy
                self._submit(c, rows[i:i + take], take)
            else:
                part = self._parts.get(c)
                if part is None:
                    part = self._parts[c] = [np.empty((C, *self.row_shape), dtype=self.dtype), 0]
                part[0][r - c * C:r - c * C + take] = rows[i:i + take]
                part[1] += take
                self.held_rows += take
                if part[1] == clen:
                    del self._parts[c]
                    self.held_rows -= clen
                    part[0][clen:] = 0  # zarr stores the last inner chunk full size, padded with fill_value
                    self._submit(c, part[0], clen)
            i += take

    def _submit(self, c: int, chunk: np.ndarray, real_rows: int) -> None:
        self._submitted[c] = True
        chunk = np.ascontiguousarray(chunk)
        if self.threads > 1:
            fut = _pool(self.threads).submit(_encode_and_digest, chunk, self.codec, real_rows)
        else:
            fut = _Done(_encode_and_digest(chunk, self.codec, real_rows))
        self._pending.append((c, fut))
        while self._pending and (len(self._pending) > self.threads + 1 or self._pending[0][1].done()):
            self._write_next()

    def _write_next(self) -> None:
        c, fut = self._pending.popleft()
        blob, digest = fut.result()
        self.file.write(blob)
        self._index[c] = (self._offset, len(blob))
        self._digests[c] = digest
        self._offset += len(blob)

    def close(self) -> tuple[int, str]:
        missing = np.flatnonzero(~self._submitted)
        if missing.size:
            c = int(missing[0])
            raise ValueError(f"{self.path}: rows of {missing.size} inner chunks were never handed over (first: "
                             f"chunk {c}, rows {c * self.chunk_rows}..{c * self.chunk_rows + self._chunk_len(c)})")
        while self._pending:
            self._write_next()
        h = hashlib.sha256(str(self.dtype).encode() + str(self.shape).encode() + b"".join(self._digests))
        if self.file is None:
            return 0, h.hexdigest()
        ib = self._index.tobytes()
        self.file.write(ib + _crc(ib))
        self.file.close()
        self.file = None
        return self._offset + len(ib) + 4, h.hexdigest()

    def abort(self) -> None:
        for _, f in self._pending:
            if isinstance(f, Future):
                f.cancel()
        self._pending.clear()
        self._parts.clear()
        if self.file is not None:
            f, self.file = self.file, None
            try:
                f.close()  # flushing the buffer may fail again (a full disk): the file goes anyway
            except OSError:
                pass


def write_array(path: Path, a: np.ndarray, *, chunk_rows: int, compressor: str, attributes: dict,
                threads: int = 1) -> int:
    """Write array `a` (rows on axis 0) under `path`; returns the bytes written."""
    s = ArrayStream(path, a.shape, a.dtype, chunk_rows=chunk_rows, compressor=compressor, attributes=attributes,
                    threads=threads)
    try:
        s.append(a)
        return s.close()[0]
    finally:
        s.abort()


class ShardStream:
    """Shard k of a cache, written as its rows arrive (DESIGN.md section 4 layout).

    `shapes` gives the full shape of every row array of `layout(hidden_dtype)` (input_ids,
    loss_mask, hidden[, hidden_scale], topk_ids, topk_logprobs). `append(name, rows)`
    hands rows over in order; `finish(...)` writes the small arrays and shard.json and
    commits (ShardCommitted when another process committed shard k first); `abort()`
    removes the temporary directory.
    """

    def __init__(self, root: str | Path, k: int, shapes: dict[str, tuple], *, hidden_dtype: str = "bfloat16",
                 chunk_rows: int = 2048, compressor: str = "zstd", threads: int = 1):
        from schemas import cache

        self.root, self.k = Path(root), int(k)
        self.final = cache.shards_dir(root) / cache.shard_name(k)
        if cache.is_committed(self.final):
            raise cache.ShardCommitted(f"shard {self.final} is already committed")
        self.names = cache.layout(hidden_dtype)
        self.fp8 = self.names is cache.FP8_ARRAYS
        row_names = cache.stored_row_arrays(hidden_dtype)
        if set(shapes) != set(row_names):
            raise cache.CacheError(f"shard {k}: row arrays {sorted(shapes)}, the layout has {sorted(row_names)}")
        self.compressor, self.chunk_rows = compressor, int(chunk_rows)
        self.tmp = cache.temp_shard_path(root, k)  # this process's own: its name holds the owner
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.raw_bytes = 0
        self.streams: dict[str, ArrayStream] = {}
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            (self.tmp / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                            "attributes": {}}))
            for name in row_names:
                stored, logical = self.names[name]
                shape = tuple(shapes[name])
                rows = max(1, min(self.chunk_rows, shape[0]))
                self.streams[name] = ArrayStream(self.tmp / name, shape, stored, chunk_rows=rows,
                                                 compressor=compressor, attributes={"logical_dtype": logical},
                                                 threads=threads)
                self.raw_bytes += int(np.prod(shape)) * np.dtype(stored).itemsize
        except BaseException:
            self.abort()
            raise

    def append(self, name: str, rows: np.ndarray) -> None:
        self.streams[name].append(rows)

    def put(self, name: str, start: int, rows: np.ndarray) -> None:
        self.streams[name].put(start, rows)

    @property
    def held_rows(self) -> int:
        """Rows of the hidden states waiting in partly filled chunks."""
        return self.streams["hidden"].held_rows

    def finish(self, offsets: np.ndarray, sample_index: np.ndarray, token_counts: np.ndarray, *,
               loss_tokens: int, extra: Optional[dict] = None) -> dict:
        from schemas import cache

        checksums = {}
        for name, s in self.streams.items():
            checksums[name] = s.close()[1]
        for name, a in (("offsets", offsets), ("sample_index", sample_index), ("token_counts", token_counts)):
            stored, logical = self.names[name]
            a = np.ascontiguousarray(a)
            if a.dtype != np.dtype(stored):
                raise cache.CacheError(f"write_shard: '{name}' has dtype {a.dtype}, the layout stores {stored}")
            s = ArrayStream(self.tmp / name, a.shape, a.dtype, chunk_rows=max(1, a.shape[0]),
                            compressor=self.compressor, attributes={"logical_dtype": logical})
            try:
                s.append(a)
                checksums[name] = s.close()[1]
            finally:
                s.abort()
            self.raw_bytes += a.nbytes
        info = {
            "schema": cache.SHARD_SCHEMA_ID,
            "shard": self.k,
            "samples": int(len(offsets) - 1),
            "tokens": int(offsets[-1]) if len(offsets) else 0,
            "loss_tokens": int(loss_tokens),
            "raw_bytes": int(self.raw_bytes),
            "compressor": self.compressor,
            "chunk_rows": self.chunk_rows,
            "checksums": {n: checksums[n] for n in self.names},
            "checksum_kind": CHECKSUM_KIND,
            "chunk_checksums": "crc32c",
            **({"hidden_dtype": "float8_e4m3fn"} if self.fp8 else {}),
            **(extra or {}),
        }
        (self.tmp / cache.SHARD_JSON).write_text(json.dumps(info, indent=1))
        cache._commit_shard(self.root, self.tmp, self.final)
        return info

    def abort(self) -> None:
        for s in self.streams.values():
            s.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
