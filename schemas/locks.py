"""Advisory locks that work on cluster file systems, and process ownership (DESIGN.md sections 4, 9).

`DirLock` is one interface over two mechanisms:

* **flock** (used where the kernel grants it): an exclusive `fcntl.flock` on the lock
  file. The kernel releases it when its holder exits, however it exits (kill -9
  included), so it is never stale. Local file systems, and Lustre / GPFS / NFSv4
  mounted with cluster-wide locking.
* **lock files** (where flock is refused -- Lustre mounted without `flock`, NFS
  without a lock manager -- or forced with `EAGLE3_LOCK_MODE=file`, which hosts that
  share a cache must all set where flock is granted per node only, e.g. Lustre
  `localflock`): `<lock>.lease`, created with O_EXCL, holding the holder's host,
  pid, process start time, what it is for, a random nonce and a heartbeat counter
  that a thread of the holder advances every lease/4 seconds. A lease is taken over
  only when its holder is provably gone:
  - on the same host: its pid is gone or now belongs to a newer process;
  - on another host: its heartbeat has not moved for `EAGLE3_LOCK_LEASE_S` seconds
    (default 120), watched by the waiting process on its own monotonic clock, so no
    clocks are compared between hosts and a live holder (it beats every lease/4 s) is
    never taken over. A holder frozen for longer than the lease (SIGSTOP, a hung node)
    loses its lock and says so when it resumes.
  Take-overs and releases are serialised by `<lock>.lease.guard` (another O_EXCL file,
  held for milliseconds). A non-waiting acquire facing a lease that looks alive by the
  holder's clock fails at once, naming the holder and the file to remove by hand.

Lock files are opened with O_NOFOLLOW (and leases created with O_EXCL): a lock path
that is a symbolic link is refused with a `LockError`; its target is never opened,
let alone truncated.

`Owner` names a process well enough to tell, on the same host, whether it is still
alive: a pid alone can be reused, a pid with the kernel's start time cannot.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MODE_ENV = "EAGLE3_LOCK_MODE"  # auto (flock where granted, else lock files) | flock | file
LEASE_ENV = "EAGLE3_LOCK_LEASE_S"  # lease of a lock file: taken over after this long without a heartbeat
SKEW_ENV = "EAGLE3_LOCK_SKEW_S"  # clock difference between hosts tolerated by the no-wait checks
LEASE_S = 120.0
SKEW_S = 60.0
GUARD_S = 10.0  # a take-over guard unchanged this long (held for milliseconds normally) is broken
RECORD_BYTES = 1024  # lease records are padded to a fixed size: one pwrite updates them whole
# errno values with which a file system refuses flock altogether (EAGAIN / EACCES mean "held")
FLOCK_REFUSED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF})


class LockBusy(RuntimeError):
    """Another live process holds the lock; the message names it."""


class LockError(LockBusy):
    """A lock that cannot be used at all (a symlink in its place, flock refused in flock mode)."""


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


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        v = float(raw)
    except ValueError:
        raise LockError(f"{name}={raw!r}: expected a number of seconds") from None
    if v <= 0:
        raise LockError(f"{name}={raw!r}: expected a positive number of seconds")
    return v


def lock_mode() -> str:
    m = os.environ.get(MODE_ENV) or "auto"
    if m not in ("auto", "flock", "file"):
        raise LockError(f"{MODE_ENV}={m!r}: expected auto, flock or file")
    return m


def lease_seconds() -> float:
    return _env_float(LEASE_ENV, LEASE_S)


def skew_seconds() -> float:
    return _env_float(SKEW_ENV, SKEW_S)


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

    @property
    def local(self) -> bool:
        return self.host == _host()

    def is_dead(self) -> bool:
        """True only when provably dead: same host and the pid is gone or belongs to a newer process."""
        if not self.local:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # exists, owned by another user
        now = _start_time(self.pid)
        return bool(self.start) and now is not None and now != self.start


def _refuse_symlink(path: Path, e: OSError) -> None:
    if e.errno == errno.ELOOP:
        raise LockError(f"{path} is a symbolic link: lock files are never followed (writing through it would "
                        f"truncate the file it points at); remove the link and run again") from None


def _open(path: Path, flags: int) -> int:
    """os.open without following a symlink at `path` (LockError names it)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        _refuse_symlink(path, e)
        raise


