"""`eagle3 plan`: figures against independent counts (a real head's parameters, the cache layout
by hand, the data tokenized by stage 1) and against measurements (bench/plan_vs_measured.py:
peak RSS of stage 1 and stage 2 on the CPU, `shards stats` of a real SmolLM2 cache)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.plan import Shape, head_params

ROOT = Path(__file__).resolve().parents[1]
MINICPM4 = ["configs/minicpm4-8b.yaml", "--target-config", "configs/targets/minicpm4-8b.json",
            "--tokens", "102400000", "--samples", "100000"]
runner = CliRunner()


def plan_json(*args) -> dict:
    r = runner.invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name paths relative to the repository


def test_head_parameters_match_a_real_head():
    """The plan's head size against the parameters of stage 2's own Eagle3Draft (built on meta)."""
    from schemas.head import make_head_config
    from stage2_train.model import Eagle3Draft

    c = json.loads((ROOT / "configs/targets/minicpm4-8b.json").read_text())
    with torch.device("meta"):
        m = Eagle3Draft(make_head_config(c, draft_vocab_size=32000, layer_ids=[2, 16, 29]))
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert head_params(Shape.from_config(c), 32000) == trainable == 437_272_576


def test_minicpm4_plan_json_figures():
    f = plan_json(*MINICPM4)
    # raw bytes per token by hand: ids 4 + mask 1 + hidden 3 x 4096 x 2 + top-64 ids 4 x 64 + log-probs 2 x 64
    assert f["cache_raw_bytes_per_token"] == 4 + 1 + 3 * 4096 * 2 + 64 * 4 + 64 * 2 == 24965
    assert f["cache_bytes_total"] == pytest.approx(f["cache_bytes_per_token"] * 102_400_000, rel=1e-5)
    assert 1.9e12 < f["cache_bytes_total"] < 2.2e12            # the config's own comment: ~2.07 TB
    assert f["cache_bytes_total_fp8"] < 0.7 * f["cache_bytes_total_bf16"]
    g = f["stage2_gpu"]
    assert f["stage2_gpu_bytes_per_rank"] == g["total"] and f["stage2_zero_stage"] == 2
    assert g["weights"] == 437_272_576 * 2 + 73448 * 4096 * 2 + 73448 + 8 * 32000
    assert f["target"]["params"] == pytest.approx(8.19e9, rel=0.01)
    assert f["stage1_gpu"]["weights"] == f["target"]["params"] * 2
    assert f["warnings"] == []


def test_stage1_host_memory_of_the_streaming_writer():
    """MiniCPM4-8B, 1024-token mean, extract defaults + max_tokens_per_batch 32768, on a GPU, by hand."""
    f = plan_json(*MINICPM4)
    h = f["stage1_host"]
    # one batch handed to the writer: hidden 32768 x 3 x 4096 bf16 (805,306,368 B, pinned: rounded up to
    # 2^30 by torch's caching host allocator), top-64 ids int32 (2^23) and log-probs fp16 (2^22)
    batch = 2 ** 30 + 32768 * 64 * 4 + 32768 * 64 * 2
    assert h["batch"] == batch == 1_086_324_736
    assert h["queued"] == (4 + 2) * batch                        # writer_queue 4 + the writer's + the loop's
    # window 16 x 32768 tokens = 512 samples of 1024; chunk_rows auto = 1024 / 4 = 256; a row 24,960 B
    assert h["window_tokens"] == 524_288 and h["chunk_rows"] == 256
    assert h["held"] == (512 + 1) // 2 * 128 * 24_960 + 64 * 24_960 == 819_486_720
    # 5 threads' chunks (4 + 1) of 256 rows, raw and zstd (hidden 24576 x 0.814, ids 256 x 0.5355, lps 128 x 0.792)
    assert h["compress"] == int(5 * 256 * (24_960 + 24_576 * 0.814 + 256 * 2.142 / 4 + 128 * 1.584 / 2))
    assert h["tokens"] == 5 * 102_400_000 and h["load"] == 0     # the weights go straight to the GPU
    assert f["stage1_host_bytes_per_worker"] == pytest.approx(
        6 * batch + 819_486_720 + 5 * 256 * 45_203.328 + 512_000_000, abs=2)
    assert f["stage1_host_bytes_per_node"] == 8 * f["stage1_host_bytes_per_worker"]


def test_stage1_host_memory_does_not_grow_with_the_shard():
    """DESIGN.md section 8: shards 8x larger (by samples and tokens) leave a worker's host memory alone;
    the window bounds what the writer holds (the writer before issue 19 held whole shards)."""
    small = plan_json(*MINICPM4)
    big = plan_json(*MINICPM4, "extract.samples_per_shard=8192", f"extract.shard_tokens={8 << 20}")
    assert big["stage1_host_bytes_per_worker"] == small["stage1_host_bytes_per_worker"]
    wide = plan_json(*MINICPM4, f"extract.window_tokens={1 << 20}")     # a window of the whole shard
    assert wide["stage1_host"]["held"] == ((1024 + 1) / 2 * 128) * 24_960
    assert wide["stage1_host"]["held_bound"] == ((1 << 20) + 256) * 24_960


def test_more_nodes_shrink_the_partitioned_states_and_the_time():
    one, four = plan_json(*MINICPM4), plan_json(*MINICPM4, "--nodes", "4")
    assert four["gpus"] == 32
    assert four["stage2_gpu"]["optimizer"] == pytest.approx(one["stage2_gpu"]["optimizer"] / 4)
    assert four["stage2_gpu"]["weights"] == one["stage2_gpu"]["weights"]      # ZeRO-2 keeps whole weights
    assert four["stage2_hours"] == pytest.approx(one["stage2_hours"] / 4)
    assert four["cache_bytes_total"] == one["cache_bytes_total"]


def test_a_job_that_does_not_fit_is_named():
    r = runner.invoke(app, ["plan", *MINICPM4, "--gpu-mem", "16"])
    assert r.exit_code == 0, r.output
    assert "WARNING: stage 1 (target + one extraction batch) needs 21.7 GiB, more than 90% of the 16 GiB " \
           "assumed per GPU (--gpu-mem)" in r.stdout
    assert "stage 2 GPU / rank" in r.stdout and "cache total" in r.stdout


def test_missing_target_names_the_option():
    r = runner.invoke(app, ["plan", "configs/minicpm4-8b.yaml", "--tokens", "1000"])
    assert r.exit_code == 1
    assert "target.path /path/to/MiniCPM4-8B" in r.stderr and "--target-config FILE" in r.stderr
    assert "Traceback" not in r.output


def test_data_counted_from_the_files_equals_stage1_tokenization(tmp_path):
    """Every conversation probed (fewer than 256): the plan's token total is what stage 1 tokenizes."""
    from schemas.config import load_config
    from schemas.target import load_tokenizer
    from stage1_extract.tokenize import build_samples
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    t = tiny_target(tmp_path / "t", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(20, seed=3, turns=2))
    raw = {"target": {"path": str(t)}, "data": {"train": [str(data)], "max_length": 96}}
    cfg = load_config(raw=raw)
    samples, _ = build_samples(cfg, load_tokenizer(cfg.target))
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    f = plan_json(str(tmp_path / "c.yaml"))
    assert f["data"]["samples"] == len(samples) == 20
    assert f["data"]["tokens"] == sum(len(s.input_ids) for s in samples)
    assert any(len(s.input_ids) == 96 for s in samples)             # capped at max_length like stage 1


