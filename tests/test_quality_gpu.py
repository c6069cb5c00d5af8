"""bench/quality_gpu.py (issue 21's quality run on a GPU under a wall-clock budget) and the
--eval-only path of bench/quality.py that evaluates its head on another machine."""
from __future__ import annotations

import argparse
import io
import json
import random
import socket
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
import quality_gpu as qg  # noqa: E402
from quality_report import run_cache_summary  # noqa: E402
from tiny import sharegpt_rows, tiny_target, write_jsonl  # noqa: E402


def _rows(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"}]} for i in range(n)]


def test_cut_keeps_the_conversations_written_and_drops_a_killed_writers_partial_line(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", _rows(5))
    done = [{"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i in ("c0", "c2")]
    (tmp_path / "regenerated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "c3", "conv')
    assert qg.cut_to_written(tmp_path) == 2
    kept = [json.loads(x)["id"] for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert kept == ["c0", "c2"]
    assert len((tmp_path / "prompts-all.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "regenerated.jsonl").read_text().endswith("}\n")
    assert qg.cut_to_written(tmp_path) == 2  # a second cut reads the whole set again, not the cut one


def test_probe_rate_reads_the_steady_steps(tmp_path):
    rows = [{"step": s, "tokens": 1000, "tokens_per_s": 10.0 if s <= 5 else 2000.0} for s in range(1, 16)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert qg.probe_rate(tmp_path) == (pytest.approx(2.0), pytest.approx(1000.0))


def test_pack_leaves_out_cache_checkpoints_and_probe_and_reassembles(tmp_path, monkeypatch):
    run = tmp_path / "qg"
    weights = random.Random(0).randbytes(4000)  # incompressible: the tar.gz needs several parts
    files = {"head/model.safetensors": weights, "head/eval.jsonl": b"{}\n", "regenerated.jsonl": b"{}\n",
             "head/checkpoints/step1/x.pt": b"x", "head/last/model.safetensors": b"x", "cache/cache.json": b"x",
             "probe/model.safetensors": b"x"}
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    monkeypatch.setattr(qg, "PART_BYTES", 1000)
    out = tmp_path / "out"
    out.mkdir()
    parts = qg.pack(run, out)
    assert len(parts) >= 2 and all(p.stat().st_size <= 1000 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
        assert names == {"qg/head/model.safetensors", "qg/head/eval.jsonl", "qg/regenerated.jsonl"}
        assert t.extractfile("qg/head/model.safetensors").read() == weights


def test_eval_only_config_moves_the_paths_and_targets_this_machine(tmp_path):
    there, here = tmp_path / "gpu-run", tmp_path / "here"
    there.mkdir()
    here.mkdir()
    a = argparse.Namespace(lr=2e-3, draft_vocab=8000, regen_batch=256, micro_batch=32, batch_tokens=16384)
    (here / "gpu.yaml").write_text(qg.gpu_config(there, "/tmp/sm/SmolLM2.gguf", "cuda", False, a).read_text())
    cfg, point = quality.eval_only_config(here, "bfloat16")
    text = cfg.read_text()
    raw = yaml.safe_load(text)
    assert str(there) not in text
    assert raw["data"]["regenerate"]["output"] == str(here / "regenerated.jsonl")
    assert raw["train"]["output"] == str(here / "head")
    assert raw["target"] == {**raw["target"], "path": quality.SMOLLM2, "device": "cpu", "dtype": "bfloat16"}
    assert point == {"train.lr": 2e-3, "train.warmup_ratio": 0.02, "train.draft_vocab_size": 8000,
                     "train.ttt_length": 5}


def test_eval_only_without_a_gpu_run_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="--eval-only needs .*gpu.yaml"):
        quality.eval_only_config(tmp_path, "bfloat16")


def test_report_takes_the_cache_summary_a_gpu_run_brought(tmp_path):
    assert run_cache_summary(tmp_path) is None
    (tmp_path / "cache_summary.json").write_text(json.dumps({"samples": 3, "tokens": 120}))
    assert run_cache_summary(tmp_path) == {"samples": 3, "tokens": 120}


def test_rehearsal_on_a_tiny_target_regenerates_extracts_probes_trains_and_packs(tmp_path, monkeypatch):
    # What an in-process training run leaves in os.environ (as earlier tests of the suite do): the
    # stages' subprocesses must not rendezvous on that still-bound port.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(held.getsockname()[1])}.items():
        monkeypatch.setenv(k, v)
    target = tiny_target(tmp_path / "target", layers=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{**r, "conversations": r["conversations"][::2]}
                                                       for r in sharegpt_rows(24, turns=2)])
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    assert qg.main(["--device", "cpu", "--quick", "--prompts", str(prompts), "--target", str(target),
                    "--run-dir", str(run), "--budget-s", "60", "--regen-s", "600", "--regen-batch", "8",
                    "--micro-batch", "4", "--batch-tokens", "512", "--draft-vocab", "200", "--pack", str(out)]) == 0
    held.close()
    times = json.loads((run / "gpu_times.json").read_text())
    assert times.get("train_rc") == 0, (run / "stages.log").read_text()[-3000:]
    assert times["conversations"] == 24
    head = json.loads((run / "head" / "config.json").read_text())
    assert head["training"]["total_steps"] == times["planned_steps"] >= qg.PROBE_STEPS
    assert json.loads((run / "cache_summary.json").read_text())["samples"] == 24
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in sorted(out.iterdir())))) as t:
        names = {m.name for m in t.getmembers()}
    assert {"run/head/model.safetensors", "run/regenerated.jsonl", "run/gpu.yaml"} <= names
    assert not any("/cache/" in n or "/probe/" in n for n in names)


def test_batch_clock_stops_after_the_last_batch_that_ends_before_the_deadline(tmp_path):
    out, now = tmp_path / "regenerated.jsonl", [100.0]
    clock = qg.BatchClock(out, deadline=140.0, clock=lambda: now[0])
    now[0] = 105.0
    assert not clock()                       # nothing written yet
    out.write_text("{}\n" * 8)
    now[0] = 115.0                           # batch 1: 15 s (with the load); 115 + 15 < 140
    assert not clock()
    now[0] = 120.0
    assert not clock()                       # no new batch: keep going
    out.write_text("{}\n" * 16)
    now[0] = 126.0                           # batch 2: 11 s; the longest, 15 s, would end at 141
    assert clock()
