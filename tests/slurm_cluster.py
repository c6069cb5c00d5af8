"""A real one-node Slurm on localhost for tests: munged + slurmctld + slurmd, no systemd.

Usage in a test module:  `from slurm_cluster import slurm_cluster  # noqa: F401` and
take the `slurm_cluster` fixture (a SlurmCluster with .env for subprocesses). Everything
(config, key, state, spool, pids, logs, socket) lives in a temp dir; the daemons are
started in the foreground as children of the test process and stopped by pid at the
end. Skips cleanly when munge/slurm-wlm are absent (install: .ci/install-slurm) or
when the daemons cannot start (e.g. not root).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """The machine's node description as slurmd itself sees it (slurmd -C)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    first = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), None)
    if first is None:
        raise RuntimeError(f"slurmd -C printed no NodeName line: {out!r}")
    parts = dict(p.split("=", 1) for p in first.split())
    parts["NodeName"] = socket.gethostname().split(".")[0]
    # Leave some memory to the OS so --mem requests validate against a sane RealMemory.
    return " ".join(f"{k}={v}" for k, v in parts.items()) + " State=UNKNOWN"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict
    host: str
    procs: list = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def log(self, name: str) -> str:
        p = self.root / "log" / name
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no job of ours is pending or running."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            q = self.run("squeue", "-h", "-o", "%i %T", check=False)
            if q.returncode == 0 and not q.stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError(f"jobs still queued after {timeout}s:\n{q.stdout}")

    def job_state(self, job_id: str) -> str:
        """State of a job (or array task, '123_1') from scontrol, which keeps finished jobs MinJobAge s."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"


def _start(root: Path) -> SlurmCluster:
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    sock = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=eagle3test",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={sock}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MinJobAge=3600",           # finished jobs stay visible to scontrol (no accounting db here)
        "SchedulerParameters=defer_batch=0",
        "InactiveLimit=0",
        "KillWait=5",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        _node_line(),
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    cl = SlurmCluster(root=root, conf=conf, env=env, host=host)
    logs = root / "log"
    cl.procs.append(subprocess.Popen(
        ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={logs / 'munged.log'}",
         f"--seed-file={root / 'munge' / 'munge.seed'}"],
        stdout=subprocess.DEVNULL, stderr=open(logs / "munged.err", "w")))
    _wait(lambda: sock.exists(), 20, "munged did not create its socket", cl, "munged.log")
    cl.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(logs / "slurmctld.err", "w")))
    _wait(lambda: cl.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0, 30,
          "slurmctld did not answer scontrol ping", cl, "slurmctld.log")
    cl.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(logs / "slurmd.err", "w")))

    def node_idle() -> bool:
        r = cl.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip().startswith("idle")

    _wait(node_idle, 60, "the node never became idle", cl, "slurmd.log")
    return cl


def _wait(cond, timeout: float, what: str, cl: SlurmCluster, log: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.poll() is not None for p in cl.procs):
            break
        try:
            if cond():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.3)
    tail = cl.log(log)[-3000:]
    _stop(cl)
    raise RuntimeError(f"{what} (see {cl.root / 'log'}):\n{tail}")


def _stop(cl: SlurmCluster) -> None:
    # Our own jobs first (the cluster and every job on it are this fixture's), then our daemons by pid.
    try:
        cl.run("scancel", "--user", str(os.getuid()), check=False, timeout=20)
        t0 = time.time()
        while time.time() - t0 < 20:
            q = cl.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.5)
    except (subprocess.SubprocessError, OSError):
        pass
    for p in reversed(cl.procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}; run .ci/install-slurm)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm test cluster runs its daemons as root")
    # Short path: munge and slurm sockets have length limits.
    root = Path(tmp_path_factory.mktemp("slurm"))
    try:
        cl = _start(root)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"could not start a local Slurm: {e}")
    yield cl
    _stop(cl)
