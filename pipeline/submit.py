"""`eagle3 submit CONFIG --executor slurm|local [--dry-run]` and `eagle3 jobs status RUN`.

The stages become batch jobs through submitit:

  regenerate (1 task, when data.regenerate.enabled)
    └─afterok─ extract: a job array of jobs.extract.tasks tasks, one per GPU; task r of W
               extracts the shards k with k mod W == r (SLURM_ARRAY_TASK_ID/COUNT -> worker r/W)
                 └─afterok (every array task)─ train: jobs.train.nodes x gpus_per_node ranks, torchrun
                                               on every node (one node, <= 1 GPU: in-process)
                                                 └─afterok─ eval (1 task)

The train job has one Slurm task per node; each runs torchrun for that node's ranks, with
the node rank from SLURM_NODEID and the rendezvous at the first host of SLURM_JOB_NODELIST
(`slurm_node`), and asks for the CPUs its ranks keep busy (`train_cpus`).

`--kill-on-invalid-dep=yes` makes Slurm cancel a job whose dependency failed, so a
failed stage-1 task leaves stage 2 cancelled, never started (not pending forever).
Every job runs from the config frozen at submission (<jobs dir>/config.yaml) in the
submission directory, and skips a stage already done (pipeline markers), so a
resubmission after a failure redoes only what is missing. Submitted job ids and log
paths go to <jobs dir>/jobs.json (jobs dir = jobs.log_dir or <run dir>/jobs).

The local executor runs the same jobs on this machine with submitit's LocalExecutor,
stage after stage (it has no dependencies), the stage-1 workers side by side.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from schemas.config import RunConfig, dump_config, load_config

from pipeline.run import effective_config, run_dir, run_stage, stage_done, write_marker

JOBS_JSON = "jobs.json"


class SubmitError(RuntimeError):
    pass


def check_script_value(key: str, value: Any) -> None:
    """A value bound for a generated job script: one line, no NUL (a line break would end its
    quoted '#SBATCH' value and start a shell command)."""
    items = value.items() if isinstance(value, dict) else ([(None, v) for v in value]
                                                           if isinstance(value, (list, tuple)) else [(None, value)])
    for sub, v in items:
        name = key if sub is None else f"{key}.{sub}"
        if sub is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(sub)):
            raise SubmitError(f"{name}: not a valid sbatch option name")
        if isinstance(v, (list, tuple, dict)):
            check_script_value(name, v)
        elif any(c in str(v) for c in ("\n", "\r", "\x00")):
            raise SubmitError(f"{name}: {str(v)!r} contains a newline, carriage return or NUL byte; it would "
                              "break the generated job script")


def jobs_dir(cfg: RunConfig) -> Path:
    return Path(cfg.jobs.log_dir) if cfg.jobs.log_dir else run_dir(cfg) / "jobs"


def time_minutes(spec: str) -> int:
    """Slurm time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    s = str(spec).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise SubmitError(f"jobs.slurm.time '{spec}' is not a Slurm time (e.g. 04:00:00 or 1-12:00:00)")
    d, a, b, c = m.groups()
    if d is not None:  # D-HH[:MM[:SS]]
        mins = int(d) * 1440 + int(a) * 60 + int(b or 0) + (1 if c and int(c) else 0)
    elif c is not None:  # HH:MM:SS
        mins = int(a) * 60 + int(b) + (1 if int(c) else 0)
    elif b is not None:  # MM:SS
        mins = int(a) + (1 if int(b) else 0)
    else:
        mins = int(a)
    return max(mins, 1)


def parse_extra_sbatch(lines: list[str]) -> dict[str, Any]:
    """'#SBATCH --qos=high', '--exclusive', 'constraint=a100' -> {'qos': 'high', 'exclusive': True, ...}."""
    out: dict[str, Any] = {}
    for raw in lines:
        s = raw.strip()
        if s.upper().startswith("#SBATCH"):
            s = s[len("#SBATCH"):].strip()
        if not s.startswith("-"):
            s = "--" + s
        if s.startswith("--"):
            body = s[2:]
            key, sep, val = body.partition("=")
            if not sep and " " in body:
                key, _, val = body.partition(" ")
                sep = " "
        else:  # short option such as '-C a100'
            key, _, val = s[1:].partition(" ")
            sep = bool(val)
        key = key.strip()
        if not key:
            raise SubmitError(f"jobs.slurm.extra_sbatch: cannot read '{raw}' (expected e.g. '--qos=high')")
        out[key] = val.strip() if sep else True
    return out


# --------------------------------------------------------------------------- what runs inside a job


