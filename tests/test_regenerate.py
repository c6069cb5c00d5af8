"""Answer regeneration: the target's own answers, batched with left padding, resumable without duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "two-turns", "conversations": [
        {"from": "human", "value": "what is the capital of france"}, {"from": "gpt", "value": "paris"},
        {"from": "human", "value": "and the sea"}, {"from": "gpt", "value": "blue"}]},
    {"prompt": "write a poem about the sky"},                                   # prompt-only, no id
    {"id": "humans-only", "conversations": [{"from": "human", "value": "hello"},
                                             {"from": "human", "value": "how can you help"}]},
    {"id": "with-system", "system": "You are a helpful assistant.", "conversations": [
        {"from": "human", "value": "solve 12 * 7"}, {"from": "gpt", "value": "84"}]},
    {"id": "messages", "messages": [{"role": "user", "content": "the quick brown fox"},
                                    {"role": "assistant", "content": "jumps"}]},
]


def _cfg(d: Path, target: Path, data: Path, **regen):
    from schemas.config import load_config

    r = {"enabled": True, "output": str(d / "regen.jsonl"), "max_new_tokens": 6, "batch_size": 3, **regen}
    return load_config(raw={"target": {"path": str(target)}, "data": {"train": [str(data)], "max_length": 256,
                                                                       "regenerate": r},
                            "extract": {"cache": str(d / "cache")}})


def _read(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    return tiny_llama_dir, model, tok


def _greedy_alone(model, tok, messages, n):
    """Reference: the same answer generated for this conversation alone (no batch, no padding)."""
    import torch

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_every_assistant_turn_is_the_targets_own_greedy_answer(tmp_path, target):
    from stage1_extract.regenerate import run_regenerate

    tdir, model, tok = target
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = run_regenerate(_cfg(tmp_path, tdir, data), progress=False)
    got = _read(out)
    assert [r["id"] for r in got] == ["two-turns", "in.jsonl:2", "humans-only", "with-system", "messages"]
    roles = {r["id"]: [t["from"] for t in r["conversations"]] for r in got}
    assert roles == {"two-turns": ["human", "gpt", "human", "gpt"], "in.jsonl:2": ["human", "gpt"],
                     "humans-only": ["human", "gpt", "human", "gpt"], "with-system": ["system", "human", "gpt"],
                     "messages": ["human", "gpt"]}
    # Batched (3 a batch, LEFT padded, different prompt lengths) == each conversation generated alone,
    # turn by turn, with the target's previous answers in the history.
    for r in got:
        hist = []
        for t in r["conversations"]:
            role = {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]]
            if role == "assistant":
                assert t["value"] == _greedy_alone(model, tok, hist, 6), (r["id"], len(hist))
            hist.append({"role": role, "content": t["value"]})
    assert got[0]["conversations"][1]["value"] != "paris"  # the data set's answer is gone
    assert got[0]["conversations"][2]["value"] == "and the sea"  # user turns are kept verbatim


def test_resume_skips_written_ids_and_drops_a_partial_line(tmp_path, target):
    from stage1_extract.regenerate import run_regenerate

    tdir, _, _ = target
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    cfg = _cfg(tmp_path, tdir, data)
    full = _read(run_regenerate(cfg, progress=False))
    out = tmp_path / "regen.jsonl"
    # As after a kill: two whole lines (the second edited, to prove it is not regenerated) + half a line.
    keep = [full[0], {**full[1], "conversations": [full[1]["conversations"][0],
                                                   {"from": "gpt", "value": "KEPT AS WRITTEN"}]}]
    text = "".join(json.dumps(r) + "\n" for r in keep) + json.dumps(full[2])[:25]
    out.write_text(text)
    got = _read(run_regenerate(cfg, progress=False))
    assert [r["id"] for r in got] == [r["id"] for r in full]  # each once, none lost
    assert got[1]["conversations"][1]["value"] == "KEPT AS WRITTEN"
    assert got[2:] == full[2:]
    # A third run has nothing to do and leaves the file byte for byte.
    before = out.read_bytes()
    run_regenerate(cfg, progress=False)
    assert out.read_bytes() == before


def test_resume_after_kill_9(tmp_path, target):
    """A real SIGKILL mid-run: the re-run completes the file with every conversation exactly once."""
    from stage1_extract.regenerate import run_regenerate

    tdir, _, _ = target
    rows = [{"id": f"c{i}", "prompt": f"question number {i} about the sea and the sky"} for i in range(40)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = _cfg(tmp_path, tdir, data, batch_size=2, max_new_tokens=24)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    out = tmp_path / "regen.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "regenerate", str(tmp_path / "cfg.yaml"),
                          "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while not (out.exists() and out.read_text().count("\n") >= 4):
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    n_killed = len(_read_lenient(out))
    assert 4 <= n_killed < 40
    got = _read(run_regenerate(cfg, progress=False))
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids)) == 40


def _read_lenient(p: Path) -> list[dict]:
    out = []
    for x in p.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            pass
    return out


def test_other_settings_on_an_existing_output_are_refused(tmp_path, target):
    from stage1_extract.regenerate import RegenerateError, run_regenerate

    tdir, _, _ = target
    data = write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    run_regenerate(_cfg(tmp_path, tdir, data), progress=False)
    with pytest.raises(RegenerateError, match=r"regen.jsonl was written with other settings "
                                              r"\(temperature: 0.0 -> 0.7\); delete it or set data.regenerate.output"):
        run_regenerate(_cfg(tmp_path, tdir, data, temperature=0.7), progress=False)


def test_sampling_is_reproducible_with_the_seed(tmp_path, target):
    from stage1_extract.regenerate import run_regenerate

    tdir, _, _ = target
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    a = _read(run_regenerate(_cfg(tmp_path / "a", tdir, data, temperature=0.9, top_p=0.9), progress=False))
    b = _read(run_regenerate(_cfg(tmp_path / "b", tdir, data, temperature=0.9, top_p=0.9), progress=False))
    g = _read(run_regenerate(_cfg(tmp_path / "g", tdir, data), progress=False))
    assert a == b and a != g


def test_a_small_hf_batch_on_a_gpu_gets_a_hint_and_cpu_or_large_batches_none():
    from stage1_extract.regenerate import GPU_MIN_BATCH, batch_note

    assert batch_note("cuda:0", 8) == (
        "[regenerate] data.regenerate.batch_size=8 on cuda:0: a decode step costs about the same at 32 and "
        "256 rows there (host-bound), so most of the GPU waits; use hundreds (bench/regen_profile.py)")
    assert batch_note("cpu", 8) is None
    assert batch_note("cuda:1", GPU_MIN_BATCH) is None


def test_extract_by_hand_reads_the_regenerated_answers_and_refuses_a_partial_file(tmp_path, target):
    """`eagle3 regenerate CFG` then `eagle3 extract CFG`: stage 1 reads the regenerated JSONL (data.train
    holds prompts), and refuses one that lacks answers instead of caching part of the data."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from stage1_extract.regenerate import run_regenerate

    tdir, _, _ = target
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    cfg = _cfg(tmp_path, tdir, data)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    out = run_regenerate(cfg, progress=False)
    full = out.read_text()
    out.write_text(full.splitlines(keepends=True)[0])  # as after a regeneration killed early
    runner = CliRunner()
    res = runner.invoke(app, ["extract", str(cfg_file), "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert (f"data.regenerate.enabled: data.train holds prompts the target answers first, and {out} has no "
            f"answer for 4 of its 5 conversations; run `eagle3 regenerate {cfg_file}` first (resumable), or "
            f"`eagle3 run {cfg_file}`, which does both") in " ".join(res.output.split())
    assert not (tmp_path / "cache" / "cache.json").exists()
    out.write_text(full)
    res = runner.invoke(app, ["extract", str(cfg_file), "--no-progress"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())["data"]
    assert [s["path"] for s in meta["sources"]] == [str(out)] and meta["num_samples"] == 5
