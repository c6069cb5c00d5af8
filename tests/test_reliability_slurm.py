"""Issue 14 point 8: no value of the config reaches a generated Slurm script as shell code."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from test_run import tiny_raw

FAKE = '#!/bin/bash\nprintf "%s\\n" "$(basename "$0")" "$@" >> "$FAKE_LOG"\n'


def _fake_bin(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "sbatch", "scontrol", "squeue"):
        p = d / name
        p.write_text(FAKE)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


def _scripts(cfg) -> list[str]:
    from pipeline.submit import submit

    lines: list[str] = []
    submit(cfg, executor="slurm", dry_run=True, log=lines.append)
    text = "\n".join(lines)
    return [m.group(0) for m in re.finditer(r"#!/bin/bash.*?(?=# ===== |\Z)", text, re.S)]


def _run_under_bash(script: str, tmp: Path) -> str:
    """Run a generated script with fake srun/sbatch first on PATH; returns what the fakes were called with."""
    log = tmp / "fake.log"
    log.unlink(missing_ok=True)
    f = tmp / "job.sh"
    f.write_text(script)
    env = {**os.environ, "PATH": f"{_fake_bin(tmp / 'bin')}:{os.environ['PATH']}", "FAKE_LOG": str(log)}
    subprocess.run(["bash", str(f)], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    return log.read_text() if log.is_file() else ""


def _hostile(tmp: Path, tiny_llama_dir, where: str, value_of) -> dict:
    raw = tiny_raw(tmp, tiny_llama_dir)
    raw["jobs"] = {"slurm": {"partition": "gpu", "time": "00:10:00"}}
    marker = tmp / f"PWNED-{where.replace('.', '_')}"
    value = value_of(str(marker))
    cur = raw
    *parents, last = where.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value
    return raw, marker


NEWLINE_CASES = {
    "name": lambda m: f"x\ntouch {m} #",
    "jobs.slurm.partition": lambda m: f"gpu\ntouch {m} #",
    "jobs.slurm.account": lambda m: f"acct\ntouch {m} #",
    "jobs.slurm.mem": lambda m: f"8G\ntouch {m} #",
    "jobs.slurm.extra_sbatch": lambda m: [f"--comment=x\ntouch {m} #"],
    "jobs.log_dir": lambda m: f"jobs\ntouch {m} #",
    "extract.cache": lambda m: f"run\ntouch {m} #/cache",
}


@pytest.mark.parametrize("where", list(NEWLINE_CASES))
def test_a_value_with_a_newline_is_refused_and_never_runs(tmp_path, tiny_llama_dir, where):
    from schemas.config import ConfigError, load_config

    raw, marker = _hostile(tmp_path, tiny_llama_dir, where, NEWLINE_CASES[where])
    try:
        cfg = load_config(raw=raw)
    except ConfigError as e:
        assert f"'{where}" in str(e) and "must be a single line" in str(e)
        return
    for script in _scripts(cfg):  # the original code: the script ran the injected line
        _run_under_bash(script, tmp_path)
        assert not marker.exists(), f"{where}: a value of the config ran as a shell command"


def test_quotes_dollars_and_backticks_stay_literal_under_bash(tmp_path, tiny_llama_dir):
    from schemas.config import load_config

    m = tmp_path / "PWNED"
    evil = f"a'$(touch {m})'`touch {m}`;touch {m}\"$(touch {m})\""
    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["name"] = f"n{evil}".replace("/", "_")
    raw["jobs"] = {"log_dir": str(tmp_path / f"jobs {evil}"),
                   "slurm": {"partition": evil, "account": evil, "mem": evil, "time": "00:10:00",
                             "extra_sbatch": [f"--comment={evil}"]}}
    scripts = _scripts(load_config(raw=raw))
    assert len(scripts) == 3
    for script in scripts:
        called = _run_under_bash(script, tmp_path)
        assert not m.exists()
        assert called.startswith("srun\n--unbuffered\n--output\n") and f"jobs {evil}" in called


def test_a_working_directory_with_a_newline_is_refused(tmp_path, tiny_llama_dir, monkeypatch):
    from pipeline.submit import SubmitError
    from schemas.config import load_config

    cfg = load_config(raw=tiny_raw(tmp_path, tiny_llama_dir))
    bad = tmp_path / "a\nb"
    bad.mkdir()
    monkeypatch.chdir(bad)
    with pytest.raises(SubmitError, match=r"^working directory: .* contains a newline"):
        _scripts(cfg)


def test_setup_lines_must_be_single_lines_and_extra_sbatch_must_be_options(tmp_path, tiny_llama_dir):
    from schemas.config import ConfigError, load_config

    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["jobs"] = {"slurm": {"setup": ["module load cuda\nsource .venv/bin/activate"]}}
    with pytest.raises(ConfigError, match=r"'jobs.slurm.setup': must be a single line"):
        load_config(raw=raw)
    raw["jobs"] = {"slurm": {"extra_sbatch": ["--qos$(touch x)=high"]}}
    with pytest.raises(ConfigError, match=r"'jobs.slurm.extra_sbatch': entry 0 .* is not an sbatch option"):
        load_config(raw=raw)