# Rendezvous variables a submitting process may carry (e.g. after an in-process training run):
# a job inheriting them would take Slurm array tasks for torchrun ranks or reuse a busy port.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _enter(config_file: str, cwd: str) -> RunConfig:
    for k in LAUNCHER_ENV:  # jobs are never started by torchrun; the deepspeed launcher sets its own
        os.environ.pop(k, None)
    os.chdir(cwd)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_config(config_file)


def regenerate_task(config_file: str, cwd: str) -> str:
    cfg = _enter(config_file, cwd)
    return run_stage(cfg, "regenerate", progress=False).status


def extract_task(config_file: str, cwd: str, rank: int, world: int) -> str:
    """One stage-1 worker. Inside a Slurm array the worker comes from SLURM_ARRAY_TASK_ID/COUNT
    (stage 1's own rule); elsewhere from the (rank, world) the submitter passed."""
    from pipeline.run import do_extract

    cfg = _enter(config_file, cwd)
    if stage_done(cfg, "extract"):
        return "skipped"
    in_array = "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ
    if in_array:
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        if n != world:
            raise SubmitError(f"Slurm array has {n} tasks but {world} stage-1 workers were planned")
    from stage1_extract.workers import resolve_worker

    w = resolve_worker(None if in_array else (rank, world))
    print(f"[extract] worker {w} ({w.source})", flush=True)
    do_extract(cfg, progress=False, worker=None if in_array else (rank, world))
    return "ran"


def _finish_extract(cfg: RunConfig) -> None:
    """After every stage-1 task succeeded: the manifest (if two workers raced) and the pipeline marker."""
    from schemas.cache import build_manifest, committed_shards

    e = effective_config(cfg)
    caches = [e.extract.cache] + ([e.eval_cache] if e.data.eval else [])
    for c in caches:
        if committed_shards(c) and not (Path(c) / "manifest.parquet").is_file():
            build_manifest(c)
    if not stage_done(cfg, "extract"):
        write_marker(cfg, "extract", Path(cfg.extract.cache), seconds=None, by="submit")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(config_file: str, nodes: int, gpus: int, node_rank: Any = 0, master_addr: Any = "127.0.0.1",
                  master_port: Any = 29500, python: str = sys.executable) -> list[str]:
    """`torchrun` (torch.distributed.run of the job's python) running `eagle3 train` on this node.

    Every node runs the same command with its own node rank; torchrun's static rendezvous
    meets at master_addr:master_port, so nothing needs ssh or a hostfile.
    """
    return [python, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(max(1, gpus)), "--master_addr", str(master_addr), "--master_port",
            str(master_port), "-m", "pipeline.cli", "train", config_file, "--no-progress"]


def slurm_node(nodes: int) -> tuple[int, str, int]:
    """(node rank, master address, port) of this node of the train job, from Slurm's own variables:
    SLURM_NODEID, the first host of SLURM_JOB_NODELIST (as `scontrol show hostnames` expands it),
    a port derived from SLURM_JOB_ID (every node computes the same one)."""
    from submitit.slurm.slurm import _parse_node_list

    env = os.environ
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST") if k not in env]
    if missing:
        raise SubmitError(f"the train job runs on {nodes} node(s) but {', '.join(missing)} is not set: a "
                          "multi-node training runs as a Slurm job (`eagle3 submit --executor slurm`)")
    have = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or nodes)
    if have != nodes:
        raise SubmitError(f"jobs.train.nodes is {nodes} but the Slurm job has {have} node(s)")
    hosts = _parse_node_list(env["SLURM_JOB_NODELIST"])
    jid = int(re.sub(r"\D", "", env["SLURM_JOB_ID"].split("_")[0]) or 0)
    return int(env["SLURM_NODEID"]), hosts[0], 20000 + jid % 20000


