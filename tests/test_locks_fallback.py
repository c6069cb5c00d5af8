"""Issue 19 (+22): locks without flock (lease files), symlinked lock files, leftovers of dead workers."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from schemas.locks import DirLock, LockBusy, LockError, Owner, _record, _snapshot

ROOT = Path(__file__).resolve().parents[1]
OTHER = "otherhost.example"


@pytest.fixture
def no_flock(monkeypatch):
    """A file system that refuses flock (Lustre without -o flock): every flock call fails with ENOLCK."""
    import schemas.locks as locks

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.delenv("EAGLE3_LOCK_MODE", raising=False)


def _lease(path: Path, *, host: str = OTHER, pid: int = 4242, beat: int = 0, beat_at: float | None = None,
           lease_s: float = 0.5) -> None:
    rec = {"pid": pid, "host": host, "start": 7, "what": "extract worker 0/1", "since": time.time() - 60,
           "nonce": "remote", "beat": beat, "beat_at": time.time() if beat_at is None else beat_at,
           "lease_s": lease_s}
    path.parent.mkdir(parents=True, exist_ok=True)
    # one pwrite of a whole padded record over the old one, as a real holder's heartbeat does: a truncate
    # and a write would let a reader see an empty lease between the two (that made this test flaky)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, json.dumps(rec).ljust(1024).encode(), 0)
    finally:
        os.close(fd)


class RemoteHolder:
    """A holder on another host: rewrites its lease's heartbeat until stopped (as its heartbeat thread would)."""

    def __init__(self, path: Path, lease_s: float):
        self.path, self.lease_s, self.stop = path, lease_s, threading.Event()
        _lease(path, lease_s=lease_s)
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        beat = 0
        while not self.stop.wait(self.lease_s / 10):
            beat += 1
            _lease(self.path, beat=beat, beat_at=time.time() - 3600, lease_s=self.lease_s)  # its clock is 1 h off

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def test_flock_refused_falls_back_to_a_lease_file_that_names_its_holder(tmp_path, no_flock, capsys):
    p = tmp_path / ".locks" / "cache"
    a = DirLock(p, "extract worker 0/2").acquire()
    assert a.mode_used == "file" and "refuses flock (No locks available); using lock files" in capsys.readouterr().err
    rec = _record(_snapshot(p.with_name("cache.lease"))[0])
    me = Owner.me()
    assert (rec["host"], rec["pid"], rec["start"], rec["what"]) == (me.host, me.pid, me.start, "extract worker 0/2")
    with pytest.raises(LockBusy) as ei:
        DirLock(p, "extract worker 1/2").acquire()
    msg = str(ei.value)
    assert f"is locked by pid {me.pid} on {me.host} (extract worker 0/2, since" in msg
    assert f"If you are sure no process on this host uses it, remove {p}.lease" in msg
    with pytest.raises(LockBusy):  # a waiter gives up at its timeout: the holder is alive
        DirLock(p, "waiter", timeout=0.3).acquire(wait=True)
    a.release()
    assert not p.with_name("cache.lease").exists()
    with DirLock(p, "again"):
        pass


def test_flock_mode_forced_where_flock_is_refused_is_a_clear_error(tmp_path, no_flock, monkeypatch):
    monkeypatch.setenv("EAGLE3_LOCK_MODE", "flock")
    with pytest.raises(LockError, match=r"refuses flock \(No locks available\); set EAGLE3_LOCK_MODE=file"):
        DirLock(tmp_path / "l", "x").acquire()


