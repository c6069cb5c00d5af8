"""Write one shard array as a zarr v3 sharded array, chunks compressed by a thread pool.

The file layout is exactly zarr's (`sharding_indexed`, index at the end with its
crc32c, one file per array): zarr itself reads what this writes (tested). Doing the
encoding here rather than through zarr gives two things zarr's writer does not:
* every inner chunk is compressed and crc32c-checksummed in parallel threads
  (numcodecs releases the GIL while compressing), so one shard's flush uses
  `extract.writer_threads` cores;
* every inner chunk is written, an all-zero one included, so that a chunk missing from
  the index always means damage (zarr skips chunks equal to fill_value by default).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eagle3-compress")
    return _POOLS[threads]


def hash_pool() -> ThreadPoolExecutor:
    """One thread for the whole-array sha256 of shard.json, next to the compression threads."""
    if -1 not in _POOLS:
        _POOLS[-1] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle3-sha256")
    return _POOLS[-1]


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


def array_json(a: np.ndarray, chunk_rows: int, n_chunks: int, codec_json: list[dict], attributes: dict) -> dict:
    rest = [int(s) for s in a.shape[1:]]
    return {
        "shape": [int(s) for s in a.shape], "data_type": str(a.dtype),
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


def write_array(path: Path, a: np.ndarray, *, chunk_rows: int, compressor: str, attributes: dict,
                threads: int = 1) -> int:
    """Write array `a` (rows on axis 0) under `path`; returns the bytes written."""
    if a.dtype.byteorder == ">":
        raise ValueError(f"{path}: big-endian arrays are not stored")
    path.mkdir(parents=True, exist_ok=True)
    T = a.shape[0]
    n = -(-T // chunk_rows) if T else 0
    codec, codec_json = _codec(compressor, a.dtype.itemsize)
    (path / "zarr.json").write_text(json.dumps(array_json(a, chunk_rows, n, codec_json, attributes), indent=2))
    if n == 0:
        return 0

    def block(i: int) -> bytes:
        c = a[i * chunk_rows:(i + 1) * chunk_rows]
        if c.shape[0] < chunk_rows:  # zarr stores the last inner chunk full size, padded with fill_value
            pad = np.zeros((chunk_rows, *a.shape[1:]), dtype=a.dtype)
            pad[:c.shape[0]] = c
            c = pad
        return encode_chunk(c, codec)

    blobs = list(_pool(threads).map(block, range(n))) if threads > 1 and n > 1 else [block(i) for i in range(n)]
    index = np.empty((n, 2), dtype="<u8")
    off = 0
    for i, b in enumerate(blobs):
        index[i] = (off, len(b))
        off += len(b)
    ib = index.tobytes()
    f = path.joinpath("c", *(["0"] * a.ndim))
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "wb") as fh:
        for b in blobs:
            fh.write(b)
        fh.write(ib + _crc(ib))
    return off + len(ib) + 4