def train_task(config_file: str, cwd: str) -> str:
    """Stage 2: in this process (one node, <= 1 GPU), else torchrun on every node of the job."""
    cfg = _enter(config_file, cwd)
    nodes, gpus = cfg.jobs.train.nodes, cfg.jobs.train.gpus_per_node
    # one node: its own rendezvous on a free local port; several: Slurm says which node this is
    node_rank, master, port = slurm_node(nodes) if nodes > 1 else (0, "127.0.0.1", _free_port())
    if node_rank == 0:  # one writer for the manifest and the stage-1 marker
        _finish_extract(cfg)
    if stage_done(cfg, "train"):
        return "skipped"
    if nodes == 1 and gpus <= 1:
        return run_stage(cfg, "train", progress=False).status
    cmd = train_command(config_file, nodes, gpus, node_rank, master, port)
    print("+", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    if node_rank == 0:
        write_marker(cfg, "train", Path(cfg.train.output), seconds=round(time.perf_counter() - t0, 3), by="submit")
    return "ran"


def eval_task(config_file: str, cwd: str) -> str:
    cfg = _enter(config_file, cwd)
    return run_stage(cfg, "eval", progress=False).status


# --------------------------------------------------------------------------- planning


@dataclass
class JobSpec:
    stage: str
    fn: Callable
    args: list[tuple]            # one tuple per task; more than one -> a job array
    params: dict                  # sbatch parameters (submitit names)
    after: Optional[str] = None   # stage this one waits for (afterok)
    dep_type: str = "afterok"
    describe: str = ""


def slurm_params(cfg: RunConfig, stage: str, *, nodes: int = 1, gpus: Optional[int] = None,
                 gpus_per_node: Optional[int] = None) -> dict:
    s = cfg.jobs.slurm
    p: dict[str, Any] = {"job_name": f"eagle3-{cfg.name}-{stage}", "time": time_minutes(s.time),
                         "nodes": nodes, "ntasks_per_node": 1, "cpus_per_task": s.cpus_per_task}
    if s.partition:
        p["partition"] = s.partition
    if s.account:
        p["account"] = s.account
    g = s.gpus_per_task if gpus is None else gpus
    if gpus_per_node:
        p["gpus_per_node"] = gpus_per_node
    elif g:
        p["gpus_per_task"] = g
    if s.setup:
        p["setup"] = list(s.setup)
    extra: dict[str, Any] = {}
    if s.mem:
        extra["mem"] = s.mem
    extra["kill-on-invalid-dep"] = "yes"
    extra.update(parse_extra_sbatch(s.extra_sbatch))
    p["additional_parameters"] = extra
    for key, value in p.items():
        check_script_value(f"sbatch {key}", value)
    return p


def train_cpus(cfg: RunConfig) -> int:
    """CPUs of one train node (its one Slurm task runs every rank of the node): jobs.train.cpus_per_gpu
    per rank, by default what a rank keeps busy: the training loop, train.loader_threads decode threads,
    the loader's row reader and collate threads (or train.num_workers DataLoader processes)."""
    jt, tc = cfg.jobs.train, cfg.train
    per_rank = jt.cpus_per_gpu or (1 + (tc.num_workers if tc.num_workers > 0 else tc.loader_threads + 2))
    return max(1, jt.gpus_per_node) * per_rank


def plan(cfg: RunConfig, config_file: str, cwd: str) -> list[JobSpec]:
    specs: list[JobSpec] = []
    prev = None
    if cfg.data.regenerate.enabled:
        specs.append(JobSpec("regenerate", regenerate_task, [(config_file, cwd)], slurm_params(cfg, "regenerate"),
                             describe="pipeline.submit.regenerate_task: answer regeneration (stage 0)"))
        prev = "regenerate"
    W = cfg.jobs.extract.tasks
    specs.append(JobSpec("extract", extract_task, [(config_file, cwd, r, W) for r in range(W)],
                         slurm_params(cfg, "extract"), after=prev,
                         describe=f"pipeline.submit.extract_task: stage 1, {W} task(s); worker r/W from "
                                  f"SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"))
    n, g = cfg.jobs.train.nodes, cfg.jobs.train.gpus_per_node
    how = (f"torchrun on each of {n} node(s) x {g} GPU(s): "
           + shlex.join(train_command(config_file, n, g, "$SLURM_NODEID", "<first host of $SLURM_JOB_NODELIST>",
                                      "<20000 + $SLURM_JOB_ID % 20000>", python="python")) if (n > 1 or g > 1)
           else "eagle3 train in-process (one node, <= 1 GPU)")
    params = slurm_params(cfg, "train", nodes=n, gpus_per_node=g if g > 0 else None, gpus=0 if g == 0 else None)
    params["cpus_per_task"] = train_cpus(cfg)
    specs.append(JobSpec("train", train_task, [(config_file, cwd)], params, after="extract",
                         describe=f"pipeline.submit.train_task: stage 2, {how}"))
    if cfg.eval.prompts:
        specs.append(JobSpec("eval", eval_task, [(config_file, cwd)], slurm_params(cfg, "eval"), after="train",
                             describe="pipeline.submit.eval_task: stage 3"))
    return specs


def sbatch_text(spec: JobSpec, folder: Path, dependency: Optional[str], python: Optional[str] = None) -> str:
    """The sbatch script submitit writes for this job (without submitting anything)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(spec.params)
    if dependency:
        params["dependency"] = dependency
    if len(spec.args) > 1:
        params["map_count"] = len(spec.args)
    py = python or shlex.quote(sys.executable)
    command = " ".join([py, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


def freeze_config(cfg: RunConfig, jdir: Path) -> Path:
    jdir.mkdir(parents=True, exist_ok=True)
    p = jdir / "config.yaml"
    p.write_text(dump_config(cfg))
    return p


# --------------------------------------------------------------------------- submitting


def _dep(records: dict, spec: JobSpec) -> Optional[str]:
    if spec.after is None or spec.after not in records:
        return None
    return f"{spec.dep_type}:{records[spec.after]['job_id']}"


def _job_record(spec: JobSpec, jobs: list, folder: Path, dependency: Optional[str]) -> dict:
    main = str(jobs[0].job_id).split("_")[0]
    return {"stage": spec.stage, "job_id": main, "array": len(jobs) > 1,
            "tasks": [str(j.job_id) for j in jobs], "dependency": dependency, "folder": str(folder),
            "stdout": [str(j.paths.stdout) for j in jobs], "stderr": [str(j.paths.stderr) for j in jobs],
            "describe": spec.describe}


def submit_specs(specs: list[JobSpec], jdir: Path, executor: str, *, dry_run: bool = False,
                 log: Callable[[str], None] = print, meta: Optional[dict] = None) -> dict:
    """Submit (or print) the jobs of `specs` in order, each depending on its `after` stage."""
    if dry_run:
        fake: dict[str, dict] = {}
        for spec in specs:
            folder = jdir / spec.stage / "%j"
            dep = _dep(fake, spec)
            if executor == "slurm":
                log(f"# ===== {spec.stage}: {spec.describe}" + (f" [{dep}]" if dep else ""))
                log(sbatch_text(spec, folder, dep))
            else:
                log(f"# ===== {spec.stage} (local, {len(spec.args)} process(es)): {spec.describe}")
            fake[spec.stage] = {"job_id": f"<{spec.stage} job id>"}
        return {"dry_run": True}

    import submitit

    records: dict[str, dict] = {}
    for spec in specs:
        folder = jdir / spec.stage / "%j"
        dep = _dep(records, spec) if executor == "slurm" else None  # locally: in sequence, after the previous stage
        if executor == "slurm":
            ex = submitit.SlurmExecutor(folder=folder)
            params = dict(spec.params)
            if dep:
                params["dependency"] = dep
            ex.update_parameters(**params)
        else:
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=spec.params.get("time", 60 * 24), nodes=1, tasks_per_node=1,
                                 gpus_per_node=0)
        if len(spec.args) > 1:
            jobs = ex.map_array(spec.fn, *zip(*spec.args))
        else:
            jobs = [ex.submit(spec.fn, *spec.args[0])]
        rec = _job_record(spec, jobs, folder, dep)
        records[spec.stage] = rec
        log(f"[{spec.stage}] submitted {executor} job {rec['job_id']}"
            + (f" ({len(jobs)} {'array tasks' if executor == 'slurm' else 'processes'})" if len(jobs) > 1 else "") + (f", {dep}" if dep else ""))
        if executor == "local":  # no dependencies locally: wait, and stop at the first failure
            states = []
            for j in jobs:
                try:
                    j.result()
                    states.append("COMPLETED")
                except Exception as e:  # noqa: BLE001 - submitit wraps the job's own error
                    states.append("FAILED")
                    rec["error"] = str(e)[-4000:]
            rec["states"] = states
            _write_jobs_json(jdir, executor, records, meta)
            if "FAILED" in states:
                log(f"[{spec.stage}] failed; later stages not started. Logs: {rec['stderr'][states.index('FAILED')]}")
                break
        else:
            _write_jobs_json(jdir, executor, records, meta)
    return _write_jobs_json(jdir, executor, records, meta)


def _write_jobs_json(jdir: Path, executor: str, records: dict, meta: Optional[dict]) -> dict:
    p = jdir / JOBS_JSON
    history = []
    if p.is_file():
        try:
            old = json.loads(p.read_text())
            history = old.get("history", [])
            cur = old.get("current")
            if cur and cur.get("submitted_at") != (meta or {}).get("submitted_at"):
                history.append(cur)
        except (OSError, json.JSONDecodeError):
            pass
    current = {**(meta or {}), "executor": executor, "stages": list(records.values())}
    data = {"current": current, "history": history[-20:]}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, p)
    return current


def submit(cfg: RunConfig, *, executor: Optional[str] = None, dry_run: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Submit the pipeline of `cfg`; returns the jobs.json 'current' record."""
    executor = executor or cfg.jobs.executor
    if executor not in ("slurm", "local"):
        raise SubmitError(f"--executor must be slurm or local, not {executor!r}")
    if executor == "local" and cfg.jobs.train.nodes > 1:
        raise SubmitError(f"jobs.train.nodes is {cfg.jobs.train.nodes}: the local executor runs on this machine "
                          "only; use --executor slurm, or torchrun on each node (README, 'Many GPUs and nodes')")
    if executor == "slurm" and not dry_run:
        import shutil

        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch is not on PATH: this machine cannot submit Slurm jobs "
                              "(use --dry-run to see the scripts, or --executor local)")
    jdir = jobs_dir(cfg).resolve()
    cwd = str(Path.cwd())
    for key, value in (("jobs dir (jobs.log_dir or the run dir)", str(jdir)), ("working directory", cwd),
                       ("python executable", sys.executable)):
        check_script_value(key, value)
    cfg_file = str(jdir / "config.yaml")
    specs = plan(cfg, cfg_file, cwd)
    if not dry_run:
        freeze_config(cfg, jdir)
    meta = {"name": cfg.name, "config": cfg_file, "cwd": cwd,
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return submit_specs(specs, jdir, executor, dry_run=dry_run, log=log, meta=meta)


# --------------------------------------------------------------------------- status


def find_jobs_json(run: str) -> Path:
    """RUN: a run dir, its jobs dir, a jobs.json, a config file, or a run name (runs/NAME)."""
    p = Path(run)
    if p.is_file() and p.name == JOBS_JSON:
        return p
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return jobs_dir(load_config(p)) / JOBS_JSON
    for cand in (p / "jobs" / JOBS_JSON, p / JOBS_JSON, Path("runs") / run / "jobs" / JOBS_JSON):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no {JOBS_JSON} for '{run}' (looked in {p}/jobs, {p}, runs/{run}/jobs); "
                            f"submit first with `eagle3 submit CONFIG`")