def _create(path: Path) -> Optional[int]:
    """A new file at `path` (O_EXCL: never an existing file, never through a symlink), or None if one exists."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        if path.is_symlink():
            raise LockError(f"{path} is a symbolic link: lock files are never followed; remove the link "
                            f"and run again") from None
        return None


def _snapshot(path: Path) -> Optional[tuple[bytes, int, int]]:
    """(content, inode, mtime_ns) of a lease file, None when it does not exist."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        return os.pread(fd, RECORD_BYTES, 0), st.st_ino, st.st_mtime_ns
    finally:
        os.close(fd)


def _record(raw: Optional[bytes]) -> Optional[dict]:
    try:
        rec = json.loads(raw.decode()) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _owner_of(rec: Optional[dict]) -> Optional[Owner]:
    try:
        return Owner(str(rec["host"]), int(rec["pid"]), int(rec.get("start") or 0)) if rec else None
    except (KeyError, TypeError, ValueError):
        return None


def _pack(rec: dict) -> bytes:
    b = json.dumps(rec).encode()
    if len(b) > RECORD_BYTES:
        rec = {**rec, "what": str(rec.get("what", ""))[:200]}
        b = json.dumps(rec).encode()
    return b.ljust(RECORD_BYTES)


def _ago(t: Optional[float]) -> str:
    return "?" if not t else f"{max(0.0, time.time() - float(t)):.0f}s ago"


def describe(rec: Optional[dict]) -> str:
    """Who holds a lock, in words, from its record."""
    if not rec:
        return "another process (it has not written its name yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since", 0)))
    beat = f", last heartbeat {_ago(rec.get('beat_at'))}" if "beat_at" in rec else ""
    return f"pid {rec.get('pid')} on {rec.get('host')} ({rec.get('what')}, since {since}{beat})"


def lease_expired_by_clock(rec: Optional[dict], lease_s: float) -> bool:
    """A lease whose heartbeat, by the holder's own clock, is older than lease + the tolerated skew."""
    if not rec or "beat_at" not in rec:
        return False
    return time.time() - float(rec["beat_at"]) > float(rec.get("lease_s") or lease_s) + skew_seconds()


class _Watch:
    """How long a lease has been seen unchanged, on this process's monotonic clock."""

    def __init__(self):
        self.key = None
        self.since = 0.0

    def see(self, key) -> float:
        now = time.monotonic()
        if key != self.key:
            self.key, self.since = key, now
        return now - self.since


# --------------------------------------------------------------------------- heartbeats


class _Heart:
    """One daemon thread per process advancing the heartbeat of every lease it holds."""

    lock = threading.Lock()
    leases: list = []
    thread: Optional[threading.Thread] = None

    @classmethod
    def add(cls, lease: "_Lease") -> None:
        with cls.lock:
            cls.leases.append(lease)
            if cls.thread is None or not cls.thread.is_alive():
                cls.thread = threading.Thread(target=cls.run, name="eagle3-lease-heartbeat", daemon=True)
                cls.thread.start()

    @classmethod
    def remove(cls, lease: "_Lease") -> None:
        with cls.lock:
            if lease in cls.leases:
                cls.leases.remove(lease)

    @classmethod
    def run(cls) -> None:
        while True:
            with cls.lock:
                mine = [le for le in cls.leases if le.pid == os.getpid()]  # not a forked child's copies
            period = min([le.lease_s / 4 for le in mine] or [1.0])
            time.sleep(max(0.01, period))
            for le in mine:
                le.beat()


class _Lease:
    """A held lease file (lock-file mode)."""

    def __init__(self, path: Path, fd: int, what: str, lease_s: float):
        me = Owner.me()
        self.path, self.fd, self.lease_s, self.pid = path, fd, lease_s, os.getpid()
        self.lost = False
        self.mu = threading.Lock()  # a beat never writes to a descriptor that release() closed
        self.rec = {"pid": me.pid, "host": me.host, "start": me.start, "what": what, "since": time.time(),
                    "nonce": secrets.token_hex(8), "beat": 0, "beat_at": time.time(), "lease_s": lease_s}
        os.pwrite(fd, _pack(self.rec), 0)
        os.fsync(fd)

    def beat(self) -> None:
        with self.mu:
            self._beat()

    def _beat(self) -> None:
        if self.lost or self.fd < 0:
            return
        try:
            self.rec["beat"] += 1
            self.rec["beat_at"] = time.time()
            os.pwrite(self.fd, _pack(self.rec), 0)
            os.fsync(self.fd)  # NFS: visible to other clients' next open
            if not self.ours():
                raise FileNotFoundError
        except OSError:
            self.lost = True
            print(f"warning: lost the lock {self.path} ({self.rec['what']}): its heartbeat stopped for longer than "
                  f"{self.lease_s:.0f}s and another process took it over", file=sys.stderr, flush=True)

    def ours(self) -> bool:
        rec = _record((_snapshot(self.path) or (b"", 0, 0))[0])
        return bool(rec) and rec.get("nonce") == self.rec["nonce"]


