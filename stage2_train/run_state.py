"""What a training run keeps beside DeepSpeed's checkpoint, written and read safely.

* RNG states as JSON (`rng_rank<r>.json`): nothing in `train.output` is unpickled by
  us; a legacy `rng_rank<r>.pt` (pickle) is never loaded, only reported.
  DeepSpeed's own `load_checkpoint` still unpickles its model/optimizer files
  (torch.load with weights_only=False): resuming trusts the checkpoint directory,
  so point `train.output` only at directories you (or your jobs) wrote.
* The output lock: rank 0 holds `train.output/.lock` for the whole run, so a second
  training into the same directory fails at once, naming the first. Before that,
  train.output must be new, empty or a training output (schemas.dirkind): a model's
  directory, a cache, an export or a file stops the run with one line.
* Disk full while checkpointing: the partial tag directory is removed and `latest`
  keeps naming the previous complete checkpoint, so the re-run resumes from it.
"""
from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from schemas.dirkind import UnsafeDirError, ensure_writable, mark
from schemas.disk import disk_full, looks_disk_full
from schemas.locks import DirLock, LockBusy

OUTPUT_LOCK = ".lock"


class RunStateError(RuntimeError):
    """An RNG file or the output directory cannot be used; the message names the path."""


# --------------------------------------------------------------------------- RNG states


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode()


def _bytes_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank}.json"


def save_rng_state(path: Path) -> None:
    """Python, numpy, torch (and CUDA) generator states as JSON."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(state), gauss],
          "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached)},
          "torch": _b64(torch.get_rng_state()),
          "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(st))
    tmp.replace(path)


def load_rng_state(tag_dir: Path, rank: int, log: Callable[[str], None] = print) -> bool:
    """Restore this rank's RNG states from a checkpoint tag dir; False when there are none to restore."""
    p = rng_file(tag_dir, rank)
    if not p.is_file():
        legacy = Path(tag_dir) / f"rng_rank{rank}.pt"
        if legacy.is_file():
            log(f"[stage 2] {legacy}: RNG state in the old pickle format is not loaded (unpickling a file "
                f"runs code from it); the resumed run draws fresh random numbers")
        return False
    try:
        st = json.loads(p.read_text())
        version, state, gauss = st["python"]
        random.setstate((int(version), tuple(int(x) for x in state), gauss))
        n = st["numpy"]
        np.random.set_state((str(n["name"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
        torch.set_rng_state(_bytes_tensor(st["torch"]))
        if st.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in st["cuda"]])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunStateError(f"{p}: not a valid RNG state file ({type(e).__name__}: {e}); "
                            f"use --restart to start over") from None
    return True


# --------------------------------------------------------------------------- the output lock


def check_output_dir(out: Path) -> None:
    """train.output must be new, empty or a training output: never a model, a cache, an export or a file."""
    try:
        ensure_writable(out, ("missing", "empty", "head"), "train.output",
                        hint="Set train.output to a new or empty directory (or an earlier train.output to resume).")
    except UnsafeDirError as e:
        raise RunStateError(str(e)) from None


def lock_output(out: Path, ranks) -> Optional[DirLock]:
    """Rank 0 checks what train.output is (schemas.dirkind), takes its lock and marks it as a training
    output; every rank raises RunStateError alike when it is not one or another run holds it.
    `ranks`: stage2_train.collectives.Ranks."""
    lock, err = None, None
    if ranks.rank == 0:
        try:
            check_output_dir(out)
        except RunStateError as e:
            err = str(e)
    if ranks.rank == 0 and err is None:
        lock = DirLock(Path(out) / OUTPUT_LOCK, f"eagle3 train into {out}")
        try:
            lock.acquire()
            mark(out, "head", "eagle3 train")
        except LockBusy:
            err = (f"train.output {out} is in use by another training ({lock.holder()}); two runs in one "
                   f"directory would resume each other's checkpoints. Wait for it, or set another train.output")
            lock = None
    err = ranks.broadcast_object(err, src=0)
    if err:
        raise RunStateError(err)
    return lock


# --------------------------------------------------------------------------- checkpoints on a full disk


def guarded_checkpoint(ckdir: Path, tag: str, save: Callable[[], None]) -> None:
    """Run `save` (which writes ckdir/tag and then `latest`); on a full disk leave the previous
    checkpoint as the latest one and raise a DiskFullError that names the path."""
    latest = ckdir / "latest"
    prev = latest.read_text().strip() if latest.is_file() else None
    try:
        save()
    except Exception as e:  # noqa: BLE001 - torch.save reports ENOSPC as a bare RuntimeError
        if not looks_disk_full(e, ckdir):
            raise
        shutil.rmtree(ckdir / tag, ignore_errors=True)
        if prev is not None and (ckdir / prev).is_dir():
            tmp = ckdir / "latest.tmp"
            tmp.write_text(prev)
            tmp.replace(latest)
            state = f"the incomplete checkpoint {tag} was removed; the run resumes from {prev}"
        else:
            latest.unlink(missing_ok=True)
            state = f"the incomplete checkpoint {tag} was removed; there is no earlier one, the run starts over"
        raise disk_full(e, ckdir / tag, state) from e


# --------------------------------------------------------------------------- resuming on another number of ranks


def to_universal(ckdir: Path, tag: str) -> Path:
    """DeepSpeed's universal form of ZeRO checkpoint `tag` (`<tag>_universal`, named by `latest_universal`),
    made by DeepSpeed's converter: it loads on any number of ranks (a ZeRO checkpoint loads only on as
    many ranks as wrote it). Kept once made."""
    out = Path(ckdir) / f"{tag}_universal"
    done = Path(ckdir) / "latest_universal"  # the converter writes it last
    if (out / "zero").is_dir() and done.is_file() and done.read_text().strip() == out.name:
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckdir) / tag),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RunStateError(f"{Path(ckdir) / tag}: converting the checkpoint for another number of ranks failed "
                            f"({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    return out