def test_a_dead_lease_holder_on_this_host_is_taken_over_at_once(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys, time; sys.path.insert(0, %r); from schemas.cache import cache_lock; "
            "l = cache_lock(%r).acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(cache))
    env = {**os.environ, "EAGLE3_LOCK_MODE": "file"}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        lock = DirLock(cache / ".locks" / "cache", "mine", mode="file")
        with pytest.raises(LockBusy, match=rf"locked by pid {p.pid} on "):
            lock.acquire()
    finally:
        p.kill()
        p.wait()
    lock.acquire()  # no waiting: pid + start time prove the holder is gone
    assert lock.held and _record(_snapshot(lock.lease_path)[0])["pid"] == os.getpid()
    lock.release()


def test_a_live_lease_on_another_host_is_never_taken_over_and_a_silent_one_is(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE3_LOCK_SKEW_S", "0.1")
    # leases of 1 s against a heartbeat every 0.1 s: a loaded CI core stalling the holder thread for a
    # whole second is what it would take to see a false takeover
    p = tmp_path / "l"
    with RemoteHolder(p.with_name("l.lease"), lease_s=1.0):
        # its heartbeat looks an hour old by its own (wrong) clock, but it moves: never taken over
        t0 = time.monotonic()
        with pytest.raises(LockBusy, match=rf"locked by pid 4242 on {OTHER} .*remove {p}.lease"):
            DirLock(p, "waiter", mode="file", lease_s=1.0, timeout=2.5).acquire(wait=True)
        with pytest.raises(LockBusy):  # the no-wait path watches it for a lease before giving up
            DirLock(p, "impatient", mode="file", lease_s=1.0).acquire()
        assert time.monotonic() - t0 >= 2.5
        assert _record(_snapshot(p.with_name("l.lease"))[0])["nonce"] == "remote"
    # the holder stops beating (its host died): taken over after a whole lease without a heartbeat
    lock = DirLock(p, "waiter", mode="file", lease_s=1.0, timeout=10).acquire(wait=True)
    rec = _record(_snapshot(p.with_name("l.lease"))[0])
    assert rec["pid"] == os.getpid() and rec["nonce"] != "remote"
    lock.release()


def test_a_fresh_lease_on_another_host_fails_a_no_wait_acquire_at_once(tmp_path):
    p = tmp_path / "claim-0-of-1"
    _lease(p.with_name("claim-0-of-1.lease"), lease_s=120)
    t0 = time.monotonic()
    with pytest.raises(LockBusy, match=rf"pid 4242 on {OTHER} .*last heartbeat \d+s ago"):
        DirLock(p, "extract worker 0/1", mode="file").acquire()
    assert time.monotonic() - t0 < 60  # not a whole lease of watching


def test_a_holder_frozen_past_its_lease_learns_that_it_lost_the_lock(tmp_path, capsys):
    p = tmp_path / "l"
    lock = DirLock(p, "slow", mode="file", lease_s=600).acquire()
    os.unlink(lock.lease_path)  # what a take-over does after a whole lease without heartbeats
    _lease(lock.lease_path)
    lock._lease.beat()
    assert lock.lost and "lost the lock" in capsys.readouterr().err
    lock.release()
    assert _record(_snapshot(lock.lease_path)[0])["nonce"] == "remote"  # the new holder's lease is left alone


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, mode):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me\n")
    p = tmp_path / "cache" / ".locks" / "cache"
    p.parent.mkdir(parents=True)
    (p if mode == "flock" else p.with_name("cache.lease")).symlink_to(victim)
    with pytest.raises(LockError, match=r"is a symbolic link: lock files are never followed"):
        DirLock(p, "x", mode=mode).acquire()
    assert victim.read_text() == "do not truncate me\n"


# --------------------------------------------------------------------------- leftovers of dead workers


def _temp_shard(cache: Path, k: int, token: str, nbytes: int = 3000, age: float = 0.0) -> Path:
    d = cache / "shards" / f".tmp-{k:05d}-{token}.zarr"
    (d / "hidden" / "c" / "0" / "0").mkdir(parents=True)
    f = d / "hidden" / "c" / "0" / "0" / "0"
    f.write_bytes(b"x" * nbytes)
    if age:
        old = time.time() - age
        for q in [d, *d.rglob("*")]:
            os.utime(q, (old, old))
    return d


def test_temporary_shards_of_gone_workers_on_other_hosts_are_reclaimed_and_live_ones_kept(tmp_path, monkeypatch):
    from schemas.leftovers import find_leftovers, reclaim

    monkeypatch.setenv("EAGLE3_LOCK_LEASE_S", "30")
    monkeypatch.setenv("EAGLE3_LOCK_SKEW_S", "30")
    cache = tmp_path / "cache"
    locks = cache / ".locks"
    live_lease = _temp_shard(cache, 0, f"{OTHER}-11-1")
    _lease(locks / f"owner-{OTHER}-11-1.lease", pid=11, lease_s=30)
    dead_lease = _temp_shard(cache, 1, f"{OTHER}-12-1")
    _lease(locks / f"owner-{OTHER}-12-1.lease", pid=12, beat_at=time.time() - 600, lease_s=30)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(locks / f"owner-{OTHER}-13-1")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        flock_held = _temp_shard(cache, 2, f"{OTHER}-13-1", age=3600)
        free_but_fresh = _temp_shard(cache, 5, f"{OTHER}-16-1")
        (locks / f"owner-{OTHER}-16-1").write_text("")  # a flock nobody holds (from here), dir just written
        no_lock_old = _temp_shard(cache, 3, f"{OTHER}-14-1", age=3600)
        no_lock_new = _temp_shard(cache, 4, f"{OTHER}-15-1")
        states = {lo.path.name: (lo.state, lo.bytes) for lo in find_leftovers(cache)}
        assert states == {live_lease.name: ("alive", 3000), dead_lease.name: ("dead", 3000),
                          flock_held.name: ("alive", 3000), no_lock_old.name: ("dead", 3000),
                          no_lock_new.name: ("alive", 3000), free_but_fresh.name: ("alive", 3000)}
        assert sorted(p.name for p in reclaim(cache)) == sorted([dead_lease.name, no_lock_old.name])
        assert live_lease.is_dir() and flock_held.is_dir() and no_lock_new.is_dir() and free_but_fresh.is_dir()
        assert not (locks / f"owner-{OTHER}-12-1.lease").exists()
    finally:
        holder.kill()
        holder.wait()
    # the flock holder died: its lock is free, its temporary shard goes
    assert [p.name for p in reclaim(cache, 2)] == [flock_held.name]
    assert not (locks / f"owner-{OTHER}-13-1").exists()


def test_shards_verify_lists_leftovers_with_their_size(tmp_path):
    from typer.testing import CliRunner

    from cachefix import build_cache
    from pipeline.cli import app

    cache, _ = build_cache(tmp_path / "c", n_samples=6, samples_per_shard=3, topk=4)
    _temp_shard(cache, 1, f"{OTHER}-77-5", nbytes=5000, age=3600)
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = _temp_shard(cache, 0, Owner(Owner.me().host, dead.pid, 1).token(), nbytes=2048)
    res = CliRunner().invoke(app, ["shards", "verify", str(cache)])
    assert res.exit_code == 0, res.output  # leftovers are ignored by readers: not a failure
    out = " ".join(res.output.split())
    assert (f"leftover .tmp-00001-{OTHER}-77-5.zarr: 4.9 KB, temporary shard of pid 77 on {OTHER}: its owner "
            f"holds no lock and nothing in it changed for") in out
    assert f"leftover {mine.name}: 2.0 KB, temporary shard of pid {dead.pid} on {Owner.me().host}: its process is " \
           f"gone; the next `eagle3 extract` removes it" in out
    res = CliRunner().invoke(app, ["shards", "verify", str(cache), "--json"])
    rows = json.loads(res.stdout)["leftovers"]
    assert sorted((r["name"], r["bytes"], r["state"]) for r in rows) == \
        sorted([(f".tmp-00001-{OTHER}-77-5.zarr", 5000, "dead"), (mine.name, 2048, "dead")])


def test_a_flock_taker_respects_a_live_lease_of_a_host_that_uses_lock_files(tmp_path):
    p = tmp_path / "cache"
    _lease(p.with_name("cache.lease"), lease_s=120)  # a host where flock is refused holds it
    with pytest.raises(LockBusy, match=rf"locked by pid 4242 on {OTHER} .*\[lock file {p}.lease\]"):
        DirLock(p, "here", mode="flock").acquire()
    _lease(p.with_name("cache.lease"), beat_at=time.time() - 3600, lease_s=120)  # long gone
    DirLock(p, "here", mode="flock").acquire().release()


def test_a_torn_read_of_the_lease_keeps_the_holders_name_in_the_busy_message(tmp_path, monkeypatch):
    """A network file system can show a reader a lease mid-update (empty); the error still names the holder."""
    import schemas.locks as locks

    p = tmp_path / "l"
    _lease(p.with_name("l.lease"), lease_s=120)
    real, reads = locks._snapshot, []

    def torn_after_first(path):
        snap = real(path)
        reads.append(path)
        return snap if len(reads) == 1 else (b"", snap[1], snap[2] + len(reads))  # empty, and it "moved"

    monkeypatch.setattr(locks, "_snapshot", torn_after_first)
    with pytest.raises(LockBusy) as ei:
        DirLock(p, "waiter", mode="file", lease_s=120, timeout=0.3).acquire(wait=True)
    assert len(reads) > 1
    assert f"is locked by pid 4242 on {OTHER} (extract worker 0/1, since" in str(ei.value)
