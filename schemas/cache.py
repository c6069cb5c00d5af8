"""The feature cache: layout, shard writing primitives and the reader (DESIGN.md section 4).

Stage 1 writes caches with `write_shard`; stages 2 and 3 read them with
`CacheReader`. Both live here because the layout is the contract between stages:
no stage imports another to read or write a cache.

bf16 hidden states are stored as their raw uint16 bits (zarr has no bfloat16);
the logical dtype is recorded in each array's attributes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

SCHEMA_ID = "eagle3-cache/1"
SHARD_SCHEMA_ID = "eagle3-shard/1"
CACHE_JSON = "cache.json"
SHARD_JSON = "shard.json"
MANIFEST = "manifest.parquet"
TARGET_DIR = "target"
EMBED_FILE = "embed_tokens.safetensors"
# The target's output head: lm_head rows [V, H] with the logit scaling folded in, and the final
# norm's effective weight [H]; stage 2 starts the head's lm_head and norm from them (train.lm_head_init).
LM_HEAD_FILE = "lm_head.safetensors"
# The target's last decoder layer in Llama names (attention and MLP weights, the norms' effective
# weights); stage 2 can start the head's decoder layer from it (train.layer_init).
LAYER_FILE = "last_layer.safetensors"

# name -> (stored numpy dtype, logical dtype, trailing shape key)
ARRAYS: dict[str, tuple[str, str]] = {
    "input_ids": ("int32", "int32"),
    "loss_mask": ("uint8", "uint8"),
    "hidden": ("uint16", "bfloat16"),
    "topk_ids": ("int32", "int32"),
    "topk_logprobs": ("float16", "float16"),
    "offsets": ("int64", "int64"),
    "sample_index": ("int64", "int64"),
    "token_counts": ("int64", "int64"),
}
ROW_ARRAYS = ("input_ids", "loss_mask", "hidden", "topk_ids", "topk_logprobs")
# extract.hidden_dtype fp8: hidden as float8 e4m3 bits + one fp16 scale per token per layer (schemas.fp8)
HIDDEN_DTYPES = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
FP8_ARRAYS: dict[str, tuple[str, str]] = {**ARRAYS, "hidden": ("uint8", "float8_e4m3fn"),
                                          "hidden_scale": ("float16", "float16")}


def layout(hidden_dtype: str = "bfloat16") -> dict[str, tuple[str, str]]:
    """Stored arrays of a shard for cache.json's hidden_dtype ("bfloat16" or "float8_e4m3fn")."""
    if hidden_dtype in ("bfloat16", "bf16", None):
        return ARRAYS
    if hidden_dtype in ("float8_e4m3fn", "fp8"):
        return FP8_ARRAYS
    raise CacheError(f"hidden_dtype {hidden_dtype!r} is not one of {sorted(HIDDEN_DTYPES.values())}")


def stored_row_arrays(hidden_dtype: str = "bfloat16") -> tuple[str, ...]:
    return tuple(n for n in layout(hidden_dtype) if n in ROW_ARRAYS or n == "hidden_scale")


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or not what the caller expects."""


class ShardCommitted(CacheError):
    """The shard was committed (by another process) while this one was writing it."""


LOCKS_DIR = ".locks"  # cache: held briefly around cache.json, target/, commits, the manifest; claim-r-of-W


def cache_lock(root: str | Path, what: str = "writing the cache"):
    """The cache-level lock (a context manager that waits for the holder)."""
    from schemas.locks import DirLock

    return DirLock(Path(root) / LOCKS_DIR / "cache", what)


def worker_claim(root: str | Path, rank: int, world: int):
    """The claim of extraction worker rank/world on a cache, held for the whole run.

    Acquire with `.acquire()`: a second process with the same worker id fails with
    a LockBusy naming the first (they would write the same shards).
    """
    from schemas.locks import DirLock

    return DirLock(Path(root) / LOCKS_DIR / f"claim-{rank}-of-{world}", f"extract worker {rank}/{world}")


TMP_PREFIX = ".tmp-"


def temp_shard_path(root: str | Path, k: int) -> Path:
    """A temporary shard directory name that no other process uses and that names its owner."""
    from schemas.locks import Owner

    return shards_dir(root) / f"{TMP_PREFIX}{k:05d}-{Owner.me().token()}.zarr"


def remove_dead_temp_dirs(root: str | Path, k: Optional[int] = None) -> list[Path]:
    """Remove temporary shard dirs (of shard k, or all) whose owner is gone: a dead process on
    this host, or on another host one whose owner lock is free or whose lease has expired
    (schemas.leftovers). A live owner's dir is never touched. Returns what was removed."""
    from schemas.leftovers import reclaim

    return reclaim(root, k)


