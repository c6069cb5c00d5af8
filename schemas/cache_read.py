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

Trust (DESIGN.md section 9):
* sizes: a zarr.json's shape and chunk shapes are checked (`check_array_meta`) before
  anything is allocated from them: no chunk larger than its array, no array beyond the
  counts the caller expects (a 25 KB file declaring 2 million rows is refused);
* symlinks: an array whose directory or data file resolves outside the cache is refused
  (EAGLE3_FOLLOW_SYMLINKS=1 follows such links, for caches assembled from several disks);
* non-finite values: every decoded chunk of `hidden` (bf16 or e4m3 bits), `hidden_scale`
  and `topk_logprobs` is checked for inf/NaN (schemas.finite: two max-reductions over the
  bits), once per chunk and process, and refused with the shard, array, row and layer.
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


CHECK_FINITE = True  # bench/nonfinite_cost.py turns it off to measure what it costs
_FINITE_OK: set = set()  # chunks already found finite: (file, inode, mtime, chunk, offset, nbytes)
_FINITE_LOCK = threading.Lock()


def finite_format(name: str, dtype: np.dtype) -> Optional[str]:
    """How the stored bits of an array encode floats (schemas.finite.FORMATS), None for integers."""
    if name == "hidden":
        return {np.dtype(np.uint16): "bf16", np.dtype(np.uint8): "e4m3"}.get(np.dtype(dtype))
    return "fp16" if np.dtype(dtype) == np.float16 else None


