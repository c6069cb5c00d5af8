"""Disk-full errors in words: which path, how much space is left, what state the output is in."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional


class DiskFullError(OSError):
    """No space left on the device under a path; the message names the path and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def exception_chain(e: BaseException):
    """e, its cause or context, and so on."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain (libraries wrap OSErrors)."""
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in exception_chain(e))


# torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos",
# without an errno; after such a failure the file system is (nearly) full, which is what we check.
NEARLY_FULL = 4 << 20


def looks_disk_full(e: BaseException, path: str | Path) -> bool:
    """ENOSPC in the chain, or a write error while the file system of `path` has (nearly) no space left."""
    if is_disk_full(e):
        return True
    free = free_bytes(path)
    return isinstance(e, (OSError, RuntimeError)) and free is not None and free < NEARLY_FULL


def free_bytes(path: str | Path) -> Optional[int]:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(e: BaseException, path: str | Path, state: str) -> DiskFullError:
    """A DiskFullError for `e` while writing `path`; `state` says what was kept (e.g. 'the cache is unchanged')."""
    free = free_bytes(path)
    left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    err = DiskFullError(errno.ENOSPC, f"no space left on device while writing {path} ({left}); {state}. "
                                      f"Free some space and run the same command again")
    err.filename = str(path)
    return err


__all__ = ["DiskFullError", "disk_full", "exception_chain", "is_disk_full", "looks_disk_full", "free_bytes"]
