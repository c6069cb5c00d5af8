"""Chunk-level reads of a shard's arrays, integrity-checked, without zarr on the hot path.

Each array of a shard is one zarr v3 array whose single outer chunk is one file
(`<array>/c/0[/0/0]`) holding the inner chunks back to back, followed by the
sharding index (offset, nbytes per inner chunk, uint64 little-endian) and the
index's crc32c. This module reads that layout itself: one `pread` per inner chunk,
crc32c check, one decompression (numcodecs; it releases the GIL), no per-sample zarr
call. Layouts it does not know fall back to zarr (with the same completeness checks).

Integrity (every chunk read, not only `shards verify`):
* caches written since per-chunk checksums exist end each inner chunk's codec chain
  with a crc32c codec: a changed byte is a `CacheError` naming shard, array, chunk;
* the index's own crc32c (zarr writes it for every cache) catches an edited index;
* a missing or empty array file, or an index entry that says "chunk never written",
  is a `CacheError`, never rows of fill_value 0 (new caches write every chunk,
  `write_empty_chunks`; old ones may legitimately omit an all-zero `loss_mask` chunk);
* a chunk that decodes to the wrong size, an unreadable zarr.json, a dtype or a row
  count that disagrees with shard.json / cache.json are `CacheError`s at open.
Older caches without per-chunk checksums still open; the reader says so once.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from schemas.cache import CacheError

EMPTY = (1 << 64) - 1  # index entry of a chunk that was never written
LRU_CHUNKS = 8  # decoded chunks kept for sample-by-sample reads (one per row array, a few shards)
_LRU: dict = {}
_LRU_LOCK = threading.Lock()
_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


class ChunkError(CacheError):
    """A chunk or array file that fails an integrity check."""


def warn_once(key: str, msg: str) -> None:
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


CRC32C_RESIDUE = 0x48674BC7  # crc32c(data + crc32c(data) as 4 little-endian bytes), for any data


def _crc32c(b) -> int:
    import google_crc32c

    return int(google_crc32c.value(b if isinstance(b, bytes) else bytes(b)))


class _Decoder:
    """The bytes-to-bytes codec of an inner chunk (zstd, blosc or none) from its zarr.json entry."""

    def __init__(self, codecs: list[dict], where: str):
        names = [c.get("name") for c in codecs]
        if not names or names[0] != "bytes" or (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
            raise _Unsupported(f"{where}: codecs {names}")
        rest = names[1:]
        self.crc = bool(rest) and rest[-1] == "crc32c"
        if self.crc:
            rest = rest[:-1]
        if len(rest) > 1:
            raise _Unsupported(f"{where}: codecs {names}")
        self.name = rest[0] if rest else "none"
        if self.name == "zstd":
            from numcodecs import Zstd

            self.codec = Zstd()
        elif self.name == "blosc":
            from numcodecs import Blosc

            self.codec = Blosc()
        elif self.name == "none":
            self.codec = None
        else:
            raise _Unsupported(f"{where}: codec {self.name}")

    def decode(self, buf: bytes, nbytes: int, where: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Decoded bytes (uint8, exactly `nbytes`, into `out` when given) of one inner chunk."""
        if self.crc:
            if len(buf) < 4:
                raise ChunkError(f"{where}: {len(buf)} bytes, too short to hold its crc32c")
            # crc32c over the bytes *and* their appended little-endian crc is a constant: no copy
            if _crc32c(buf) != CRC32C_RESIDUE:
                raise ChunkError(f"{where}: crc32c mismatch (the chunk's bytes changed since it was written)")
            body = memoryview(buf)[:-4]
        else:
            body = memoryview(buf)
        out = np.empty(nbytes, dtype=np.uint8) if out is None else out.reshape(-1).view(np.uint8)
        if self.codec is None:
            if len(body) != nbytes:
                raise ChunkError(f"{where}: {len(body)} bytes stored, {nbytes} expected")
            out[:] = np.frombuffer(body, dtype=np.uint8)
            return out
        try:
            got = self.codec.decode(body, out=out)
        except Exception as e:  # noqa: BLE001 - numcodecs raises RuntimeError/ValueError on bad frames
            raise ChunkError(f"{where}: cannot decompress ({self.name}: {e})") from None
        got = np.frombuffer(got, dtype=np.uint8) if not isinstance(got, np.ndarray) else got.view(np.uint8).ravel()
        if got.size != nbytes:
            raise ChunkError(f"{where}: decompressed to {got.size} bytes, {nbytes} expected")
        return got


