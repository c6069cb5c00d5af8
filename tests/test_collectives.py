"""The rules at scale that need no second process (issue 18, DESIGN.md section 8).

* Our collectives go through one place (`stage2_train.collectives.Ranks`), which refuses
  a tensor off the rank's device, as NCCL does; no other module of ours calls them.
* Held-out sharding and the held-out cap; stage 3's offline table capped and on the
  device it is given.
* `eagle3 submit` for several nodes: torchrun from Slurm's own variables; the MiniCPM4
  config batches by tokens and asks for the CPUs its ranks use.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from stage2_train.collectives import CollectiveDeviceError, Ranks
from stage2_train.data import heldout_subset, rank_share
from stage2_train.losses import Sums

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|broadcast|barrier|all_gather\w*|reduce\w*|"
                        r"gather|scatter|send|recv|isend|irecv|broadcast_object_list|all_to_all\w*)\s*\(")


def test_ranks_refuse_a_tensor_off_the_rank_device():
    cpu = Ranks(0, 1, torch.device("cpu"))
    t = torch.ones(3, device="cpu")
    assert cpu.all_reduce(t) is t and cpu.broadcast(t) is t and torch.equal(t, torch.ones(3))
    with pytest.raises(CollectiveDeviceError, match=r"all_reduce\(sum\): a tensor on meta was handed to a "
                                                    r"collective of rank 0, whose device is cpu"):
        cpu.all_reduce(torch.zeros(3, device="meta"))  # what an un-placed tensor is under the test guard
    # a rank on a GPU refuses a host tensor before anything is sent (no GPU needed to check that)
    gpu = Ranks(1, 2, torch.device("cuda", 0))
    with pytest.raises(CollectiveDeviceError, match=r"broadcast: a tensor on cpu was handed to a collective of "
                                                    r"rank 1, whose device is cuda:0 \(NCCL takes no host tensors"):
        gpu.broadcast(torch.zeros(3))
    with pytest.raises(CollectiveDeviceError, match="a tensor on cpu"):
        Sums(torch.device("cpu")).add({"x": torch.ones(2)}).all_reduce(gpu)
    with pytest.raises(ValueError, match="all_reduce op must be one of"):
        cpu.all_reduce(t, op="mean")


def test_only_the_collectives_module_calls_torch_distributed_collectives():
    hits = []
    for pkg in ("stage2_train", "stage3_eval", "pipeline", "schemas"):
        for f in sorted((ROOT / pkg).glob("*.py")):
            if f.name == "collectives.py":
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if COLLECTIVE.search(line.split("#")[0]):
                    hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "collectives outside stage2_train/collectives.py:\n" + "\n".join(hits)


def test_sums_add_rows_of_any_shape_and_come_back_in_one_copy():
    s = Sums(torch.device("cpu"))
    s.add({"loss_sum": torch.tensor([1.0, 2.0]), "tokens": torch.tensor(3)})
    s.add({"loss_sum": torch.tensor([0.5, 0.5]), "tokens": 4, "alpha": torch.tensor([0.25, 0.75])})
    h = s.all_reduce(Ranks(0, 1, torch.device("cpu"))).host()
    assert h == {"loss_sum": [1.5, 2.5], "tokens": 7.0, "alpha": [0.25, 0.75]}
    assert all(v.dtype == torch.float64 for v in s.rows.values())


def test_rank_share_is_contiguous_disjoint_and_token_balanced():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 2000, 500)
    idx = np.sort(rng.choice(500, 300, replace=False))
    for world in (1, 2, 3, 8):
        parts = [rank_share(idx, lengths, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), idx)  # contiguous runs in storage order, covering all
        tokens = [int(lengths[p].sum()) for p in parts]
        assert max(tokens) - min(tokens) <= 2 * int(lengths.max())
    assert [len(rank_share(idx[:1], lengths, r, 4)) for r in range(4)].count(1) == 1  # more ranks than samples


def test_heldout_subset_is_capped_seeded_and_never_empty():
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 500, 200)
    idx = np.arange(0, 200, 2)
    assert np.array_equal(heldout_subset(idx, lengths, None, 0), idx)
    assert np.array_equal(heldout_subset(idx, lengths, 10 ** 9, 0), idx)
    sub = heldout_subset(idx, lengths, 3000, 0)
    assert 0 < lengths[sub].sum() <= 3000 and set(sub) <= set(idx) and np.all(np.diff(sub) > 0)
    assert np.array_equal(sub, heldout_subset(idx, lengths, 3000, 0))
    assert not np.array_equal(sub, heldout_subset(idx, lengths, 3000, 1))
    assert len(heldout_subset(idx, lengths, 1, 0)) == 1


@pytest.fixture(scope="module")
def head_and_cache(tmp_path_factory):
    from cachefix import build_cache
    from schemas.cache import CacheReader
    from schemas.head import make_head_config
    from stage2_train.export import write_head
    from stage2_train.model import Eagle3Draft

    d = tmp_path_factory.mktemp("offline")
    cache, target = build_cache(d, n_samples=24, samples_per_shard=8, topk=8)
    shutil.rmtree(target)
    r = CacheReader(cache)
    from stage2_train.vocab import build_draft_vocab

    torch.manual_seed(0)
    m = Eagle3Draft(make_head_config(r.target_config(), draft_vocab_size=64, layer_ids=r.layers))
    v = build_draft_vocab(r.token_counts(), 64)
    m.set_vocab_map(torch.from_numpy(v.d2t), torch.from_numpy(v.t2d))
    head = write_head(m, d / "head", {"ttt_length": 2, "loss_decay": 0.8, "seed": 0})
    return head, cache


def test_offline_table_is_capped_and_runs_on_the_device_it_is_given(head_and_cache, monkeypatch):
    import stage2_train.evaluate as ev
    from schemas.config import load_config
    from stage3_eval.offline import offline_table

    head, cache = head_and_cache
    full = ev.offline_metrics(head, cache, split="all")
    capped = ev.offline_metrics(head, cache, split="all", max_tokens=300)
    assert 0 < capped["num_tokens"] <= 300 < full["num_tokens"] and capped["num_samples"] < full["num_samples"]
    assert capped == ev.offline_metrics(head, cache, split="all", max_tokens=300)  # the same seeded subset
    seen = []
    real = ev.evaluate_model

    def spy(model, *a, **k):
        seen.append(next(model.parameters()).device)
        return real(model, *a, **k)

    monkeypatch.setattr(ev, "evaluate_model", spy)
    cfg = load_config(raw={"target": {"path": "/deleted"}, "extract": {"cache": str(cache), "eval_cache": str(cache)},
                           "train": {"ttt_length": 2, "eval_max_tokens": 300}})
    off = offline_table(str(head), cfg, device=torch.device("cpu"))
    assert seen == [torch.device("cpu")] and off["device"] == "cpu" and off["split"] == "all"
    assert off["num_tokens"] == capped["num_tokens"] and off["acc"] == capped["acc"]
    # stage 3's table carries the acceptance at T = 1 beside acc
    assert off["alpha"] == capped["alpha"] and off["simulated_tau_t1"] == capped["simulated_tau_t1"]
    assert "alpha_hi" in off and len(off["alpha"]) == 2


def test_slurm_node_reads_slurms_own_variables(monkeypatch):
    from pipeline.submit import SubmitError, slurm_node

    for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SubmitError, match=r"the train job runs on 2 node\(s\) but SLURM_JOB_ID, SLURM_NODEID, "
                                          r"SLURM_JOB_NODELIST is not set"):
        slurm_node(2)
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09],cpu1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    assert slurm_node(4) == (2, "gpu07", 20000 + 123457 % 20000)
    with pytest.raises(SubmitError, match=r"jobs.train.nodes is 2 but the Slurm job has 4 node\(s\)"):
        slurm_node(2)


@pytest.mark.slurm
def test_the_first_host_is_the_one_scontrol_names(slurm_cluster, monkeypatch):  # noqa: F811
    from pipeline.submit import slurm_node

    expr = "gpu[07-09,11],cpu1,big-[2-3]"
    want = slurm_cluster.run("scontrol", "show", "hostnames", expr).stdout.split()
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", expr)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(len(want)))
    assert slurm_node(len(want))[1] == want[0] == "gpu07"


def test_multi_node_submission_is_torchrun_on_every_node(tmp_path):
    from pipeline.submit import SubmitError, plan, sbatch_text, submit
    from schemas.config import load_config

    cfg = load_config(raw={"target": {"path": "/deleted"}, "jobs": {"train": {"nodes": 2, "gpus_per_node": 8}},
                           "train": {"loader_threads": 4}})
    spec = next(s for s in plan(cfg, "run/config.yaml", "/work") if s.stage == "train")
    assert "torch.distributed.run --nnodes 2 --node_rank '$SLURM_NODEID' --nproc_per_node 8 --master_addr " \
           "'<first host of $SLURM_JOB_NODELIST>'" in spec.describe and "deepspeed" not in spec.describe
    text = sbatch_text(spec, tmp_path / "train" / "%j", "afterok:1")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --cpus-per-task=56" in text  # 8 ranks x (loop + 4 decode + reader + collate)
    with pytest.raises(SubmitError, match=r"jobs.train.nodes is 2: the local executor runs on this machine only"):
        submit(cfg, executor="local", dry_run=True)


def test_minicpm4_config_batches_by_tokens_and_asks_for_the_cpus_its_ranks_use():
    from pipeline.submit import plan, train_cpus
    from schemas.config import load_config

    cfg = load_config(ROOT / "configs" / "minicpm4-8b.yaml")
    tc = cfg.train
    assert tc.max_tokens_per_batch >= 16384 and tc.micro_batch_size * 1024 >= tc.max_tokens_per_batch
    assert tc.max_tokens_per_batch >= cfg.data.max_length  # a conversation of max_length fits one micro-batch
    per_rank = 1 + tc.loader_threads + 2
    assert train_cpus(cfg) == cfg.jobs.train.gpus_per_node * per_rank
    spec = next(s for s in plan(cfg, "c.yaml", "/w") if s.stage == "train")
    assert spec.params["cpus_per_task"] == cfg.jobs.train.gpus_per_node * per_rank
    assert tc.eval_max_tokens and tc.eval_max_tokens <= 4_000_000


def test_a_checkpoint_of_another_global_batch_is_refused(head_and_cache, tmp_path):
    """Resuming needs the same global batch (ranks x accumulation), not the same number of ranks; a run.json
    from before the global batch was recorded (world_size, grad_accum) counts the same."""
    import json

    from schemas.config import load_config
    from stage2_train.evaluate import cache_id
    from stage2_train.trainer import Plan, Run, TrainError, check_resumable, load_ds_config

    _, cache = head_and_cache
    cfg = load_config(raw={"target": {"path": "/deleted"}, "train": {
        "cache": str(cache), "output": str(tmp_path / "o"), "draft_vocab_size": 64, "ttt_length": 2,
        "gradient_accumulation_steps": 3, "micro_batch_size": 1}})
    run = Run(cfg=cfg, ranks=Ranks(0, 1, torch.device("cpu")), plan=Plan(cfg, 1, 3), ds=load_ds_config(cfg, 1),
              out=tmp_path / "o")
    ck = run.ckdir
    ck.mkdir(parents=True)
    (ck / "latest").write_text("step00000002")
    r = run.plan.reader
    old = {"cache_id": cache_id(r), "draft_vocab_size": 64, "ttt_length": 2, "hidden_size": r.hidden_size,
           "layers": r.layers, "world_size": 2, "grad_accum": 2}
    (ck / "run.json").write_text(json.dumps(old))
    with pytest.raises(TrainError, match=r"the checkpoint was trained with global_micro_batches=4, this run has 3 "
                                         r"\(ranks x gradient_accumulation_steps; this run has 1 x 3: set "
                                         r"train.gradient_accumulation_steps so that the product is 4\)"):
        check_resumable(run)
    (ck / "run.json").write_text(json.dumps({**old, "grad_accum": 3, "world_size": 1}))
    check_resumable(run)  # 1 x 3 = 1 x 3: resumable
    (ck / "run.json").write_text(json.dumps({**old, "world_size": 3, "grad_accum": 1, "global_micro_batches": 3}))
    check_resumable(run)  # 3 ranks x 1 = 1 rank x 3: resumable on another number of ranks


def test_init_distributed_binds_the_rank_gpu_before_joining(monkeypatch):
    """On CUDA the rank's device is current before the group exists: NCCL's communicator and the
    first barrier bind to the current device (else torch guesses it from the global rank)."""
    import deepspeed
    import torch.distributed as dist

    from stage2_train import collectives

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("init", kw["dist_backend"])))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    ranks = collectives.init_distributed()
    assert calls == [("set_device", 3), ("init", "nccl")]
    assert (ranks.rank, ranks.world, ranks.device) == (3, 8, torch.device("cuda", 3))


def test_a_cpu_group_does_not_build_the_inference_shm_op():
    """DeepSpeed's CPU backend would JIT-compile its shared-memory op (26 s per new venv) that only
    inference_all_reduce uses: the group is made without it, and training's all-reduce still works."""
    import os
    import subprocess
    import sys

    code = ("import importlib, torch, deepspeed.comm as dc; from stage2_train.collectives import init_distributed; "
            "init_distributed(); t = torch.ones(3); dc.all_reduce(t); "
            "print('shm', importlib.import_module('deepspeed.comm.comm').cdb.shm_comm_op, t.tolist())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shm None [1.0, 1.0, 1.0]" in p.stdout, p.stdout
    assert "built successfully" not in p.stdout + p.stderr