def _int_list(v, what: str, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ChunkError(f"{where}: zarr.json {what} is {v!r}, not a list of non-negative integers")
    return v


def check_array_meta(meta, where: str, expect_shape: Optional[tuple] = None) -> tuple[int, ...]:
    """An array's zarr.json, before anything is allocated from it: shape (against `expect_shape`, None =
    any), and every chunk no larger than the array (outer chunks may round its rows up once). Returns the shape."""
    if not isinstance(meta, dict):
        raise ChunkError(f"{where}: zarr.json is not a JSON object")
    shape = tuple(_int_list(meta.get("shape"), "shape", where))
    if expect_shape is not None and (len(shape) != len(expect_shape)
                                     or any(w is not None and s != w for s, w in zip(shape, expect_shape))):
        raise ChunkError(f"{where}: shape {shape} in zarr.json, expected {tuple(expect_shape)} "
                         "(shard.json counts, cache.json H/K/V)")
    grid = (meta.get("chunk_grid") or {}).get("configuration", {}) if isinstance(meta.get("chunk_grid"), dict) else {}
    chunks = [("chunk_grid chunk_shape", grid.get("chunk_shape"))]
    for c in meta.get("codecs") or []:
        if isinstance(c, dict) and c.get("name") == "sharding_indexed":
            chunks.append(("inner chunk_shape", (c.get("configuration") or {}).get("chunk_shape")))
    for what, cs in chunks:
        if cs is None:
            continue
        cs = _int_list(cs, what, where)
        if len(cs) != len(shape):
            raise ChunkError(f"{where}: zarr.json {what} {cs} does not match the shape {shape}")
        limit = [2 * max(1, shape[0]) if what.startswith("chunk_grid") else max(1, shape[0]),
                 *(max(1, x) for x in shape[1:])]
        if any(c > lim or c == 0 for c, lim in zip(cs, limit)):
            raise ChunkError(f"{where}: zarr.json declares chunks of {cs} ({what}) for an array of shape {shape}; "
                             f"refusing to allocate for it (edited or corrupt metadata)")
    return shape


def check_inside(path: Path, root: Optional[Path], where: str) -> None:
    """Refuse a path that resolves outside the cache root (a symlink out of it), unless EAGLE3_FOLLOW_SYMLINKS=1."""
    if root is None or os.environ.get("EAGLE3_FOLLOW_SYMLINKS") == "1":
        return
    real, base = os.path.realpath(path), os.path.realpath(root)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise ChunkError(f"{where}: {path} resolves to {real}, outside the cache {root}; refusing to read it "
                         f"(set EAGLE3_FOLLOW_SYMLINKS=1 to follow links out of the cache)")


class ChunkedArray:
    """One array of a shard; `rows(a, b)` and `chunk(i)` decode whole inner chunks, each checked.

    Picklable (re-opens lazily in DataLoader workers). Thread-safe: reads use pread.
    """

    def __init__(self, shard_path: Path, name: str, expect_shape: Optional[tuple] = None):
        self.path = Path(shard_path) / name
        self.shard = Path(shard_path).name
        self.name = name
        self.where = f"{shard_path}: array '{name}'"
        self.root = Path(shard_path).parent.parent  # CACHE/shards/NNNNN.zarr
        check_inside(self.path, self.root, self.where)
        try:
            meta = json.loads((self.path / "zarr.json").read_text())
        except FileNotFoundError:
            raise ChunkError(f"{self.where}: zarr.json is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChunkError(f"{self.where}: zarr.json is unreadable ({e})") from None
        self.shape = check_array_meta(meta, self.where, expect_shape)
        try:
            self.dtype = np.dtype(meta["data_type"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChunkError(f"{self.where}: zarr.json has no valid data_type ({e})") from None
        self.finite_fmt = finite_format(name, self.dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fast = True
        try:
            self._parse_layout(meta)
        except _Unsupported as e:
            self.fast = False
            warn_once(f"layout:{e}", f"{e}: not the layout this reader decodes directly; reading through zarr")
        self._index: Optional[np.ndarray] = None
        self._file_id: Optional[tuple] = None
        # zarr skipped chunks equal to fill_value before every chunk was written (caches without
        # chunk checksums): there an absent all-zero loss_mask chunk is legitimate; nothing else is
        self.allow_empty = name == "loss_mask" and not self.chunk_crc

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_index"] = None
        d["_file_id"] = None
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
        check_inside(self.file, self.root, self.where)

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
        st = self.file.stat()
        self._file_id = (str(self.file), st.st_ino, st.st_mtime_ns)
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
        chunk = raw.view(self.dtype).reshape(self.chunk_rows, *self.row_shape)
        self._check_finite(chunk[:b - a], (self._file_id, i, off, nb), a, where)
        return chunk

    def _check_finite(self, rows: np.ndarray, key, row0: int, where: str) -> None:
        """Refuse inf/NaN in the rows of a float array; a chunk found finite is not checked again."""
        if self.finite_fmt is None or not CHECK_FINITE:
            return
        if key is not None:
            with _FINITE_LOCK:
                if key in _FINITE_OK:
                    return
        from schemas.finite import has_nonfinite, nonfinite_report

        if has_nonfinite(rows, self.finite_fmt):
            raise ChunkError(f"{where}: {nonfinite_report(rows, self.finite_fmt, row0)}; the cache holds inf/NaN "
                             f"(a target that overflowed?): `eagle3 shards verify` lists every such chunk")
        if key is not None:
            with _FINITE_LOCK:
                if len(_FINITE_OK) > 1 << 20:
                    _FINITE_OK.clear()
                _FINITE_OK.add(key)

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
        self._read_index()
        key = (self._file_id, i)  # a file replaced under the same name (a re-written shard) is another file
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

        check_inside(self.path / "c", self.root, self.where)
        files = [Path(d) / n for d, dirs, names in os.walk(self.path / "c") for n in [*dirs, *names]]
        for f in files:  # os.walk does not descend into symlinked directories; each link is checked here
            check_inside(f, self.root, self.where)
        if not files and self.shape[0]:
            raise ChunkError(f"{self.where}: no data files (deleted?); refusing to read it as zeros")
        try:
            rows = np.asarray(zarr.open_array(str(self.path), mode="r")[start:stop])
        except Exception as e:  # noqa: BLE001 - zarr raises many types on corrupt data
            raise ChunkError(f"{self.where}: rows {start}..{stop} cannot be decoded ({type(e).__name__}: {e})") from None
        self._check_finite(rows, None, start, f"{self.where}: rows {start}..{stop}")
        return rows