class _Guard:
    """`<lease>.guard`: serialises take-overs and releases of one lease (held for milliseconds)."""

    def __init__(self, lease: Path):
        self.path = lease.with_name(lease.name + ".guard")
        self.fd = -1

    def __enter__(self) -> "_Guard":
        watch = _Watch()
        while True:
            fd = _create(self.path)
            if fd is not None:
                me = Owner.me()
                os.write(fd, json.dumps({"pid": me.pid, "host": me.host, "start": me.start}).encode())
                self.fd = fd
                return self
            snap = _snapshot(self.path)
            owner = _owner_of(_record(snap[0])) if snap else None
            if snap is not None and ((owner is not None and owner.is_dead()) or watch.see(snap) > GUARD_S):
                try:  # its creator died inside a take-over: nobody else touches a guard this old
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)


# --------------------------------------------------------------------------- the lock


class DirLock:
    """Exclusive advisory lock named by `path` (see the module docstring for the two mechanisms).

    `acquire(wait=False)` raises LockBusy naming the holder; `wait=True` blocks up to
    `timeout` seconds. Usable as a context manager (waits). `remove=True` deletes the
    lock file on release (for per-process locks; shared lock files are never deleted).
    """

    def __init__(self, path: str | Path, what: str, timeout: float = 600.0, *, remove: bool = False,
                 mode: Optional[str] = None, lease_s: Optional[float] = None):
        self.path = Path(path)
        self.lease_path = self.path.with_name(self.path.name + ".lease")
        self.what = what
        self.timeout = timeout
        self.remove = remove
        self._mode = mode
        self._lease_s = lease_s
        self._fd: Optional[int] = None
        self._lease: Optional[_Lease] = None
        self._pid = 0  # the process that acquired: a forked child (a DataLoader worker) never unlocks
        self.mode_used: Optional[str] = None  # "flock" or "file" once held

    @property
    def held(self) -> bool:
        return self._fd is not None or self._lease is not None

    @property
    def lost(self) -> bool:
        """A lock-file lease taken over while this process was frozen past its lease."""
        return self._lease is not None and self._lease.lost

    @property
    def lease_s(self) -> float:
        return float(self._lease_s) if self._lease_s else lease_seconds()

    def holder(self) -> str:
        """Who holds the lock, in words (from the lease, else from the record in the flock file)."""
        snap = _snapshot(self.lease_path)
        if snap is not None:
            return describe(_record(snap[0])) + f" [lock file {self.lease_path}]"
        try:
            raw = _snapshot(self.path)
        except LockError:
            return "nobody: the lock file is a symbolic link (refused)"
        return describe(_record(raw[0] if raw else None))

    # ------------------------------------------------------------------ acquire
    def acquire(self, wait: bool = False) -> "DirLock":
        if self.held:
            raise RuntimeError(f"{self.path}: already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = self._mode or lock_mode()
        deadline = time.monotonic() + self.timeout
        if mode != "file":
            refused = self._acquire_flock(wait, deadline)
            if refused is None:
                return self
            if mode == "flock":
                raise LockError(f"{self.path}: the file system refuses flock ({refused}); set {MODE_ENV}=file "
                                f"(on every host sharing it) to use lock files with leases")
            _note_once(self.path.parent, f"the file system refuses flock ({refused}); using lock files "
                                         f"with {self.lease_s:.0f}s leases ({LEASE_ENV})")
        self._acquire_file(wait, deadline)
        return self

    def _acquire_flock(self, wait: bool, deadline: float) -> Optional[str]:
        """None when held; the reason when the file system refuses flock."""
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if not self._lease_file_live():
                        break
                    fcntl.flock(fd, fcntl.LOCK_UN)  # a lock-file holder (another host's mode) has it
                    busy = self.holder()
                except OSError as e:
                    if e.errno in FLOCK_REFUSED:
                        os.close(fd)
                        return e.strerror or errno.errorcode.get(e.errno, str(e.errno))
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    busy = None
                if not wait or time.monotonic() > deadline:
                    raise LockBusy(f"{self.path} is locked by {busy or self.holder()}") from None
                time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        me = Owner.me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": me.pid, "host": me.host, "start": me.start, "what": self.what,
                                  "since": time.time()}).encode(), 0)
        self._fd, self._pid, self.mode_used = fd, os.getpid(), "flock"
        return None

    def _lease_file_live(self) -> bool:
        """A lease next to a flock file: a host that uses lock files holds it unless provably gone."""
        snap = _snapshot(self.lease_path)
        if snap is None:
            return False
        rec = _record(snap[0])
        owner = _owner_of(rec)
        if owner is not None and owner.local:
            return not owner.is_dead()
        return not lease_expired_by_clock(rec, self.lease_s)

    def _acquire_file(self, wait: bool, deadline: float) -> None:
        watch, noted, named = _Watch(), False, None
        if not wait:  # a lease that looks expired is watched for one lease (and a bit) at most
            deadline = time.monotonic() + 1.5 * self.lease_s
        while True:
            fd = _create(self.lease_path)
            if fd is not None:
                self._lease = _Lease(self.lease_path, fd, self.what, self.lease_s)
                self._pid, self.mode_used = os.getpid(), "file"
                _Heart.add(self._lease)
                return
            snap = _snapshot(self.lease_path)
            if snap is None:
                continue  # released meanwhile
            named = _record(snap[0]) or named  # a read torn by a network file system keeps the last name seen
            verdict = self._verdict(snap, watch, wait)
            if verdict == "stale":
                self._take_over(snap)
                continue
            if verdict == "live" or time.monotonic() > deadline:
                raise LockBusy(self._busy_message(named))
            if not wait and not noted:
                noted = True
                print(f"note: {self.lease_path}: {describe(_record(snap[0]))}: its heartbeat is older than the "
                      f"lease by its own clock; watching it for up to {self.lease_s:g}s before taking over",
                      file=sys.stderr, flush=True)
            time.sleep(min(0.5, self.lease_s / 20))

    def _verdict(self, snap, watch: _Watch, wait: bool) -> str:
        """stale (take it over), live (give up now) or wait (look again)."""
        rec = _record(snap[0])
        owner = _owner_of(rec)
        if owner is not None and owner.local:
            return "stale" if owner.is_dead() else ("wait" if wait else "live")
        if watch.see(snap) >= self.lease_s:
            return "stale"  # no heartbeat for a whole lease, by this process's own clock
        if not wait and rec is not None and not lease_expired_by_clock(rec, self.lease_s):
            return "live"
        return "wait"

    def _take_over(self, snap) -> None:
        with _Guard(self.lease_path):
            if _snapshot(self.lease_path) != snap:
                return  # it beat, was released or was taken over meanwhile: look again
            os.unlink(self.lease_path)
        print(f"note: took over the lock {self.lease_path} from {describe(_record(snap[0]))}: its holder is gone",
              file=sys.stderr, flush=True)

    def _busy_message(self, rec: Optional[dict]) -> str:
        owner = _owner_of(rec)
        where = "this host" if owner is not None and owner.local else (owner.host if owner else "an unknown host")
        return (f"{self.path} is locked by {describe(rec)} [lock file {self.lease_path}]. It is taken over "
                f"automatically once its holder is gone (on another host: {self.lease_s:g}s without a heartbeat). "
                f"If you are sure no process on {where} uses it, remove {self.lease_path}")

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            _Heart.remove(lease)
            try:
                if os.getpid() == self._pid and not lease.lost:
                    with _Guard(self.lease_path):
                        if lease.ours():
                            os.unlink(self.lease_path)
            finally:
                with lease.mu:
                    os.close(lease.fd)
                    lease.fd = -1
            if self.remove and os.getpid() == self._pid:
                _unlink_quietly(self.path)
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid:  # a fork shares the lock; unlocking here would free the parent's
            os.close(fd)
            return
        if self.remove:
            _unlink_quietly(self.path)  # before unlocking: a prober opening it later makes a new file
        else:
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


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


_NOTED: set[str] = set()


def _note_once(where: Path, text: str) -> None:
    key = f"{where}:{text}"
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"note: {where}: {text}", file=sys.stderr, flush=True)