def shard_name(k: int) -> str:
    return f"{k:05d}.zarr"


def shards_dir(root: str | Path) -> Path:
    return Path(root) / "shards"


def is_committed(shard_path: Path) -> bool:
    """A shard counts only once renamed into place with its shard.json (written last)."""
    return shard_path.is_dir() and not shard_path.name.startswith(".") and (shard_path / SHARD_JSON).is_file()


def committed_shards(root: str | Path) -> list[int]:
    d = shards_dir(root)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.suffix == ".zarr" and p.stem.isdigit() and is_committed(p):
            out.append(int(p.stem))
    return sorted(out)


# --------------------------------------------------------------------------- dtypes


def bf16_to_bits(t) -> np.ndarray:
    """torch bfloat16 tensor -> numpy uint16 holding the same bits (lossless)."""
    import torch

    return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def bits_to_bf16(a: np.ndarray):
    """numpy uint16 bits -> torch bfloat16 tensor (shares no memory with `a`)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)


def array_checksum(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def make_compressor(name: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    if name == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    raise ValueError(f"unknown compressor '{name}' (none, zstd, blosc-zstd, lz4)")


def write_shard(cache_root: str | Path, k: int, arrays: dict[str, np.ndarray], *,
                compressor: str = "zstd", chunk_rows: int = 2048, extra: Optional[dict] = None,
                hidden_dtype: str = "bfloat16", threads: int = 1) -> dict:
    """Write shard k atomically: temp dir -> arrays -> shard.json (last) -> rename.

    `arrays` holds every name of `layout(hidden_dtype)` with the stored dtype (hidden as
    uint16 bf16 bits, or uint8 e4m3 bits + hidden_scale). Inner chunks are compressed
    and checksummed by `threads` threads (schemas.cache_write; stage 1 streams rows into a
    `ShardStream` instead of handing whole arrays over). Returns the shard.json content.
    A shard already committed is an error: callers skip.
    """
    from schemas.cache_write import ShardStream

    names = layout(hidden_dtype)
    missing = set(names) - set(arrays)
    if missing:
        raise CacheError(f"write_shard: arrays missing: {sorted(missing)}")
    for name, (stored, _logical) in names.items():
        if np.asarray(arrays[name]).dtype != np.dtype(stored):
            raise CacheError(f"write_shard: '{name}' has dtype {np.asarray(arrays[name]).dtype}, "
                             f"the layout stores {stored}")
    rows = stored_row_arrays(hidden_dtype)
    s = ShardStream(cache_root, k, {n: np.shape(arrays[n]) for n in rows}, hidden_dtype=hidden_dtype,
                    chunk_rows=chunk_rows, compressor=compressor, threads=threads)
    try:
        for n in rows:
            s.append(n, np.ascontiguousarray(arrays[n]))
        return s.finish(arrays["offsets"], arrays["sample_index"], arrays["token_counts"],
                        loss_tokens=int(np.asarray(arrays["loss_mask"]).sum()), extra=extra)
    except BaseException:
        s.abort()
        raise


def remove_own_temp_dir(root: str | Path, k: int) -> None:
    """After a failed write_shard (e.g. a full disk): this process's temp dir of shard k goes."""
    shutil.rmtree(temp_shard_path(root, k), ignore_errors=True)


def _commit_shard(root: str | Path, tmp: Path, final: Path) -> None:
    """Rename tmp into place under the cache lock; a committed shard is never replaced.

    Under the lock, nobody else commits, so checking and renaming cannot interleave
    with another writer; os.rename of a directory also refuses a non-empty target,
    which keeps a committed shard safe even from a writer that ignores the lock.
    """
    with cache_lock(root, f"committing {final.name}"):
        if is_committed(final):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ShardCommitted(f"shard {final} was committed by another process meanwhile")
        if final.exists():  # an uncommitted leftover (no shard.json) of a killed run: move it aside first
            trash = final.parent / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError as e:
            raise CacheError(f"cannot commit {tmp.name} as {final}: {e.strerror}") from None


