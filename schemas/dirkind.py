"""What a directory is, decided before any command writes or deletes in it (DESIGN.md section 9).

One rule for every write path (extract.cache, train.output, export OUT, sweep.output,
`shards index`): `classify(path)` says what the path holds, and `ensure_writable(path,
allowed, what)` stops a command with one line when the answer is not what it may write
into. Kinds:

* missing / empty            nothing there yet: any command may create its output;
* file                       a plain file where a directory is expected;
* cache / head / export / sweep / eval / conversion
                             made by this tool: the marker file `.eagle3.json` says which
                             (written by the command that created the directory), or,
                             for directories made before markers existed, their own files
                             (cache.json with our schema id; config.json of an EAGLE-3
                             head, with an `export` block for an export; sweep.json; an
                             eval's report files); `conversion` is a GGUF target converted
                             to an HF directory (schemas.target), its marker listing its files;
* model                      weights (*.safetensors, *.bin, *.gguf, ...) or a config.json
                             of another architecture: never written into, never deleted;
* unknown                    anything else (files this tool did not write).

Deletion: `remove_owned(path, owned)` removes a directory tree only when every file
in it is one this tool recorded as its own; it never follows symlinks out of it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

MARKER = ".eagle3.json"
KINDS = ("missing", "file", "empty", "cache", "head", "export", "sweep", "eval", "conversion", "model", "unknown")
OURS = ("cache", "head", "export", "sweep", "eval", "conversion")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".pkl")
HEAD_ARCHS = ("LlamaForCausalLMEagle3", "Eagle3Speculator")
CACHE_SCHEMA = "eagle3-cache/1"
# what a training run leaves in train.output before its first head is written (stage2_train.trainer)
HEAD_LEFTOVERS = {".lock", MARKER, "checkpoints", "train_config.yaml", "metrics.jsonl", "eval.jsonl", "last",
                  "train_curves.png", "heldout_table.md", "eval"}
# what stage 1 leaves in a cache before cache.json exists (schemas.cache, stage1_extract.extract)
CACHE_LEFTOVERS = {".locks", MARKER, "shards", "manifest.parquet"}
CACHE_TEMP_PREFIXES = (".target.tmp", ".cache.json.tmp")
# what stage 3 writes into eval.output (stage3_eval.report, stage3_eval.vllm_engine)
EVAL_FILES = {MARKER, "report.json", "report.md", "report.png", "vllm.log", "vllm_raw.json", "vllm_heads"}


class UnsafeDirError(RuntimeError):
    """A command was about to write or delete where it must not; the message names the path and why."""


@dataclass(frozen=True)
class DirKind:
    path: Path
    kind: str
    why: str

    def __str__(self) -> str:
        return f"{self.path} ({self.kind}: {self.why})"


def _read_json(p: Path) -> Optional[dict]:
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_marker(path: str | Path) -> Optional[dict]:
    m = _read_json(Path(path) / MARKER)
    return m if m is not None and m.get("kind") in OURS else None


def _names(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _our_target_dir(p: Path) -> bool:
    """A cache's target/: the frozen embedding beside tokenizer/config files, no model weights."""
    try:
        files = [f.name for f in p.iterdir()]
    except OSError:
        return False
    weights = {f for f in files if f.endswith(WEIGHT_SUFFIXES)}
    return "embed_tokens.safetensors" in files and weights <= {"embed_tokens.safetensors", "lm_head.safetensors",
                                                                "last_layer.safetensors"}


def _by_config(path: Path, cfg: Path) -> Optional[DirKind]:
    c = _read_json(cfg)
    archs = (c or {}).get("architectures") or []
    if c is not None and isinstance(archs, list) and any(a in HEAD_ARCHS for a in archs):
        if "export" in c:
            return DirKind(path, "export", "config.json of an exported EAGLE-3 head")
        return DirKind(path, "head", "config.json of an EAGLE-3 head")
    what = f"architectures {archs}" if c is not None else "an unreadable config.json"
    return DirKind(path, "model", f"config.json with {what}")


