"""G3: the README's multi-GPU commands, through the real launchers on the CPU.

`deepspeed --module pipeline.cli train CFG` runs `python -m pipeline.cli --local_rank=N
train CFG` per rank (the flag *before* the command); torch's older launcher passes
`--local-rank`. Both spellings are accepted, before or after `train`."""
from __future__ import annotations

import json
import shutil
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
    assert "No such option" not in r.output and "missing.yaml" in r.output


def test_deepspeed_launcher_runs_train_on_two_ranks(tmp_path, cache):
    """The README command on 2 CPU 'GPUs' (gloo): `deepspeed --num_gpus 2 --module pipeline.cli train CFG`."""
    cfg = _cfg(tmp_path, cache, tmp_path / "head")
    p = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
             "--module", "pipeline.cli", "train", str(cfg), "--no-progress"], timeout=600)
    assert "--local_rank=1" in p.stdout + p.stderr  # the launcher did pass the flag
    conf = json.loads((tmp_path / "head" / "config.json").read_text())
    assert conf["training"]["world_size"] == 2 and conf["training"]["zero_stage"] == 2

