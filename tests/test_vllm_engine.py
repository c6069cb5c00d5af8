"""The optional vLLM engine: eval.engine / data.regenerate.engine = vllm.

Fast tests (always run): the missing-engine message, exactly, with nothing written;
config validation; the acceptance arithmetic on hand-made counts. Tests marked `vllm`
run the real engine from its own venv (`make vllm`, or EAGLE3_VLLM_PYTHON) and skip
when it is absent: stage 3 with --engine both on a tiny llama and a trained head
(token identity, the engine table, the same prompt ids as our renderer), and
regeneration through vLLM resuming after a kill, byte-identical to the HF engine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas.config import ConfigError, VllmConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"target": {"path": "/nowhere"}}


def cli(*args, env_extra=None, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # An in-process training earlier in the session leaves its process group's variables (and its
    # port, still bound) in os.environ: a child must pick its own.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- no engine needed


def test_missing_engine_python_message_is_exact(tmp_path, monkeypatch):
    from schemas.vllm_runtime import VllmMissingError, engine_python

    monkeypatch.delenv("EAGLE3_VLLM_PYTHON", raising=False)
    missing = tmp_path / "nope" / "python"
    with pytest.raises(VllmMissingError) as e:
        engine_python(VllmConfig(python=str(missing)))
    assert str(e.value) == (
        f"vLLM is not available: {missing} (vllm.python) does not exist. Install it with `make vllm` (creates the "
        f"separate venv .venv-vllm in the repository root), or set EAGLE3_VLLM_PYTHON or vllm.python to a Python "
        f"that has vllm.")
    monkeypatch.setenv("EAGLE3_VLLM_PYTHON", str(missing))
    with pytest.raises(VllmMissingError, match=r"\(EAGLE3_VLLM_PYTHON\) does not exist"):
        engine_python(VllmConfig())


def test_python_without_vllm_is_refused(monkeypatch):
    import importlib.util

    from schemas.vllm_runtime import VllmMissingError, engine_python

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vllm")
    with pytest.raises(VllmMissingError) as e:
        engine_python(VllmConfig(python=sys.executable))
    assert str(e.value).startswith(f"vLLM is not available: {sys.executable} (vllm.python) has no vllm package. "
                                   f"Install it with `make vllm`")


def test_eval_cli_without_vllm_exits_nonzero_and_writes_nothing(tmp_path):
    head, out = tmp_path / "head", tmp_path / "eval"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": "/nowhere"}, "train": {"output": str(head)},
                                   "eval": {"prompts": [str(prompts)], "output": str(out)},
                                   "vllm": {"python": str(tmp_path / "no-venv" / "bin" / "python")}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["eval", str(cfg), "--engine", "vllm"])
    assert r.exit_code == 1, r.output
    assert "error: vLLM is not available:" in r.output and "make vllm" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert sorted(x.name for x in tmp_path.iterdir()) == before


def test_regenerate_without_vllm_leaves_a_partial_file_untouched(tmp_path, monkeypatch):
    from schemas.vllm_runtime import VllmMissingError
    from stage1_extract.regenerate import run_regenerate

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    out = tmp_path / "regen.jsonl"
    partial = b'{"id": "x", "conversations": []}\n{"id": "y", "conv'
    out.write_bytes(partial)
    cfg = load_config(raw={"target": {"path": "/nowhere"},
                           "data": {"train": [str(data)], "regenerate": {"enabled": True, "output": str(out),
                                                                          "engine": "vllm"}},
                           "vllm": {"python": str(tmp_path / "none")}})
    with pytest.raises(VllmMissingError):
        run_regenerate(cfg, progress=False)
    assert out.read_bytes() == partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regen.jsonl", "train.jsonl"]


def test_regenerate_cli_without_vllm_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": "/nowhere"}, "data": {"train": [str(data)]},
                                   "extract": {"cache": str(tmp_path / "run" / "cache")},
                                   "vllm": {"python": str(tmp_path / "none")}}))
    r = CliRunner().invoke(app, ["regenerate", str(cfg), "data.regenerate.engine=vllm"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: vLLM is not available:") and "make vllm" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "train.jsonl"]


@pytest.mark.parametrize("override, fragment", [
    ("eval.engine=sglang", "'eval.engine': Input should be 'hf', 'vllm' or 'both'"),
    ("data.regenerate.engine=both", "'data.regenerate.engine': Input should be 'hf' or 'vllm'"),
    ("vllm.kv_cache_gib=0", "'vllm.kv_cache_gib': Input should be greater than 0"),
    ("vllm.gpu_memory_utilization=1.5", "'vllm.gpu_memory_utilization': Input should be less than or equal to 1"),
    ("vllm.pyhton=/x", "unknown key 'vllm.pyhton'; did you mean 'vllm.python'?"),
])
def test_engine_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(raw=dict(MINIMAL), overrides=[override])
    assert fragment in str(e.value)


def test_engine_defaults_and_llm_arguments():
    from schemas.vllm_runtime import llm_kwargs

    cfg = load_config(raw={"target": {"path": "/nowhere", "dtype": "float32"}},
                      overrides=["vllm.extra_args={max_num_seqs: 4}", "vllm.max_model_len=512"])
    assert cfg.eval.engine == "hf" and cfg.data.regenerate.engine == "hf"
    kw = llm_kwargs(cfg, "/m", seed=3)
    assert kw == {"model": "/m", "tokenizer": "/m", "dtype": "float32", "seed": 3, "trust_remote_code": False,
                  "enforce_eager": True, "gpu_memory_utilization": 0.3, "disable_log_stats": False,
                  "kv_cache_memory_bytes": 1 << 30, "max_model_len": 512, "max_num_seqs": 4}


def test_regeneration_engine_does_not_change_the_run_fingerprint():
    from pipeline.run import fingerprint

    raw = {"target": {"path": "/nowhere"}, "data": {"train": ["/nowhere.jsonl"], "regenerate": {"enabled": True}}}
    hf = load_config(raw=raw)
    assert fingerprint(load_config(raw=raw, overrides=["data.regenerate.engine=vllm"]), "regenerate") == \
        fingerprint(hf, "regenerate")
    assert fingerprint(load_config(raw=raw, overrides=["data.regenerate.max_new_tokens=7"]), "regenerate") != \
        fingerprint(hf, "regenerate")


def test_engine_summary_from_hand_made_counts():
    from stage3_eval.report import hist_stats
    from stage3_eval.vllm_engine import counts_to_hist, summarize_engine

    # 10 drafts of k=3: 4 accepted nothing, 3 accepted 1, 2 accepted 2, 1 accepted all 3.
    assert counts_to_hist(10, [6, 3, 1]) == [4, 3, 2, 1]
    base = [{"id": "a", "turn": 1, "tokens": [1, 2, 3, 4], "wall_s": 2.0},
            {"id": "b", "turn": 1, "tokens": [5, 6], "wall_s": 1.0}]
    spec = [{"id": "a", "turn": 1, "tokens": [1, 2, 3, 4], "wall_s": 1.0, "drafts": 6, "draft_tokens": 18,
             "accepted": 6, "accepted_per_pos": [4, 1, 1]},
            {"id": "b", "turn": 1, "tokens": [5, 7], "wall_s": 1.0, "drafts": 4, "draft_tokens": 12,
             "accepted": 4, "accepted_per_pos": [2, 2, 0]}]
    s = summarize_engine(base, spec, 3, sampling=False)
    assert s["accepted_per_pos"] == [6, 3, 1]
    assert s["acceptance_per_pos"] == [0.6, 0.3, 0.1]
    assert s["acceptance_by_depth"] == [0.6, 0.5, 1 / 3]
    assert s["accept_length_hist"] == [4, 3, 2, 1]
    assert s["mean_acceptance_length"] == 2.0
    assert (s["baseline_tokens_per_s"], s["spec_tokens_per_s"], s["speedup"]) == (2.0, 3.0, 1.5)
    assert s["identical"] is False and s["mismatched_prompts"] == [{"id": "b", "turn": 1, "first_mismatch": 1}]
    # The HF row of the engine table uses the same convention, from its histogram.
    per_pos, mal = hist_stats([4, 3, 2, 1])
    assert per_pos == [0.6, 0.3, 0.1] and mal == 2.0


# --------------------------------------------------------------------------- the real engine (marker vllm)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, vllm_python):
    """A peaked tiny llama vLLM can serve (head_dim 32; 8 layers, so the layer ids [2, 4, 5] are distinct)
    and a head trained on its cache for 60 steps."""
    from cachefix import build_cache

    root = tmp_path_factory.mktemp("vllm_tiny")
    cache, target = build_cache(root, n_samples=32, samples_per_shard=16, topk=8, hidden=128, num_layers=8)
    head = root / "head"
    cfg = root / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "t", "target": {"path": str(target)},
        "train": {"cache": str(cache), "output": str(head), "draft_vocab_size": 128, "ttt_length": 3, "lr": 3e-3,
                  "micro_batch_size": 4, "max_tokens_per_batch": 2048, "val_fraction": 0.15, "max_steps": 60,
                  "save_every": 1000, "eval_every": 1000,
                  "deepspeed": str(ROOT / "configs" / "deepspeed" / "cpu_fp32.json")}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    p = cli("train", str(cfg), "--no-progress", env_extra=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return root, target, head


@pytest.mark.vllm
def test_eval_engine_both_token_identical_with_engine_table(tiny_trained, vllm_python, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from schemas.config import TargetConfig
    from schemas.target import load_tokenizer
    from stage3_eval.prompts import render

    root, target, head = tiny_trained
    humans = [json.loads(line)["conversations"][0]["value"] for line in (root / "train.jsonl").open()]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": humans[0]}) + "\n" + json.dumps({"turns": humans[1:3]}) + "\n"
                       + json.dumps({"prompt": humans[3]}) + "\n")
    out = tmp_path / "eval"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "target": {"path": str(target), "dtype": "float32"}, "train": {"output": str(head)},
        "eval": {"prompts": [str(prompts)], "method": "chain", "max_new_tokens": 24, "draft_tokens": 3,
                 "warmup": 0, "offline": False, "output": str(out), "temperatures": [0, 1.0], "lossless_runs": 10,
                 "lossless_prefixes": 1, "lossless_tokens": 4},
        "vllm": {"python": str(vllm_python), "kv_cache_gib": 0.25, "max_model_len": 512}}))
    r = CliRunner().invoke(app, ["eval", str(cfg), "--engine", "both", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "## Engines: chain k=3" in r.output
    rows = [line for line in r.output.splitlines() if line.startswith("| head |") is False and "| vllm " in line]
    assert len(rows) == 2 and rows[0].endswith("| yes |") and " | 1 | " in rows[1] \
        and rows[1].endswith("| n/a (sampling) |"), r.output

    rep = json.loads((out / "report.json").read_text())
    hf, v = rep["heads"][0]["methods"][0], rep["vllm"]["heads"][0]
    hf1, v1 = rep["heads"][0]["methods"][1], rep["vllm"]["heads"][1]
    # T = 1: both engines sample, against their own sampling baseline; ours passes the sampling check
    assert (hf1["temperature"], v1["temperature"]) == (1.0, 1.0) and hf1["sampling_check"]["pass"]
    assert v1["identical"] is None and v1["drafts"] > 0 and v1["num_turns"] == 4 and v1["speedup"] > 0
    assert hf["lossless"] is True and v["temperature"] == 0.0
    assert v["identical"] is True and v["num_turns"] == 4 and v["mismatched_prompts"] == []
    assert v["drafts"] > 0 and sum(v["accept_length_hist"]) == v["drafts"]
    assert v["accepted"] == sum(v["accepted_per_pos"])
    # vLLM's greedy target and ours agree: the same number of tokens on every turn.
    assert [p["new_tokens"] for p in v["per_prompt"]] == [p["new_tokens"] for p in hf["per_prompt"]]
    # The worker rendered the same prompt ids as stage 3's renderer.
    raw = json.loads((out / "vllm_raw.json").read_text())
    tok = load_tokenizer(TargetConfig(path=str(target)))
    assert raw["baseline"]["runs"][0]["prompt_ids"] == render(tok, [{"role": "user", "content": humans[0]}])
    exported = json.loads((Path(v["export"]) / "config.json").read_text())
    assert exported["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert (out / "report.png").stat().st_size > 0 and "## Engines" in (out / "report.md").read_text()


@pytest.mark.vllm
def test_vllm_regeneration_resumes_after_a_kill_identical_to_hf(tiny_trained, vllm_python, tmp_path):
    """`eagle3 regenerate` with the vLLM engine is SIGKILLed (with its engine worker) once some
    conversations are written, the file is left with half a line as a kill during a write would
    leave it, and the same command then finishes: byte-identical to the HF engine's file."""
    import signal
    import time

    from tiny import sharegpt_rows, write_jsonl

    from stage1_extract.regenerate import run_regenerate

    _, target, _ = tiny_trained
    n = 24
    data = write_jsonl(tmp_path / "train.jsonl", sharegpt_rows(n, seed=3, turns=2))
    raw = {"target": {"path": str(target), "dtype": "float32"},
           "data": {"train": [str(data)], "max_length": 256,
                    "regenerate": {"enabled": True, "output": str(tmp_path / "hf.jsonl"), "max_new_tokens": 16,
                                   "batch_size": 1}},
           "vllm": {"python": str(vllm_python), "kv_cache_gib": 0.25, "max_model_len": 512}}
    full = run_regenerate(load_config(raw=raw), progress=False).read_bytes()
    lines = full.splitlines(keepends=True)
    assert len(lines) == n and all(len(json.loads(x)["conversations"]) == 4 for x in lines)

    out = tmp_path / "vllm.jsonl"
    cfg = tmp_path / "vllm.yaml"
    raw["data"]["regenerate"].update(output=str(out), engine="vllm")
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "regenerate", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_file() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the engine worker it started
        proc.wait()
    written = out.read_bytes() if out.is_file() else b""
    assert 2 <= written.count(b"\n") < n, ("the run was not killed part-way", proc.returncode,
                                             proc.stderr.read()[-2000:])
    assert proc.returncode == -signal.SIGKILL
    assert full.startswith(written)  # whatever it wrote before the kill is the HF answers' prefix
    if written.endswith(b"\n"):  # also a kill in the middle of a write: half of the next line
        nxt = lines[written.count(b"\n")]
        out.write_bytes(written + nxt[: len(nxt) // 2])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.read_bytes() == full  # resumed without duplicates, the same answers as the HF engine
    assert "conversations written" in (tmp_path / "vllm.jsonl.vllm.log").read_text()
