"""G3: the README's multi-GPU commands, through the real launchers on the CPU.

`deepspeed --module pipeline.cli train CFG` runs `python -m pipeline.cli --local_rank=N
train CFG` per rank (the flag *before* the command); torch's older launcher passes
`--local-rank`. Both spellings are accepted, before or after `train`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from test_train_run import free_port, run


def _cfg(tmp_path, cache, out, **train):
    ds = tmp_path / "z2.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}))
    raw = {"name": "t", "target": {"path": "/deleted/target"},
           "train": {"cache": str(cache), "output": str(out), "draft_vocab_size": 128, "ttt_length": 2,
                     "lr": 3e-3, "micro_batch_size": 2, "max_tokens_per_batch": 1024, "val_fraction": 0.0,
                     "save_every": 1000, "eval_every": 1000, "deepspeed": str(ds), "max_steps": 2, **train}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from cachefix import build_cache

    c, target = build_cache(tmp_path_factory.mktemp("lcache"), n_samples=16, samples_per_shard=8, topk=8)
    shutil.rmtree(target)
    return c


@pytest.mark.parametrize("args", [["--local_rank=0", "config", "show", "{cfg}"],
                                  ["--local-rank", "1", "config", "show", "{cfg}"]])
def test_cli_accepts_the_launchers_local_rank_flag(tmp_path, cache, args, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = _cfg(tmp_path, cache, tmp_path / "out")
    r = CliRunner().invoke(app, [a.format(cfg=cfg) for a in args])
    assert r.exit_code == 0, r.output
    assert "train:" in r.output


def test_train_accepts_local_rank_after_the_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    r = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml"), "--local_rank", "0"])
    # the flag is accepted (a usage error would exit 2); the run then stops on the missing config, exit 1
    assert r.exit_code == 1, r.output
    assert "No such option" not in r.output
    assert r.output.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"


def test_deepspeed_launcher_runs_train_on_two_ranks(tmp_path, cache):
    """The README command on 2 CPU 'GPUs' (gloo): `deepspeed --num_gpus 2 --module pipeline.cli train CFG`."""
    cfg = _cfg(tmp_path, cache, tmp_path / "head")
    p = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
             "--module", "pipeline.cli", "train", str(cfg), "--no-progress"], timeout=600)
    assert "--local_rank=1" in p.stdout + p.stderr  # the launcher did pass the flag
    conf = json.loads((tmp_path / "head" / "config.json").read_text())
    assert conf["training"]["world_size"] == 2 and conf["training"]["zero_stage"] == 2



def readme_multi_node(stage: str) -> list[list[str]]:
    """The README's multi-node commands (section 'Many GPUs and nodes') that run `stage`, as argument lists."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Many GPUs and nodes", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.split("#")[0].split() for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ("--nnodes" in ln or "--num_nodes" in ln) and stage in ln]


def test_readme_stage1_multi_node_command_on_two_local_nodes(tmp_path):
    """Stage 1's N-node command as 2 nodes x 1 worker on localhost: worker r of 2 on node r, the whole cache
    (stage 2's N-node command runs in tests/test_many_ranks.py)."""
    from pathlib import Path

    from schemas.cache import committed_shards
    from test_train_run import ENV, ROOT
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    cmds = readme_multi_node("extract")
    assert len(cmds) == 1 and cmds[0][0] == "torchrun"
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(8, seed=3))
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": str(tiny_target(tmp_path / "t", "llama"))},
                                   "data": {"train": [str(data)]},
                                   "extract": {"cache": str(tmp_path / "cache"), "samples_per_shard": 2, "topk": 4,
                                               "layers": [1, 3, 5], "max_tokens_per_batch": 128}}))
    port = free_port()
    procs = []
    for r in (0, 1):
        sub = {"N": "2", "R": str(r), "8": "1", "HOST0": "127.0.0.1", "29500": str(port), "CFG": str(cfg)}
        cmd = [sys.executable, "-m", "torch.distributed.run"] + [sub.get(a, a) for a in cmds[0][1:]] + ["--no-progress"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r}: " + err[-3000:]
        assert f"extract train worker {r}/2" in err
    assert committed_shards(tmp_path / "cache") == [0, 1, 2, 3]
    assert Path(tmp_path / "cache" / "manifest.parquet").is_file()