def _run(cmd: list[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def slurm_states(job_id: str) -> dict[str, str]:
    """{job or array task id: state}: squeue for live jobs, then sacct, then scontrol (no accounting)."""
    states: dict[str, str] = {}
    out = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T|%r"])
    if out:
        for line in out.splitlines():
            jid, st, reason = (line.split("|") + ["", ""])[:3]
            states[jid.strip()] = st.strip() + (f" ({reason.strip()})" if reason.strip() not in ("", "None") else "")
    out = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "--format=JobID,State"])
    if out:
        for line in out.splitlines():
            jid, _, st = line.partition("|")
            states.setdefault(jid.strip(), st.strip())
    out = _run(["scontrol", "-o", "show", "job", job_id])
    if out:
        for line in out.splitlines():
            f = dict(t.split("=", 1) for t in line.split() if "=" in t)
            jid = f.get("JobId", "")
            if f.get("ArrayTaskId") and f.get("ArrayJobId"):
                jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
            if jid:
                states.setdefault(jid, f.get("JobState", "UNKNOWN"))
    # Pending array tasks not yet split out appear as 123_[0-3%4] (squeue) or 123_0-3%4 (scontrol).
    for jid, st in list(states.items()):
        m = re.fullmatch(r"(\d+)_\[?([\d,\-]+)(?:%\d+)?\]?", jid)
        if m and not jid.split("_")[1].isdigit():
            for part in m.group(2).split(","):
                lo, _, hi = part.partition("-")
                for t in range(int(lo), int(hi or lo) + 1):
                    states.setdefault(f"{m.group(1)}_{t}", st)
    return states


def job_status(run: str) -> list[dict]:
    """One row per job (or array task): stage, id, state, stdout/stderr paths."""
    data = json.loads(find_jobs_json(run).read_text())
    cur = data["current"]
    rows = []
    for st in cur["stages"]:
        live = slurm_states(st["job_id"]) if cur["executor"] == "slurm" else {}
        for i, tid in enumerate(st["tasks"]):
            if cur["executor"] == "slurm":
                state = live.get(tid) or (live.get(st["job_id"]) if not st["array"] else None) or "UNKNOWN"
            else:
                state = (st.get("states") or ["UNKNOWN"] * len(st["tasks"]))[i]
            rows.append({"stage": st["stage"], "job": tid, "state": state, "stdout": st["stdout"][i],
                         "stderr": st["stderr"][i]})
    return rows
