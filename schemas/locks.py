"""Advisory directory locks and process ownership (DESIGN.md section 4: writers hold a lock).

`DirLock` is an exclusive `fcntl.flock` on a lock file: the kernel releases it when
its holder exits, however it exits (kill -9 included), so a lock is never stale.
The holder writes who it is (pid, host, process start time, what for) into the
file, so that a second process can say whom it is waiting for. flock works on
local file systems and on the cluster file systems that support it (Lustre,
GPFS, NFSv4 with locking); where it is not supported, acquiring raises.

`Owner` names a process well enough to tell, on the same host, whether it is still
alive: a pid alone can be reused, a pid with the kernel's start time cannot. A
process on another host is never declared dead (nothing proves it).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class LockBusy(RuntimeError):
    """Another live process holds the lock; the message names it."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _start_time(pid: int) -> Optional[int]:
    """The kernel's start time of `pid` in clock ticks since boot (Linux), None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22; the command name (field 2) may hold spaces and parentheses, so split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: int  # 0 when unknown (no /proc)

    @classmethod
    def me(cls) -> "Owner":
        return cls(_host(), os.getpid(), _start_time(os.getpid()) or 0)

    def token(self) -> str:
        """host-pid-start, safe in a file name; `parse` reads it back."""
        return f"{self.host}-{self.pid}-{self.start}"

    @classmethod
    def parse(cls, token: str) -> Optional["Owner"]:
        m = re.fullmatch(r"([A-Za-z0-9._]+)-(\d+)-(\d+)", token)
        return cls(m.group(1), int(m.group(2)), int(m.group(3))) if m else None

    def is_dead(self) -> bool:
        """True only when provably dead: same host and the pid is gone or belongs to a newer process."""
        if self.host != _host():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # exists, owned by another user
        now = _start_time(self.pid)
        return bool(self.start) and now is not None and now != self.start


class DirLock:
    """Exclusive advisory lock on `path` (a file, created if missing; never deleted).

    `acquire(wait=False)` raises LockBusy naming the holder; `wait=True` blocks up
    to `timeout` seconds. Usable as a context manager (waits).
    """

    def __init__(self, path: str | Path, what: str, timeout: float = 600.0):
        self.path = Path(path)
        self.what = what
        self.timeout = timeout
        self._fd: Optional[int] = None
        self._pid = 0  # the process that acquired: a forked child (a DataLoader worker) never unlocks

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, in words (from the file the holder wrote)."""
        try:
            rec = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            rec = {}
        if not rec:
            return "another process (it has not written its name yet)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since", 0)))
        return f"pid {rec.get('pid')} on {rec.get('host')} ({rec.get('what')}, since {since})"

    def acquire(self, wait: bool = False) -> "DirLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise LockBusy(f"{self.path}: cannot lock ({e.strerror}); the file system may not "
                                       f"support flock") from None
                    if not wait or time.monotonic() > deadline:
                        raise LockBusy(f"{self.path} is locked by {self.holder()}") from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        me = Owner.me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": me.pid, "host": me.host, "start": me.start, "what": self.what,
                                  "since": time.time()}).encode(), 0)
        self._fd, self._pid = fd, os.getpid()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid:  # a fork shares the lock; unlocking here would free the parent's
            os.close(fd)
            return
        try:
            os.ftruncate(fd, 0)  # the holder's name goes with the lock
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire(wait=True)

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped without release (an exception path) still lets go
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