def classify(path: str | Path) -> DirKind:
    """What `path` holds (one of KINDS), with the reason in words."""
    p = Path(path)
    if not p.exists():
        return DirKind(p, "file" if p.is_symlink() else "missing", "a dangling symlink" if p.is_symlink()
                       else "does not exist")
    if not p.is_dir():
        return DirKind(p, "file", "a file, not a directory")
    try:
        entries = {e.name: e for e in os.scandir(p)}
    except OSError as e:
        return DirKind(p, "unknown", f"cannot be listed ({e.strerror})")
    if not entries:
        return DirKind(p, "empty", "an empty directory")
    marker = read_marker(p)
    if marker is not None:
        return DirKind(p, marker["kind"], f"marked by {MARKER} ({marker.get('created_by', 'eagle3')})")
    if (_read_json(p / "cache.json") or {}).get("schema") == CACHE_SCHEMA:
        return DirKind(p, "cache", "cache.json of an eagle3 cache")
    if (p / "config.json").is_file():
        return _by_config(p, p / "config.json")
    weights = [n for n, e in entries.items() if n.endswith(WEIGHT_SUFFIXES) and not n.startswith(".")]
    if weights:
        return DirKind(p, "model", f"holds {_names(weights)}")
    if (p / "sweep.json").is_file():
        return DirKind(p, "sweep", "sweep.json of an eagle3 sweep")
    names = set(entries)
    if "report.json" in names and names <= EVAL_FILES:
        return DirKind(p, "eval", "report.json of an eagle3 eval")
    if names <= HEAD_LEFTOVERS:
        return DirKind(p, "head", f"an unfinished training output ({_names(names)})")
    if names and all(n in (MARKER, "sweep.md") or (entries[n].is_dir() and classify(p / n).kind == "head")
                     for n in names):
        return DirKind(p, "sweep", f"an unfinished sweep ({_names(names)})")
    foreign = {n for n in names - CACHE_LEFTOVERS if not n.startswith(CACHE_TEMP_PREFIXES)
               and not (n == "target" and _our_target_dir(p / n))}
    if not foreign:
        return DirKind(p, "cache", f"an unfinished cache ({_names(names)})")
    return DirKind(p, "unknown", f"holds files eagle3 did not write ({_names(foreign)})")


ARTICLE = {"missing": "missing", "file": "a file", "empty": "empty", "cache": "an eagle3 cache",
           "head": "a trained head (train.output)", "export": "an exported head", "sweep": "a sweep directory",
           "eval": "an eval output (eval.output)", "conversion": "a GGUF target converted by eagle3",
           "model": "a model directory", "unknown": "a directory eagle3 did not create"}


def ensure_writable(path: str | Path, allowed: Iterable[str], what: str, hint: str = "") -> DirKind:
    """classify(path), or UnsafeDirError when its kind is not in `allowed` (one line, naming path and why)."""
    d = classify(path)
    allowed = tuple(allowed)
    if d.kind not in allowed:
        want = " or ".join(ARTICLE[k] for k in allowed)
        raise UnsafeDirError(f"{what} {path} is {ARTICLE[d.kind]} ({d.why}); refusing to write there: it must be "
                             f"{want}. {hint or 'Choose a new or empty directory.'}".rstrip())
    return d


def mark(path: str | Path, kind: str, created_by: str, **extra) -> None:
    """Record that this tool made `path` as a `kind` (kept when already there and of that kind); `extra`
    goes into the marker too (a conversion lists its files there)."""
    if kind not in OURS:
        raise ValueError(f"kind {kind!r} is not one of {OURS}")
    p = Path(path)
    have = read_marker(p)
    if have is not None and have.get("kind") == kind and not extra:
        return
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"kind": kind, "created_by": created_by,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}) + "\n")
    os.replace(tmp, p / MARKER)


def _all_files(root: Path) -> Iterable[Path]:
    """Every entry under root that is not a directory (symlinks included, never followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for n in filenames:
            yield base / n
        for n in dirnames:
            if (base / n).is_symlink():
                yield base / n


def remove_owned(path: str | Path, owned: Iterable[str], what: str) -> None:
    """Remove the tree at `path` only when every file in it is listed in `owned` (paths relative to it)."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise UnsafeDirError(f"{what} {p} is not a directory this tool wrote; refusing to remove it")
    if not p.exists():
        return
    owned = set(owned)
    foreign = [str(f.relative_to(p)) for f in _all_files(p) if str(f.relative_to(p)) not in owned
               or f.is_symlink()]
    if foreign:
        raise UnsafeDirError(f"{what} {p} holds files eagle3 did not write ({_names(foreign)}); refusing to remove "
                             f"it. Move it away yourself if it should go")
    shutil.rmtree(p)