def test_plan_against_measured_peaks(tmp_path):
    """bench/plan_vs_measured.py --quick: stage-1 host memory and stage-2 memory against peak RSS."""
    out = tmp_path / "pvm.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench/plan_vs_measured.py"), "--quick", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    print(p.stdout)
    bad = [(r["what"], round(r["ratio"], 3)) for r in rows if not r["ok"]]
    assert not bad, bad


@pytest.mark.real_model
def test_cache_bytes_against_a_real_cache(tmp_path, smollm2_target, shared_data):
    out = tmp_path / "pvm.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench/plan_vs_measured.py"), "--quick", "--only", "",
                        "--real", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert abs(row["ratio"] - 1) <= 0.05, row


def test_stage2_batch_bytes_are_the_bytes_of_a_collated_micro_batch():
    """The plan's micro-batch term against the tensors stage 2's collate really hands the device."""
    import numpy as np

    from pipeline.plan import stage2_batch_bytes
    from stage2_train.data import collate

    rng = np.random.default_rng(0)
    H, K, V = 48, 16, 500
    t2d = np.full(V, -1, dtype=np.int64)
    t2d[:300] = np.arange(300)
    lengths = [37, 64, 50]
    samples = [{"input_ids": rng.integers(0, V, n), "loss_mask": rng.integers(0, 2, n).astype(np.uint8),
                "hidden": rng.integers(0, 2**15, (n, 3, H)).astype(np.uint16),
                "topk_ids": np.stack([rng.permutation(V)[:K] for _ in range(n)]).astype(np.int32),
                "topk_logprobs": np.sort(rng.normal(-5, 2, (n, K)), axis=1)[:, ::-1].astype(np.float16)}
               for n in lengths]
    batch = collate(samples, t2d)
    got = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
    padded = len(lengths) * max(lengths)  # collate pads every row to the longest
    assert got == stage2_batch_bytes(Shape("llama", hidden=H, layers=2, heads=4, kv_heads=4, head_dim=H // 4,
                                           intermediate=4 * H, vocab=V, tied=True), topk=K, tokens=padded)
