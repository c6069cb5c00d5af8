"""`eagle3 sweep`: several heads from one cache and the comparison table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_run import mtimes, tiny_raw, write_config


def test_sweep_two_vocab_sizes_from_one_cache(tmp_path, tiny_llama_dir):
    pytest.importorskip("stage2_train.trainer")
    pytest.importorskip("stage3_eval.evaluate")
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.sweep import grid_points, point_name, sweep_dir
    from schemas.config import load_config

    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["sweep"] = {"grid": {"train.draft_vocab_size": [32, 64]}, "eval": True}
    cfgp = write_config(tmp_path, raw)
    res = CliRunner().invoke(app, ["sweep", str(cfgp), "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = load_config(cfgp)
    sd = sweep_dir(cfg)
    assert sd == tmp_path / "run" / "head-sweep"
    assert [point_name(p) for p in grid_points(cfg)] == ["draft_vocab_size-32", "draft_vocab_size-64"]
    # One cache, extracted once; two heads whose draft vocab has the swept size.
    assert len(list((tmp_path / "run" / "cache" / "shards").glob("*.zarr"))) == 3
    for n in (32, 64):
        head = sd / f"draft_vocab_size-{n}"
        t = load_file(str(head / "model.safetensors"))
        assert t["d2t"].shape == (n,) and t["lm_head.weight"].shape[0] == n
        assert json.loads((head / "config.json").read_text())["draft_vocab_size"] == n
        assert (head / "eval" / "report.json").is_file()
    table = json.loads((sd / "sweep.json").read_text())
    rows = table["rows"]
    assert [r["train.draft_vocab_size"] for r in rows] == [32, 64]
    assert sum(r["best"] for r in rows) == 1 and table["best_by"] == "measured τ"
    best = max(rows, key=lambda r: (r["tau_chain"], ))
    assert table["best"] == best["name"]
    for r in rows:
        assert r["simulated_tau"] == pytest.approx(1 + sum(
            __import__("math").prod(r["acc"][:k + 1]) for k in range(len(r["acc"]))))
        assert r["acc_0"] == r["acc"][0] and r["train_seconds"] > 0
        assert r["simulated_tau_t1"] == pytest.approx(1 + sum(
            __import__("math").prod(r["alpha"][:k + 1]) for k in range(len(r["alpha"]))))
    md = (sd / "sweep.md").read_text()
    assert ("| best | draft_vocab_size | acc_0 | simulated τ | simulated τ (T=1) | measured τ (chain) | train s | head |"
            in md)
    assert md.count("**★**") == 1 and "extract_seconds:" in md
    assert md in res.output

    # Again: both heads are already trained and evaluated; nothing is redone, the table is rebuilt.
    before = {k: v for k, v in mtimes(sd).items() if not k.endswith(("sweep.json", "sweep.md"))}
    res2 = CliRunner().invoke(app, ["sweep", str(cfgp), "--no-progress"])
    assert res2.exit_code == 0, res2.output
    assert res2.output.count("[train] already done") == 2 and res2.output.count("[eval] already done") == 2
    after = {k: v for k, v in mtimes(sd).items() if not k.endswith(("sweep.json", "sweep.md"))}
    assert before == after


def test_sweep_grid_rejects_non_train_keys(tmp_path, tiny_llama_dir):
    from pipeline.sweep import grid_points
    from schemas.config import ConfigError, load_config

    raw = tiny_raw(tmp_path, tiny_llama_dir)
    raw["sweep"] = {"grid": {"extract.topk": [8, 16]}}
    with pytest.raises(ConfigError, match=r"sweep.grid key 'extract.topk': must be train.<field>"):
        grid_points(load_config(raw=raw))
    raw["sweep"] = {"grid": {"train.output": ["a", "b"]}}
    with pytest.raises(ConfigError, match=r"every head of a sweep reads the same cache"):
        grid_points(load_config(raw=raw))