def dir_bytes(path: Path) -> int:
    """Bytes of the files under path; symlinks are counted as links, never followed."""
    if os.path.islink(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _dirs, files in os.walk(path) for f in files)


def build_manifest(cache_root: str | Path) -> Path:
    """manifest.parquet: one row per committed shard, rebuilt from the shard.json files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(cache_root)
    with cache_lock(root, "writing the manifest"):  # the shards listed are the shards committed
        return _write_manifest(root, pa, pq)


def _write_manifest(root: Path, pa, pq) -> Path:
    rows = []
    for k in committed_shards(root):
        p = shards_dir(root) / shard_name(k)
        info = json.loads((p / SHARD_JSON).read_text())
        rows.append({"shard": k, "path": f"shards/{shard_name(k)}", "samples": info["samples"],
                     "tokens": info["tokens"], "loss_tokens": info["loss_tokens"],
                     "raw_bytes": info["raw_bytes"], "disk_bytes": dir_bytes(p)})
    schema = pa.schema([("shard", pa.int64()), ("path", pa.string()), ("samples", pa.int64()),
                        ("tokens", pa.int64()), ("loss_tokens", pa.int64()), ("raw_bytes", pa.int64()),
                        ("disk_bytes", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    out = root / MANIFEST
    tmp = root / f"{MANIFEST}.tmp{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- reading


@dataclass
class SampleRef:
    shard: int
    local: int
    start: int
    length: int
    sample_index: int


class ShardReader:
    """One committed shard, read chunk by chunk with integrity checks (schemas.cache_read).

    Opening checks shard.json and every array's zarr.json against each other and against
    cache.json's hidden_dtype (dtypes, row counts, offsets); reads decode whole inner
    chunks, each verified by its crc32c when the cache has them. Every failure is a
    CacheError naming the shard, the array and what is wrong. Picklable.
    """

    def __init__(self, path: Path, hidden_dtype: str = "bfloat16", dims: Optional[dict] = None):
        """`dims`: cache.json's hidden_size / topk / vocab_size, when known: every array's shape is then
        checked in full (trailing dimensions too) before anything is allocated from it."""
        from schemas.cache_read import ChunkedArray, warn_once

        self.path = Path(path)
        try:
            self.info = json.loads((self.path / SHARD_JSON).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"{self.path}: {SHARD_JSON} is unreadable ({e})") from None
        if not isinstance(self.info, dict):
            raise CacheError(f"{self.path}/{SHARD_JSON}: not a JSON object")
        self.hidden_dtype = hidden_dtype
        self.layout = layout(hidden_dtype)
        shapes = self._expected_shapes(dims or {})
        self._arrays: dict[str, ChunkedArray] = {n: ChunkedArray(self.path, n, shapes.get(n)) for n in self.layout}
        self._small: dict[str, np.ndarray] = {}
        self._check_metadata()
        if not all(self._arrays[n].chunk_crc for n in stored_row_arrays(hidden_dtype)):
            warn_once(f"nocrc:{self.path.parent}", f"{self.path.parent}: shards without per-chunk checksums "
                      "(written before they existed): a changed byte in a chunk is caught only by "
                      "`eagle3 shards verify`; missing or empty chunks are still refused")

    def _expected_shapes(self, dims: dict) -> dict[str, tuple]:
        """Each array's shape from shard.json's counts and cache.json's dims (None: not known here)."""
        info, where = self.info, str(self.path)
        for key in ("samples", "tokens"):
            if not isinstance(info.get(key), int) or isinstance(info.get(key), bool) or info[key] < 0:
                raise CacheError(f"{where}/{SHARD_JSON}: '{key}' is {info.get(key)!r}, not a count")
        T, N = info["tokens"], info["samples"]
        H, K, V = dims.get("hidden_size"), dims.get("topk"), dims.get("vocab_size")
        return {"input_ids": (T,), "loss_mask": (T,), "hidden": (T, 3, H), "topk_ids": (T, K),
                "topk_logprobs": (T, K), "offsets": (N + 1,), "sample_index": (N,), "token_counts": (V,),
                "hidden_scale": (T, 3)}

    def _check_metadata(self) -> None:
        """dtype / shape of each array vs the layout and shard.json; offsets vs samples / tokens."""
        info, where = self.info, str(self.path)
        T, N = info["tokens"], info["samples"]
        rows = {n: T for n in stored_row_arrays(self.hidden_dtype)}
        rows.update(offsets=N + 1, sample_index=N)
        for name, (stored, _logical) in self.layout.items():
            arr = self._arrays[name]
            if arr.dtype != np.dtype(stored):
                raise CacheError(f"{where}: array '{name}' has dtype {arr.dtype}, the cache stores {stored} "
                                 f"(hidden_dtype {self.hidden_dtype})")
            if name in rows and (not arr.shape or arr.shape[0] != rows[name]):
                raise CacheError(f"{where}: array '{name}' has {arr.shape[0] if arr.shape else '?'} rows but "
                                 f"{SHARD_JSON} says {rows[name]} ({'samples + 1' if name == 'offsets' else 'samples' if name == 'sample_index' else 'tokens'})")
        o = self.small("offsets")
        if o.size and (o[0] != 0 or o[-1] != T or (np.diff(o) < 0).any()):
            raise CacheError(f"{where}: array 'offsets' is not a non-decreasing 0..{T} sequence "
                             f"({SHARD_JSON} says {T} tokens)")

    def array(self, name: str):
        """The ChunkedArray of `name` (rows(a, b), chunk(i), shape, dtype)."""
        if name not in self._arrays:
            raise CacheError(f"{self.path}: no array '{name}' in a {self.hidden_dtype} shard")
        return self._arrays[name]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows of one array (CacheError on any integrity failure)."""
        return self.array(name).rows(start, stop)

    def small(self, name: str) -> np.ndarray:
        """offsets / sample_index / token_counts, read once."""
        if name not in self._small:
            arr = self.array(name)
            self._small[name] = self.read(name, 0, arr.shape[0]) if arr.shape else np.zeros(0)
        return self._small[name]

    @property
    def offsets(self) -> np.ndarray:
        return self.small("offsets")

    @property
    def num_samples(self) -> int:
        return int(self.info["samples"])

    def rows(self, start: int, stop: int, fields: Iterable[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Logical rows: 'hidden' is always bf16 bits (uint16), dequantised from fp8 when stored so."""
        out = {}
        for f in fields:
            if f == "hidden" and self.layout is FP8_ARRAYS:
                from schemas.fp8 import dequantize_to_bf16_bits

                out[f] = dequantize_to_bf16_bits(self.read("hidden", start, stop),
                                                 self.read("hidden_scale", start, stop))
            else:
                out[f] = self.read(f, start, stop)
        return out

    def sample(self, local: int, fields: Iterable[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        o = self.offsets
        return self.rows(int(o[local]), int(o[local + 1]), fields)


def read_cache_json(root: str | Path) -> dict:
    """cache.json of a cache directory, checked for presence, JSON and schema id."""
    root = Path(root)
    cj = root / CACHE_JSON
    if not root.is_dir():
        raise CacheError(f"cache not found: {root} (run `eagle3 extract` first)")
    if not cj.is_file():
        raise CacheError(f"{root} is not an eagle3 cache: {CACHE_JSON} is missing")
    try:
        meta = json.loads(cj.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{cj}: not valid JSON ({e})") from None
    if isinstance(meta, dict) and meta.get("schema") != SCHEMA_ID:
        raise CacheError(f"{cj}: schema {meta.get('schema')!r} is not {SCHEMA_ID!r}")
    from schemas.cache_check import cache_json_problems

    problems = cache_json_problems(meta)  # every reader relies on these fields: checked before any is used
    if problems:
        raise CacheError(f"{cj}: " + "; ".join(problems) + " (an edited or damaged cache.json)")
    return meta


class CacheReader:
    """Read-only view of a cache; checks cache.json before anything else.

    `expect` holds values the caller relies on (e.g. {"hidden_size": 576,
    "layers": [2, 15, 27]}); any difference is a CacheError naming the field.
    """

    def __init__(self, root: str | Path, expect: Optional[dict] = None):
        self.root = Path(root)
        self.meta: dict = read_cache_json(self.root)
        cj = self.root / CACHE_JSON
        for key, want in (expect or {}).items():
            have = self.field(key)
            if have != want:
                raise CacheError(f"{cj}: {key} is {have!r} but {want!r} was expected")
        from schemas.cache_check import check_cache

        check_cache(self.root, self.meta)  # exactly shards 0..num_shards-1, names, duplicates, target/
        self.shard_ids = committed_shards(self.root)
        if not self.shard_ids:
            raise CacheError(f"cache {self.root} has no committed shards")
        self.hidden_dtype = str(self.meta.get("hidden_dtype", "bfloat16"))
        try:
            layout(self.hidden_dtype)
        except CacheError as e:
            raise CacheError(f"{cj}: {e}") from None
        dims = {"hidden_size": self.hidden_size, "topk": self.topk, "vocab_size": self.vocab_size}
        self.shards = {k: ShardReader(shards_dir(self.root) / shard_name(k), self.hidden_dtype, dims)
                       for k in self.shard_ids}
        self.refs: list[SampleRef] = []
        for k in self.shard_ids:
            sh = self.shards[k]
            o, si = sh.offsets, sh.small("sample_index")
            for j in range(sh.num_samples):
                self.refs.append(SampleRef(k, j, int(o[j]), int(o[j + 1] - o[j]), int(si[j])))

    def field(self, key: str) -> Any:
        """cache.json fields; target fields are reachable by their bare name too."""
        if key in self.meta:
            return self.meta[key]
        return self.meta.get("target", {}).get(key)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["target"]["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["target"]["vocab_size"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def topk(self) -> int:
        return int(self.meta["topk"])

    def __len__(self) -> int:
        return len(self.refs)

    def lengths(self) -> np.ndarray:
        return np.array([r.length for r in self.refs], dtype=np.int64)

    def sample(self, i: int, fields: Iterable[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        r = self.refs[i]
        return self.shards[r.shard].sample(r.local, fields)

    def token_counts(self) -> np.ndarray:
        total = np.zeros(self.vocab_size, dtype=np.int64)
        for sh in self.shards.values():
            total += sh.small("token_counts")
        return total

    def target_dir(self) -> Path:
        return self.root / TARGET_DIR

    def target_config(self) -> dict:
        return json.loads((self.target_dir() / "config.json").read_text())

    def load_embedding(self):
        """The target's frozen input embedding [V, H] (torch)."""
        from safetensors.torch import load_file

        p = self.target_dir() / EMBED_FILE
        if not p.is_file():
            raise CacheError(f"{p} is missing: the cache cannot train a head without it")
        return load_file(str(p))["weight"]

    def load_lm_head(self) -> Optional[dict]:
        """{"weight": [V, H], "norm": [H]} of the target's output head (stage 1's LM_HEAD_FILE), None for
        a cache written before stage 1 kept it."""
        from safetensors.torch import load_file

        p = self.target_dir() / LM_HEAD_FILE
        return load_file(str(p)) if p.is_file() else None

    def load_last_layer(self) -> Optional[dict]:
        """The target's last decoder layer (stage 1's LAYER_FILE), None for a cache written before stage 1
        kept it or a target whose layer does not have the Llama layout."""
        from safetensors.torch import load_file

        p = self.target_dir() / LAYER_FILE
        return load_file(str(p)) if p.is_file() else None


# --------------------------------------------------------------------------- verification


def _nonfinite_problem(name: str, a: np.ndarray, fmt: str, row0: int, layers: Optional[list]) -> Optional[str]:
    """'name: N non-finite values (first at row r, layer l, ...)' for a block of stored bits, None when finite."""
    from schemas.finite import has_nonfinite, nonfinite_report

    if not has_nonfinite(a, fmt):
        return None
    what = {"hidden": "hidden states", "hidden_scale": "fp8 scales", "topk_logprobs": "top-K log-probs"}.get(name, name)
    slots = layers if name in ("hidden", "hidden_scale") else None
    if name == "hidden_scale":  # [rows, 3]: the layer is the last axis
        m = ~np.isfinite(a)
        r, j = (int(x) for x in np.argwhere(m)[0])
        lid = slots[j] if slots else j
        return f"{name}: non-finite {what}: {int(m.sum())} (first at row {row0 + r}, layer {lid})"
    return f"{name}: non-finite {what}: {nonfinite_report(a, fmt, row0, slots)}"


def _inner_rows(array_dir: Path) -> int:
    """Rows per inner chunk of a sharded array (from its zarr.json)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    return max(1, int(meta["codecs"][0]["configuration"]["chunk_shape"][0]))


def verify_shard(shard_path: str | Path, *, hidden_size: Optional[int] = None, topk: Optional[int] = None,
                 vocab_size: Optional[int] = None, hidden_dtype: str = "bfloat16",
                 layers: Optional[list] = None) -> list[str]:
    """Re-read every array of a committed shard; return its problems ('array: what'), [] when sound.

    Checks the shard.json schema, each array's dtype and shape against the counts in
    shard.json (and cache.json's H / K / V when given) before decoding anything, that it
    decodes, that hidden states, fp8 scales and top-K log-probs are finite (naming the
    row and the layer id of the first inf/NaN), and its sha256 against the checksum
    recorded at write time. Nothing is read through a symlink out of the cache.
    """
    import zarr

    from schemas.cache_check import outside_links
    from schemas.cache_read import check_array_meta, finite_format

    p = Path(shard_path)
    links = outside_links(p.parent.parent, p)
    if links:
        return [f"{x}: resolves outside the cache; not read" for x in links]
    try:
        info = json.loads((p / SHARD_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{SHARD_JSON}: unreadable ({e})"]
    if not isinstance(info, dict):
        return [f"{SHARD_JSON}: not a JSON object"]
    problems = []
    if info.get("schema") != SHARD_SCHEMA_ID:
        problems.append(f"{SHARD_JSON}: schema {info.get('schema')!r} is not {SHARD_SCHEMA_ID!r}")
    T, N = info.get("tokens"), info.get("samples")
    H = hidden_size if hidden_size is not None else info.get("hidden_size")
    K = topk if topk is not None else info.get("topk")
    expect = {"input_ids": (T,), "loss_mask": (T,), "hidden": (T, 3, H), "topk_ids": (T, K),
              "topk_logprobs": (T, K), "offsets": (None if N is None else N + 1,), "sample_index": (N,),
              "token_counts": (vocab_size,), "hidden_scale": (T, 3)}
    sums = info.get("checksums", {})
    data: dict[str, np.ndarray] = {}
    for name, (stored, _logical) in layout(hidden_dtype).items():
        try:  # sizes first: nothing is allocated for a shape or chunk the counts do not allow
            check_array_meta(json.loads((p / name / "zarr.json").read_text()), name,
                             tuple(None if not isinstance(w, int) else w for w in expect[name]))
            arr = zarr.open_array(str(p / name), mode="r")
        except Exception as e:  # noqa: BLE001 - zarr raises many types for broken metadata
            problems.append(str(e) if isinstance(e, CacheError) else f"{name}: cannot open ({type(e).__name__}: {e})")
            continue
        if arr.dtype != np.dtype(stored):
            problems.append(f"{name}: dtype {arr.dtype}, expected {stored}")
            continue
        # stream in row blocks: a shard of a large target holds tens of GB of hidden states
        h = hashlib.sha256()
        h.update(str(np.dtype(arr.dtype)).encode() + str(tuple(arr.shape)).encode())
        by_chunk = info.get("checksum_kind") is not None  # the sha256 of each inner chunk (cache_write)
        fmt, nonfinite = finite_format(name, arr.dtype), None
        try:
            block = _inner_rows(p / name) if by_chunk else \
                max(1, (64 << 20) // max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize))
            for s in range(0, arr.shape[0], block):
                a = np.ascontiguousarray(arr[s:s + block])
                h.update(hashlib.sha256(a.data).digest() if by_chunk else a.data)
                if fmt and nonfinite is None:
                    nonfinite = _nonfinite_problem(name, a, fmt, s, layers)
        except Exception as e:  # noqa: BLE001 - a corrupt chunk fails in the codec
            problems.append(f"{name}: cannot decode ({type(e).__name__}: {e})")
            continue
        if nonfinite:
            problems.append(nonfinite)
        if name not in sums:
            problems.append(f"{name}: no checksum in {SHARD_JSON}")
        elif h.hexdigest() != sums[name]:
            problems.append(f"{name}: checksum mismatch (data changed since it was written)")
        if name == "offsets":
            data[name] = np.asarray(arr[...])
    o = data.get("offsets")
    if o is not None and o.size:
        if o[0] != 0 or (T is not None and o[-1] != T) or (np.diff(o) < 0).any():
            problems.append(f"offsets: not a 0..{T} non-decreasing sequence")
    return problems