class _Unsupported(Exception):
    pass


class ChunkedArray:
    """One array of a shard; `rows(a, b)` and `chunk(i)` decode whole inner chunks, each checked.

    Picklable (re-opens lazily in DataLoader workers). Thread-safe: reads use pread.
    """

    def __init__(self, shard_path: Path, name: str):
        self.path = Path(shard_path) / name
        self.shard = Path(shard_path).name
        self.name = name
        self.where = f"{shard_path}: array '{name}'"
        try:
            meta = json.loads((self.path / "zarr.json").read_text())
        except FileNotFoundError:
            raise ChunkError(f"{self.where}: zarr.json is missing") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ChunkError(f"{self.where}: zarr.json is unreadable ({e})") from None
        try:
            self.shape = tuple(int(s) for s in meta["shape"])
            self.dtype = np.dtype(meta["data_type"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChunkError(f"{self.where}: zarr.json has no valid shape/data_type ({e})") from None
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fast = True
        try:
            self._parse_layout(meta)
        except _Unsupported as e:
            self.fast = False
            warn_once(f"layout:{e}", f"{e}: not the layout this reader decodes directly; reading through zarr")
        self._index: Optional[np.ndarray] = None
        # zarr skipped chunks equal to fill_value before every chunk was written (caches without
        # chunk checksums): there an absent all-zero loss_mask chunk is legitimate; nothing else is
        self.allow_empty = name == "loss_mask" and not self.chunk_crc

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_index"] = None
        return d

    # ------------------------------------------------------------------ layout
    def _parse_layout(self, meta: dict) -> None:
        outer = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        codecs = meta.get("codecs") or []
        if (not outer or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed"
                or (meta.get("chunk_key_encoding") or {}).get("name") != "default"):
            raise _Unsupported(f"{self.where}: not a single sharding_indexed codec")
        if any(int(o) < s for o, s in zip(outer, self.shape)) and self.shape[0] > 0:
            raise _Unsupported(f"{self.where}: more than one outer chunk")
        conf = codecs[0].get("configuration") or {}
        inner = [int(c) for c in conf.get("chunk_shape", [])]
        if len(inner) != len(self.shape) or tuple(inner[1:]) != self.row_shape or inner[0] <= 0:
            raise _Unsupported(f"{self.where}: inner chunks {inner} are not row blocks")
        if conf.get("index_location", "end") != "end":
            raise _Unsupported(f"{self.where}: index at the start")
        idx_codecs = [c.get("name") for c in conf.get("index_codecs") or []]
        if idx_codecs not in (["bytes", "crc32c"], ["bytes"]):
            raise _Unsupported(f"{self.where}: index codecs {idx_codecs}")
        self.index_crc = idx_codecs[-1] == "crc32c"
        self.decoder = _Decoder(conf.get("codecs") or [], self.where)
        self.chunk_rows = inner[0]
        self.n_inner = -(-int(outer[0]) // self.chunk_rows)
        sep = (meta.get("chunk_key_encoding").get("configuration") or {}).get("separator", "/")
        self.file = self.path / sep.join(["c"] + ["0"] * len(self.shape))

    @property
    def chunk_crc(self) -> bool:
        return self.fast and self.decoder.crc

    @property
    def n_chunks(self) -> int:
        rows = self.chunk_rows if self.fast else max(1, self.shape[0])
        return -(-self.shape[0] // rows) if self.shape[0] else 0

    def chunk_span(self, i: int) -> tuple[int, int]:
        rows = self.chunk_rows if self.fast else max(1, self.shape[0])
        return i * rows, min(self.shape[0], (i + 1) * rows)

    # ------------------------------------------------------------------ reading
    def _read_index(self) -> np.ndarray:
        if self._index is not None:
            return self._index
        n = self.n_inner * 16 + (4 if self.index_crc else 0)
        try:
            size = self.file.stat().st_size
        except FileNotFoundError:
            raise ChunkError(f"{self.where}: data file {self.file.relative_to(self.path.parent)} is missing "
                             "(deleted?); refusing to read it as zeros") from None
        if size == 0:
            raise ChunkError(f"{self.where}: data file {self.file.relative_to(self.path.parent)} is empty")
        if size < n:
            raise ChunkError(f"{self.where}: data file is {size} bytes, shorter than its {n}-byte index (truncated)")
        with open(self.file, "rb") as f:
            f.seek(size - n)
            raw = f.read(n)
        if self.index_crc and _crc32c(raw) != CRC32C_RESIDUE:
            raise ChunkError(f"{self.where}: the chunk index fails its crc32c (file edited or truncated)")
        idx = np.frombuffer(raw[:self.n_inner * 16], dtype="<u8").reshape(self.n_inner, 2)
        body = size - n
        for i in range(self.n_chunks):
            off, nb = int(idx[i, 0]), int(idx[i, 1])
            if off == EMPTY and nb == EMPTY:
                continue  # judged when read (an old cache may omit an all-zero loss_mask chunk)
            if off + nb > body:
                raise ChunkError(f"{self.where}: chunk {i} points past the end of the data (file truncated)")
        self._index = idx
        return idx

    def chunk(self, i: int, *, allow_empty: Optional[bool] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Inner chunk i, decoded: [chunk_rows, *row_shape] (the last one padded as stored).

        `out`: a C-contiguous array of that shape and dtype to decode into (reused buffers
        spare the page faults of fresh memory)."""
        if not self.fast:
            a, b = self.chunk_span(i)
            return self._zarr_rows(a, b)
        idx = self._read_index()
        off, nb = int(idx[i, 0]), int(idx[i, 1])
        a, b = self.chunk_span(i)
        where = f"{self.where}: chunk {i} (rows {a}..{b})"
        if off == EMPTY and nb == EMPTY:
            if not (self.allow_empty if allow_empty is None else allow_empty):
                raise ChunkError(f"{where}: never written (empty index entry); refusing to read it as zeros")
            return np.zeros((self.chunk_rows, *self.row_shape), dtype=self.dtype)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            buf = os.pread(fd, nb, off)
        finally:
            os.close(fd)
        if len(buf) != nb:
            raise ChunkError(f"{where}: short read ({len(buf)} of {nb} bytes)")
        if out is not None and (out.shape != (self.chunk_rows, *self.row_shape) or out.dtype != self.dtype
                                or not out.flags.c_contiguous):
            out = None
        raw = self.decoder.decode(buf, self.chunk_rows * self.row_bytes, where, out)
        return raw.view(self.dtype).reshape(self.chunk_rows, *self.row_shape)

    def rows(self, start: int, stop: int, *, allow_empty: Optional[bool] = None) -> np.ndarray:
        """Rows start..stop (a fresh array), decoding every inner chunk they touch once."""
        stop = min(stop, self.shape[0])
        if stop <= start:
            return np.zeros((0, *self.row_shape), dtype=self.dtype)
        if not self.fast:
            return self._zarr_rows(start, stop)
        c0, c1 = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        for c in range(c0, c1 + 1):
            a, b = max(start, c * self.chunk_rows), min(stop, (c + 1) * self.chunk_rows)
            out[a - start:b - start] = self._cached_chunk(c, allow_empty)[a - c * self.chunk_rows:b - c * self.chunk_rows]
        return out

    def _cached_chunk(self, i: int, allow_empty: Optional[bool]) -> np.ndarray:
        """chunk(i) through a small process-wide LRU: sample-by-sample reads of one chunk decode it once."""
        key = (str(self.file), i)
        with _LRU_LOCK:
            hit = _LRU.pop(key, None)
            if hit is not None:
                _LRU[key] = hit
                return hit
        c = self.chunk(i, allow_empty=allow_empty)
        with _LRU_LOCK:
            _LRU[key] = c
            while len(_LRU) > LRU_CHUNKS:
                _LRU.pop(next(iter(_LRU)))
        return c

    def __getitem__(self, key) -> np.ndarray:
        """a[...] / a[start:stop] on axis 0, like the zarr array it stands for."""
        if key is Ellipsis:
            return self.rows(0, self.shape[0])
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, stop)
        raise TypeError(f"{self.where}: only [...] and [start:stop] reads are supported")

    def _zarr_rows(self, start: int, stop: int) -> np.ndarray:
        import zarr

        if not any(self.path.joinpath("c").rglob("*")) and self.shape[0]:
            raise ChunkError(f"{self.where}: no data files (deleted?); refusing to read it as zeros")
        try:
            return np.asarray(zarr.open_array(str(self.path), mode="r")[start:stop])
        except Exception as e:  # noqa: BLE001 - zarr raises many types on corrupt data
            raise ChunkError(f"{self.where}: rows {start}..{stop} cannot be decoded ({type(e).__name__}: {e})") from None
