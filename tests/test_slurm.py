"""`eagle3 submit` through a real local Slurm (munged + slurmctld + slurmd started by the fixture)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from test_run import clean_env, shard_checksums, tiny_raw

pytestmark = pytest.mark.slurm

SLURM_JOBS = {"executor": "slurm", "extract": {"tasks": 2},
              "slurm": {"cpus_per_task": 1, "gpus_per_task": 0, "mem": "2G", "time": "00:15:00",
                        "extra_sbatch": ["--comment=eagle3-test"]},
              "train": {"nodes": 1, "gpus_per_node": 0, "cpus_per_gpu": 1}}  # the test node has 2 CPUs


@pytest.fixture
def in_cluster_env(slurm_cluster, monkeypatch):  # noqa: F811
    """Submit from an environment pointing at the test cluster, without rendezvous leftovers."""
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


def test_dry_run_prints_array_dependent_jobs_and_deepspeed_launcher(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from test_run import write_config

    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["jobs"] = {"extract": {"tasks": 4}, "train": {"nodes": 2, "gpus_per_node": 8},
                   "slurm": {"partition": "gpu", "account": "proj", "time": "1-02:30:00", "mem": "80G",
                             "extra_sbatch": ["#SBATCH --qos=high", "--exclusive"],
                             "setup": ["module load cuda/12.4", "source .venv/bin/activate"]}}
    res = CliRunner().invoke(app, ["submit", str(write_config(tmp_path, raw)), "--executor", "slurm", "--dry-run"])
    assert res.exit_code == 0, res.output
    scripts = {m.group(1): m.group(2) for m in re.finditer(r"# ===== (\w+): (.*?)(?=# ===== |\Z)", res.output, re.S)}
    assert list(scripts) == ["extract", "train", "eval"]
    ex, tr, ev = scripts["extract"], scripts["train"], scripts["eval"]
    assert "#SBATCH --array=0-3%4" in ex and "--dependency" not in ex.split("#!/bin/bash")[1]
    assert "#SBATCH --gpus-per-task=1" in ex and "#SBATCH --partition=gpu" in ex and "#SBATCH --account=proj" in ex
    assert "#SBATCH --time=1590" in ex  # 1 day 2 h 30 min
    assert "#SBATCH --mem=80G" in ex and "#SBATCH --qos=high" in ex and "#SBATCH --exclusive" in ex
    assert "module load cuda/12.4\nsource .venv/bin/activate" in ex
    assert "#SBATCH --dependency='afterok:<extract job id>'" in tr and "#SBATCH --kill-on-invalid-dep=yes" in tr
    assert "#SBATCH --nodes=2" in tr and "#SBATCH --gpus-per-node=8" in tr
    assert "torch.distributed.run --nnodes 2 --node_rank '$SLURM_NODEID' --nproc_per_node 8" in tr
    assert "-m pipeline.cli train" in tr and "deepspeed" not in tr  # no hostfile needed (tests/test_many_ranks.py)
    assert "#SBATCH --dependency='afterok:<train job id>'" in ev
    assert not (tmp_path / "run" / "jobs" / "jobs.json").exists()  # a dry run submits nothing


def test_extra_sbatch_and_time_parsing():
    from pipeline.submit import SubmitError, parse_extra_sbatch, time_minutes

    assert parse_extra_sbatch(["#SBATCH --qos=high", "--exclusive", "constraint=a100", "--gres gpu:2"]) == {
        "qos": "high", "exclusive": True, "constraint": "a100", "gres": "gpu:2"}
    assert [time_minutes(t) for t in ("30", "04:00:00", "00:10:30", "2-00", "1-02:30:00", "5:00")] == [
        30, 240, 11, 2880, 1590, 5]
    with pytest.raises(SubmitError, match="jobs.slurm.time 'four hours' is not a Slurm time"):
        time_minutes("four hours")


def test_pipeline_as_array_and_dependent_jobs(in_cluster_env, tmp_path, tiny_llama_dir, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.run import cache_complete, head_finished
    from pipeline.submit import job_status, submit
    from schemas.config import load_config

    cl = in_cluster_env
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["jobs"] = SLURM_JOBS
    cfg = load_config(raw=raw)
    rec = submit(cfg, executor="slurm")
    stages = {s["stage"]: s for s in rec["stages"]}
    assert list(stages) == ["extract", "train", "eval"]
    assert stages["extract"]["array"] and len(stages["extract"]["tasks"]) == 2
    assert stages["train"]["dependency"] == f"afterok:{stages['extract']['job_id']}"
    assert stages["eval"]["dependency"] == f"afterok:{stages['train']['job_id']}"
    cl.wait_idle(timeout=400)

    rows = job_status(str(tmp_path / "run"))
    assert [(r["stage"], r["state"]) for r in rows] == [
        ("extract", "COMPLETED"), ("extract", "COMPLETED"), ("train", "COMPLETED"), ("eval", "COMPLETED")], rows
    # Each array task took its half of the shards (k mod 2), from SLURM_ARRAY_TASK_ID/COUNT.
    logs = [Path(p).read_text() for p in stages["extract"]["stdout"]]
    assert "[extract] worker 0/2 (slurm-array)" in logs[0] and "[extract] worker 1/2 (slurm-array)" in logs[1]
    assert "[extract] train worker 0/2: 2 shards written" in logs[0]  # shards 0 and 2
    assert "[extract] train worker 1/2: 1 shards written" in logs[1]  # shard 1
    cache, head = Path(cfg.extract.cache), Path(cfg.train.output)
    assert cache_complete(cache) and len(shard_checksums(cache)) == 3
    assert head_finished(head)
    rep = json.loads((head / "eval" / "report.json").read_text())
    assert rep["heads"][0]["methods"][0]["lossless"] is True

    res = CliRunner().invoke(app, ["jobs", "status", str(tmp_path / "run")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert res.output.count("COMPLETED") == 4 and f"{stages['extract']['job_id']}_1" in res.output

    # The jobs recorded their stages: a local `eagle3 run` afterwards has nothing to do.
    from pipeline.run import run_pipeline

    summary = run_pipeline(cfg, progress=False)
    assert [s["status"] for s in summary["stages"]] == ["disabled", "skipped", "skipped", "skipped"]


def test_failing_stage1_task_leaves_stage2_never_started(in_cluster_env, tmp_path, tiny_llama_dir, monkeypatch):
    from pipeline.submit import job_status, submit
    from schemas.config import load_config

    cl = in_cluster_env
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["jobs"] = SLURM_JOBS
    # Worker 1 of 2 finds a broken record in its half of the data and fails; worker 0 succeeds.
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    rows[20]["conversations"][1]["from"] = "robot"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(raw=raw)
    rec = submit(cfg, executor="slurm")
    cl.wait_idle(timeout=300)
    states = {(r["stage"], r["job"]): r["state"] for r in job_status(str(tmp_path / "run"))}
    ex = [v for (s, _), v in states.items() if s == "extract"]
    assert "FAILED" in ex, states
    train_state = next(v for (s, _), v in states.items() if s == "train")
    assert train_state.startswith("CANCELLED") or "DependencyNeverSatisfied" in train_state, states
    train = next(s for s in rec["stages"] if s["stage"] == "train")
    assert not Path(train["stdout"][0]).exists()  # the job never ran
    assert not Path(cfg.train.output).exists()
    err = "".join(Path(p).read_text() for p in next(s for s in rec["stages"] if s["stage"] == "extract")["stderr"]
                  if Path(p).exists())
    assert "unknown role 'robot'" in err


def test_sweep_dry_run_is_one_array_over_the_grid_then_the_table(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from test_run import write_config

    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["jobs"] = {"extract": {"tasks": 2}}
    raw["sweep"] = {"grid": {"train.draft_vocab_size": [8000, 16000, 32000], "train.ttt_length": [3, 7]}}
    res = CliRunner().invoke(app, ["sweep", str(write_config(tmp_path, raw)), "--executor", "slurm", "--dry-run"])
    assert res.exit_code == 0, res.output
    scripts = {m.group(1): m.group(2) for m in re.finditer(r"# ===== ([\w-]+): (.*?)(?=# ===== |\Z)", res.output, re.S)}
    assert list(scripts) == ["extract", "sweep", "sweep-table"]
    assert "#SBATCH --array=0-1%2" in scripts["extract"]
    assert "#SBATCH --array=0-5%6" in scripts["sweep"] and "afterok:<extract job id>" in scripts["sweep"]
    assert "afterany:<sweep job id>" in scripts["sweep-table"]
