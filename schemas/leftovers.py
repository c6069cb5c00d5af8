"""What killed extraction workers leave in a cache's shards/ directory: find it, judge it, reclaim it.

A worker streams each shard into `shards/.tmp-KKKKK-<host>-<pid>-<start>.zarr` (the
name says who owns it; schemas.cache.temp_shard_path) and, for as long as it runs,
holds `.locks/owner-<host>-<pid>-<start>` (a `DirLock`: a flock, or a lease file with a
heartbeat where flock is refused). A temporary shard is reclaimable when its owner is
gone, judged without waiting:
* same host: the pid is gone or belongs to a newer process;
* another host: the owner's flock is free, or its lease's heartbeat is older than the
  lease plus the tolerated clock skew (`EAGLE3_LOCK_LEASE_S` + `EAGLE3_LOCK_SKEW_S`);
  with no owner lock at all (an older version, or a lock removed by hand), when no file
  in the directory changed for that long.
Anything else is left alone and listed by `eagle3 shards verify` with its size.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from schemas.cache import LOCKS_DIR, SHARD_JSON, TMP_PREFIX, dir_bytes, shards_dir
from schemas.locks import FLOCK_REFUSED, DirLock, Owner, _open, _record, _snapshot, describe, \
    lease_expired_by_clock, lease_seconds, skew_seconds

OWNER_PREFIX = "owner-"


def owner_lock(root: str | Path, owner: Optional[Owner] = None) -> DirLock:
    """The lock a writer process holds on a cache while it may have temporary shards there."""
    o = owner or Owner.me()
    return DirLock(Path(root) / LOCKS_DIR / f"{OWNER_PREFIX}{o.token()}", f"temporary shards of pid {o.pid}",
                   remove=True)


@dataclass
class Leftover:
    path: Path
    kind: str  # "temporary shard", "uncommitted shard directory", "trash"
    shard: Optional[int]
    owner: Optional[Owner]
    bytes: int
    state: str  # alive | dead | unknown
    why: str

    @property
    def reclaimable(self) -> bool:
        return self.state == "dead"

    def words(self) -> str:
        who = f"pid {self.owner.pid} on {self.owner.host}" if self.owner else "an unknown process"
        return f"{self.path.name}: {_size(self.bytes)}, {self.kind} of {who}: {self.why}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _newest_mtime(p: Path) -> float:
    times = [p.stat().st_mtime]
    for f in p.rglob("*"):
        try:
            times.append(f.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def _flock_free(path: Path) -> Optional[bool]:
    """True: nobody holds the flock on `path`; False: somebody does; None: cannot tell."""
    try:
        fd = _open(path, os.O_RDWR)  # NFS emulates flock with POSIX locks: an exclusive one needs write access
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as e:
        return None if e.errno in FLOCK_REFUSED else False
    finally:
        os.close(fd)


def judge_owner(root: Path, owner: Optional[Owner], where: Path) -> tuple[str, str]:
    """(alive | dead | unknown, why) for the owner of `where` (a temporary shard dir)."""
    grace = lease_seconds() + skew_seconds()
    if owner is None:
        return "unknown", "its name names no owner (an older version); remove it by hand when no extraction runs"
    if owner.local:
        if owner.is_dead():
            return "dead", "its process is gone"
        return "alive", "its process is running"
    lock = owner_lock(root, owner)
    snap = _snapshot(lock.lease_path)
    if snap is not None:
        rec = _record(snap[0])
        if lease_expired_by_clock(rec, lease_seconds()):
            return "dead", f"its owner's lease expired ({describe(rec)})"
        return "alive", f"its owner's lease is live ({describe(rec)})"
    age = time.time() - _newest_mtime(where)
    free = _flock_free(lock.path) if lock.path.exists() else None
    if free is False:
        return "alive", "its owner holds its lock"
    # A free flock from another host is believed only for a directory untouched for a lease:
    # where flock is granted per node only (Lustre localflock), every remote lock looks free.
    said = "its owner's lock is free" if free else "its owner holds no lock"
    if age > grace:
        return "dead", f"{said} and nothing in it changed for {age:.0f}s"
    return "alive", f"{said} but it was written {age:.0f}s ago (reclaimed once untouched for {grace:.0f}s)"


def find_leftovers(root: str | Path, k: Optional[int] = None, *, sizes: bool = True) -> list[Leftover]:
    """Everything in shards/ that is not a committed shard (of shard k, or all), judged."""
    root = Path(root)
    d = shards_dir(root)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir(), key=lambda q: q.name.lstrip(".")):
        if not p.is_dir() or p.is_symlink():
            continue
        nbytes = dir_bytes(p) if sizes else 0
        if p.name.startswith(TMP_PREFIX) and p.name.endswith(".zarr"):
            body = p.name[len(TMP_PREFIX):-len(".zarr")]
            shard, _, token = body.partition("-")
            if k is not None and shard != f"{k:05d}":
                continue
            owner = Owner.parse(token)
            state, why = judge_owner(root, owner, p)
            out.append(Leftover(p, "temporary shard", int(shard) if shard.isdigit() else None, owner, nbytes,
                                state, why))
        elif p.name.startswith(".trash-"):
            out.append(Leftover(p, "trash", None, None, nbytes, "unknown",
                                "an uncommitted directory moved aside by a commit that was killed; remove it by hand"))
        elif p.suffix == ".zarr" and p.stem.isdigit() and not (p / SHARD_JSON).is_file():
            if k is None or int(p.stem) == k:
                out.append(Leftover(p, "uncommitted shard directory", int(p.stem), None, nbytes, "unknown",
                                    "no shard.json (readers ignore it; the next commit of this shard replaces it)"))
    return out


def reclaim(root: str | Path, k: Optional[int] = None) -> list[Path]:
    """Remove the temporary shards (of shard k, or all) whose owner is gone, and its lock files."""
    root = Path(root)
    removed, owners = [], set()
    for lo in find_leftovers(root, k, sizes=False):
        if lo.kind == "temporary shard" and lo.reclaimable:
            shutil.rmtree(lo.path, ignore_errors=True)
            removed.append(lo.path)
            owners.add(lo.owner)
    for o in owners:
        if not list(shards_dir(root).glob(f"{TMP_PREFIX}*-{o.token()}.zarr")):
            _remove_lock_files(owner_lock(root, o))
    if k is None:
        _sweep_owner_locks(root)
    return removed


def _remove_lock_files(lock: DirLock) -> None:
    for f in (lock.path, lock.lease_path):
        try:
            os.unlink(f)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def _sweep_owner_locks(root: Path) -> None:
    """Owner locks of processes that are gone and left no temporary shard (killed between shards)."""
    d = root / LOCKS_DIR
    if not d.is_dir():
        return
    for f in d.glob(f"{OWNER_PREFIX}*"):
        if f.name.endswith(".guard"):
            continue
        owner = Owner.parse(f.name[len(OWNER_PREFIX):].removesuffix(".lease"))
        if owner is None or list(shards_dir(root).glob(f"{TMP_PREFIX}*-{owner.token()}.zarr")):
            continue
        lock = owner_lock(root, owner)
        if owner.local:
            gone = owner.is_dead()
        elif lock.lease_path.exists():
            gone = lease_expired_by_clock(_record((_snapshot(lock.lease_path) or (b"",))[0]), lease_seconds())
        else:
            gone = _flock_free(lock.path) is True
        if gone:
            _remove_lock_files(lock)
