"""Is a cache consistent enough to open? (DESIGN.md section 4: readers open only a consistent cache.)

Checked when a cache is opened (`CacheReader`) and by `eagle3 shards verify`, from
metadata and the small per-shard arrays only (the bulk arrays are not read here):

* the shard set: exactly 00000.zarr .. num_shards-1, each committed (shard.json
  present and readable), none beyond num_shards;
* each shard.json: schema id, `shard` equal to its directory name, samples
  per shard as cache.json's shard_starts (older caches: samples_per_shard and
  num_samples) imply, and
  hidden_size / topk / layers as cache.json says;
* each array's metadata: present, stored dtype, shape against the shard's counts
  and cache.json's H / K / V, hidden's logical dtype against cache.json;
* offsets and sample_index: offsets run 0..tokens, one sample_index per sample,
  no sample_index in two places;
* target/: config.json and the embedding present, and every file recorded in
  cache.json `target_files` with its sha256 (caches made before those were recorded
  are checked for presence only, with a note printed once).

`cache_problems` lists what is wrong ("shard 00003.zarr: ..."); `check_cache`
raises a CacheError with the list. `cache_json_problems` checks cache.json itself
(an object, with the fields every reader uses, of the right types and in sane
ranges) before anything else reads it. A shard directory, or any file in it, that
resolves outside the cache (a symlink) is a problem unless EAGLE3_FOLLOW_SYMLINKS=1.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from schemas.cache import (ARRAYS, EMBED_FILE, SHARD_JSON, SHARD_SCHEMA_ID, TARGET_DIR, CacheError, shard_name,
                           shards_dir)
from schemas.cache_read import check_array_meta

MAX_LISTED = 12  # problems spelled out in one error message
_NOTED: set[tuple[str, str]] = set()
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def note_once(root: Path, text: str) -> None:
    key = (str(Path(root).resolve()), text)
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"note: {root}: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cache.json itself

# generous sanity limits: a value beyond them is an edited or corrupt cache.json, not a model
LIMITS = {"hidden_size": 1 << 17, "vocab_size": 1 << 22, "num_hidden_layers": 1 << 12, "topk": 1 << 16,
          "samples_per_shard": 1 << 24, "max_length": 1 << 24, "num_shards": 1 << 24, "num_samples": 1 << 34}


def _count(v, key: str, positive: bool = True) -> Optional[str]:
    if not isinstance(v, int) or isinstance(v, bool) or v < (1 if positive else 0) or v > LIMITS[key]:
        return f"{key} is {v!r}, not {'a positive' if positive else 'a non-negative'} integer <= {LIMITS[key]}"
    return None


def cache_json_problems(meta) -> list[str]:
    """What makes cache.json unusable before any shard is looked at (empty when it is sound)."""
    if not isinstance(meta, dict):
        return [f"not a JSON object (a {type(meta).__name__})"]
    target = meta.get("target")
    if not isinstance(target, dict):
        return [f"target is {target!r}, not an object describing the target model"]
    out = [p for p in (_count(target.get(k), k) for k in ("hidden_size", "vocab_size", "num_hidden_layers")) if p]
    out += [p for p in (_count(meta.get("topk"), "topk"),) if p]
    for key in ("samples_per_shard", "max_length"):
        if key in meta and _count(meta[key], key):
            out.append(_count(meta[key], key))
    if "num_shards" in meta and _count(meta["num_shards"], "num_shards", positive=False):
        out.append(_count(meta["num_shards"], "num_shards", positive=False))
    data = meta.get("data", {})
    if not isinstance(data, dict):
        out.append(f"data is {data!r}, not an object")
    elif "num_samples" in data and _count(data["num_samples"], "num_samples", positive=False):
        out.append("data." + _count(data["num_samples"], "num_samples", positive=False))
    layers = meta.get("layers")
    if not (isinstance(layers, list) and len(layers) == 3
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        out.append(f"layers is {layers!r}, not a list of 3 layer ids")
    elif not out and max(layers) > target["num_hidden_layers"]:
        out.append(f"layers {layers} exceed the target's {target['num_hidden_layers']} layers")
    if not out and meta["topk"] > target["vocab_size"]:
        out.append(f"topk {meta['topk']} exceeds vocab_size {target['vocab_size']}")
    return out


# --------------------------------------------------------------------------- target/ files


def _sha256(p: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so that reopening a cache costs nothing."""
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def target_file_checksums(target_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under target/ (recorded in cache.json at write time)."""
    d = Path(target_dir)
    return {str(f.relative_to(d)): _sha256(f) for f in sorted(d.rglob("*")) if f.is_file()}


def _target_problems(root: Path, meta: dict) -> list[str]:
    d = root / TARGET_DIR
    recorded: Optional[dict] = meta.get("target_files")
    problems = []
    for name in ("config.json", EMBED_FILE):
        if not (d / name).is_file():
            problems.append(f"{TARGET_DIR}/{name}: missing")
    if recorded is None:
        note_once(root, "cache.json records no checksums of target/ files (a cache made before they were "
                        "recorded); they are checked for presence only")
        return problems
    for name, sha in sorted(recorded.items()):
        p = d / name
        if not p.is_file():
            if f"{TARGET_DIR}/{name}: missing" not in problems:
                problems.append(f"{TARGET_DIR}/{name}: missing")
        elif _sha256(p) != sha:
            problems.append(f"{TARGET_DIR}/{name}: sha256 differs from the one recorded in cache.json "
                            f"(the file changed after extraction)")
    return problems


# --------------------------------------------------------------------------- shards


def _shard_dirs(root: Path) -> dict[int, Path]:
    d = shards_dir(root)
    if not d.is_dir():
        return {}
    return {int(p.stem): p for p in d.iterdir()
            if p.is_dir() and p.suffix == ".zarr" and p.stem.isdigit() and not p.name.startswith(".")}


def outside_links(root: Path, p: Path) -> list[str]:
    """'name -> target' for p, or the entries under it, that resolve outside the cache; never walks out of it."""
    import os

    from schemas.cache_read import ChunkError, check_inside

    def outside(q: Path, name: str) -> list[str]:
        try:
            check_inside(q, root, "")
            return []
        except ChunkError:
            return [f"{name} -> {os.path.realpath(q)}"]

    here = outside(p, str(p.relative_to(root)) if p.is_relative_to(root) else str(p))
    if here:  # p itself leads out (a link to / included): nothing under it is looked at
        return here
    # only links can lead out: os.walk does not follow them, so every other entry is inside p
    links = [Path(d) / n for d, dirs, files in os.walk(p) for n in [*dirs, *files] if os.path.islink(Path(d) / n)]
    return [x for q in links for x in outside(q, str(q.relative_to(root)))]


def _read_info(p: Path) -> tuple[Optional[dict], Optional[str]]:
    f = p / SHARD_JSON
    if not f.is_file():
        return None, f"{SHARD_JSON} missing (never committed, or removed)"
    try:
        info = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{SHARD_JSON} unreadable, half-written? ({e})"
    if not isinstance(info, dict):
        return None, f"{SHARD_JSON} is not a JSON object"
    return info, None


def shard_layout(meta: dict) -> Optional[list[int]]:
    """First sample of every shard plus the end: cache.json's shard_starts (token-sized shards), or
    for caches made before those, k * samples_per_shard; None when cache.json says neither."""
    if meta.get("shard_starts") is not None:
        return [int(x) for x in meta["shard_starts"]]
    S, N = meta.get("samples_per_shard"), (meta.get("data") or {}).get("num_samples")
    if S is None or N is None:
        return None
    return list(range(0, int(N), int(S))) + [int(N)]


def _layout_problems(meta: dict) -> list[str]:
    """cache.json's shard_starts against its own num_shards and data.num_samples."""
    starts = meta.get("shard_starts")
    if starts is None:
        return []
    N, n = (meta.get("data") or {}).get("num_samples"), meta.get("num_shards")
    ok = (isinstance(starts, list) and len(starts) >= 1 and all(isinstance(x, int) for x in starts)
          and starts[0] == 0 and all(a < b for a, b in zip(starts[:-1], starts[1:])))
    if not ok:
        return ["cache.json: shard_starts is not an increasing list of sample positions from 0"]
    out = []
    if N is not None and starts[-1] != N:
        out.append(f"cache.json: shard_starts ends at sample {starts[-1]}, data.num_samples is {N}")
    if n is not None and len(starts) - 1 != n:
        out.append(f"cache.json: shard_starts holds {len(starts) - 1} shards, num_shards is {n}")
    return out


def _expected_samples(meta: dict, k: int) -> Optional[int]:
    starts = shard_layout(meta)
    if starts is None:
        return None
    return starts[k + 1] - starts[k] if k + 1 < len(starts) else 0


def _info_problems(k: int, info: dict, meta: dict) -> list[str]:
    out = []
    T, N, L = info.get("tokens"), info.get("samples"), meta.get("max_length")
    for key in ("samples", "tokens"):
        v = info.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            out.append(f"{SHARD_JSON}: '{key}' is {v!r}, not a count")
    if not out and isinstance(L, int) and T > N * L:
        out.append(f"{SHARD_JSON}: {T} tokens in {N} samples, more than cache.json's max_length {L} allows")
    if info.get("schema") != SHARD_SCHEMA_ID:
        out.append(f"{SHARD_JSON}: schema {info.get('schema')!r} is not {SHARD_SCHEMA_ID!r}")
    if info.get("shard") != k:
        out.append(f"{SHARD_JSON} says shard {info.get('shard')!r}: the directory was renamed or copied")
    want = _expected_samples(meta, k)
    if want is not None and info.get("samples") != want:
        out.append(f"{SHARD_JSON}: {info.get('samples')} samples, cache.json (shard_starts, or "
                   f"samples_per_shard and data.num_samples) implies {want}")
    target = meta.get("target") or {}
    for key, have in (("hidden_size", target.get("hidden_size")), ("topk", meta.get("topk")),
                      ("layers", meta.get("layers"))):
        if key in info and have is not None and info[key] != have:
            out.append(f"{SHARD_JSON}: {key} is {info[key]!r}, cache.json says {have!r}")
    return out


def _array_meta_problems(p: Path, info: dict, meta: dict) -> list[str]:
    T, N = info.get("tokens"), info.get("samples")
    target = meta.get("target") or {}
    H, K, V = target.get("hidden_size"), meta.get("topk"), target.get("vocab_size")
    shapes = {"input_ids": (T,), "loss_mask": (T,), "hidden": (T, 3, H), "topk_ids": (T, K),
              "topk_logprobs": (T, K), "offsets": (None if N is None else N + 1,), "sample_index": (N,),
              "token_counts": (V,)}
    out = []
    for name, (stored, _logical) in ARRAYS.items():
        f = p / name / "zarr.json"
        try:
            am = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            out.append(f"array {name}: missing or unreadable metadata ({name}/zarr.json)")
            continue
        try:
            check_array_meta(am, f"array {name}", shapes[name])
        except CacheError as e:
            out.append(str(e))
            continue
        if name == "hidden":
            logical = (am.get("attributes") or {}).get("logical_dtype")
            if meta.get("hidden_dtype") and logical and logical != meta["hidden_dtype"]:
                out.append(f"array hidden: logical dtype {logical}, cache.json hidden_dtype says "
                           f"{meta['hidden_dtype']}")
        elif am.get("data_type") != stored:
            out.append(f"array {name}: dtype {am.get('data_type')}, the layout stores {stored}")
    return out


def _small_array(p: Path, name: str) -> np.ndarray:
    from schemas.cache_read import ChunkedArray

    return ChunkedArray(p, name)[...]  # sizes checked, crc32c checked, no symlink out of the cache


def _index_problems(p: Path, info: dict) -> tuple[list[str], Optional[np.ndarray]]:
    try:
        o, si = _small_array(p, "offsets"), _small_array(p, "sample_index")
    except Exception as e:  # noqa: BLE001 - zarr/codecs raise many types on damaged files
        return [f"offsets/sample_index cannot be read ({type(e).__name__}: {e})"], None
    out = []
    T = info.get("tokens")
    if o.size == 0 or o[0] != 0 or (T is not None and o[-1] != T) or (np.diff(o) < 0).any():
        out.append(f"array offsets: not a non-decreasing 0..{T} sequence")
    if len(si) != info.get("samples"):
        out.append(f"array sample_index: {len(si)} entries for {info.get('samples')} samples")
    if (np.diff(si) <= 0).any():
        out.append("array sample_index: not strictly increasing")
    return out, si


def _duplicate_problems(indices: dict[int, np.ndarray]) -> list[str]:
    if not indices:
        return []
    allv = np.concatenate(list(indices.values()))
    vals, counts = np.unique(allv, return_counts=True)
    dups = vals[counts > 1]
    if not dups.size:
        return []
    where = {int(v): [shard_name(k) for k, si in indices.items() if v in si] for v in dups[:5]}
    listed = "; ".join(f"{v} in {', '.join(ks)}" for v, ks in where.items())
    return [f"sample_index: {dups.size} samples appear more than once ({listed}{' ...' if dups.size > 5 else ''})"]


def cache_problems(root: str | Path, meta: dict) -> list[str]:
    """Everything that makes the cache at root inconsistent (empty when it is sound)."""
    root = Path(root)
    bad_json = cache_json_problems(meta)
    if bad_json:
        return [f"cache.json: {p}" for p in bad_json]
    problems = [p for p in _target_problems(root, meta)] + _layout_problems(meta)
    if any(p.startswith("cache.json: shard_starts is not") for p in problems):
        return problems
    links = outside_links(root, shards_dir(root)) if shards_dir(root).exists() else []
    if links:  # nothing is read through a link out of the cache
        return problems + [f"{x}: resolves outside the cache (set EAGLE3_FOLLOW_SYMLINKS=1 to follow links out of "
                           f"it)" for x in links]
    dirs = _shard_dirs(root)
    n = meta.get("num_shards")
    if n is None:
        note_once(root, "cache.json has no num_shards (an old cache); the shard set is not checked")
        expected = sorted(dirs)
    else:
        expected = list(range(int(n)))
        for k in sorted(set(expected) - set(dirs)):
            problems.append(f"shard {shard_name(k)}: missing (cache.json num_shards = {n})")
        for k in sorted(set(dirs) - set(expected)):
            problems.append(f"shard {dirs[k].name}: beyond num_shards = {n} (an extra shard)")
    for k, p in sorted(dirs.items()):
        if p.name != shard_name(k):
            problems.append(f"shard {p.name}: not a shard name (expected {shard_name(k)})")
    indices: dict[int, np.ndarray] = {}
    for k in expected:
        p = dirs.get(k)
        if p is None:
            continue
        info, err = _read_info(p)
        found = [err] if err else _info_problems(k, info, meta)
        if info is not None and not found:
            found = _array_meta_problems(p, info, meta)
        if info is not None and not found:
            found, si = _index_problems(p, info)
            if si is not None:
                indices[k] = si
        problems += [f"shard {p.name}: {x}" for x in found]
    return problems + _duplicate_problems(indices)


def check_cache(root: str | Path, meta: dict) -> None:
    """Raise a CacheError listing what is inconsistent in the cache at root."""
    problems = cache_problems(root, meta)
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CacheError(f"cache {root} is inconsistent (`eagle3 shards verify` lists everything): "
                         + "; ".join(problems[:MAX_LISTED]) + more)
