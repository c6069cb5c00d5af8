"""Waiting for a child started with start_new_session=True (a launcher and its workers)."""
import os
import signal
import subprocess


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait; on a timeout stop the whole process group (the launcher's workers too), then re-raise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
