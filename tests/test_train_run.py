"""Stage 2 end to end on a tiny-target cache whose target directory is deleted: learning, kill -9 +
resume, export, bad configs. Runs go through `eagle3 train` in subprocesses. Many ranks and nodes:
tests/test_many_ranks.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from procs import finish

from schemas.cache import CacheError, CacheReader
from schemas.config import load_config
from schemas.head import WEIGHT_KEYS, HeadError, load_head
from stage2_train.data import split_indices
from stage2_train.evaluate import load_model, offline_metrics
from stage2_train.export import engine_layer_ids, export_head
from stage2_train.losses import simulated_tau
from stage2_train.trainer import preflight
from stage2_train.vocab import VocabError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from cachefix import build_cache

    root = tmp_path_factory.mktemp("s2cache")
    c, target = build_cache(root, n_samples=48, samples_per_shard=16, topk=8)
    shutil.rmtree(target)  # stage 2 reads only the cache
    assert not target.exists()
    return c


def write_cfg(path: Path, cache: Path, out: Path, **train) -> Path:
    raw = {"name": "t", "target": {"path": "/deleted/target"},
           "train": {"cache": str(cache), "output": str(out), "draft_vocab_size": 128, "ttt_length": 3,
                     "lr": 3e-3, "micro_batch_size": 4, "max_tokens_per_batch": 2048, "val_fraction": 0.15,
                     "save_every": 1000, "eval_every": 1000, "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json"),
                     **train}}
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cmd(cfg: Path, *extra) -> list:
    return [sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress", *extra]


def run(cmd, timeout=240, ok=True):
    """Run in a new session so a timeout can stop the whole tree (torchrun's workers too)."""
    p = finish(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True), timeout)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def most_frequent_baseline(cache: Path, idx) -> float:
    """acc_0 of always drafting the most frequent teacher top-1 (on the held-out positions)."""
    r = CacheReader(cache)
    top = []
    for i in idx:
        s = r.sample(int(i))
        lm, t1 = s["loss_mask"], s["topk_ids"][:, 0]
        top += [int(t1[t + 1]) for t in range(len(lm) - 2) if lm[t + 2]]
    return float(np.bincount(top).max() / len(top))


def hand_counted(head: Path, cache: Path, idx, compute_dtype=None) -> dict:
    """acc_0, acc_1, alpha_0, alpha_1 and the step-0 loss of a head on samples `idx`, counted here sample by sample
    through the head's inference path (`step` with a KV cache and an explicit mask), not through
    stage 2's batching, teacher, TTT unroll or evaluate_model.

    DESIGN.md section 3: row t holds x_t, the features at t and the target's distribution for
    x_{t+1}. Step 0 at row t reads f_t and the embedding of x_{t+1} at position t, and is
    compared with row t+1's top-1 (the target's x_{t+2}) when x_{t+2} is a loss token; step 1
    reads step 0's output at t and x_{t+2} at position t+1, attends to the step-0 keys <= t and
    its own key, and is compared with row t+2 when x_{t+3} is a loss token.
    """
    from schemas.cache import bits_to_bf16
    from stage2_train.precision import compute_context

    r = CacheReader(cache)
    model = load_model(head, r)
    in_draft = model.t2d.numpy()
    hits, counted, alpha, ce_sum, ce_n = [0, 0], [0, 0], [0.0, 0.0], 0.0, 0
    for i in idx:
        s = r.sample(int(i))
        ids = torch.from_numpy(s["input_ids"].astype(np.int64))[None]
        lm, tids, tlps = s["loss_mask"].astype(bool), s["topk_ids"], s["topk_logprobs"].astype(np.float64)
        hid = bits_to_bf16(s["hidden"]).float().reshape(1, ids.shape[1], -1)
        T = ids.shape[1]
        with torch.no_grad(), compute_context(torch.device("cpu"), compute_dtype):
            pos = torch.arange(T - 1)[None]
            out0, (k0, v0) = model.step(model.fuse(hid[:, :T - 1]), ids[:, 1:], pos)
            logits0 = model.logits(out0).double()[0]
            L1 = T - 2
            mask = torch.zeros(L1, 2 * L1, dtype=torch.bool)
            mask[:, :L1] = torch.ones(L1, L1, dtype=torch.bool).tril()
            mask[:, L1:] = torch.eye(L1, dtype=torch.bool)
            out1, _ = model.step(out0[:, :L1], ids[:, 2:], pos[:, :L1] + 1, past=(k0[:, :, :L1], v0[:, :, :L1]),
                                 attn_mask=mask[None, None])
            logits1 = model.logits(out1).double()[0]
        d_of = np.cumsum(in_draft) - 1  # target id -> draft id inside the draft vocab
        for k, logits in enumerate((logits0, logits1)):
            draft = model.draft_to_target(logits.argmax(-1)).numpy()
            q = torch.softmax(logits, -1).numpy()
            for t in range(len(draft)):
                if t + k + 2 < T and lm[t + k + 2]:
                    counted[k] += 1
                    hits[k] += int(draft[t] == tids[t + k + 1, 0])
                    row = t + k + 1   # Σ min(p, q) over the cached top-K the draft can emit
                    keep = in_draft[tids[row]]
                    alpha[k] += float(np.minimum(np.exp(tlps[row][keep]), q[t, d_of[tids[row][keep]]]).sum())
        logp = torch.log_softmax(logits0, -1).numpy()
        for t in range(T - 2):
            row = t + 1
            if not lm[t + 2] or not in_draft[tids[row, 0]]:
                continue
            keep = in_draft[tids[row]]
            p = np.exp(tlps[row][keep] - tlps[row][keep].max())
            p /= p.sum()
            ce_sum -= float((p * logp[t, d_of[tids[row][keep]]]).sum())
            ce_n += 1
    return {"acc": [h / c for h, c in zip(hits, counted)], "loss_0": ce_sum / ce_n, "hits": hits, "counted": counted,
            "alpha": [a / c for a, c in zip(alpha, counted)]}


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("s2learn")
    cfg = write_cfg(d / "cfg.yaml", cache, d / "head", max_steps=150, eval_every=50)
    p = run(train_cmd(cfg))
    return d / "head", cfg, p.stdout


def test_learns_well_above_most_frequent_token(trained, cache):
    head, cfg, stdout = trained
    _, val = split_indices(len(CacheReader(cache)), 0.15, 0)
    base = most_frequent_baseline(cache, val)
    config, _ = load_head(head)
    held = config["training"]["heldout"]
    print(f"most-frequent baseline {base:.3f}, held-out acc {held['acc']}")
    # measured: baseline 0.11, acc_0 after 150 steps 0.45-0.47 (ttt_length 3, lr 3e-3)
    assert base < 0.2
    assert held["acc"][0] > base + 0.25, (held["acc"], base)
    rows = [json.loads(ln) for ln in (head / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert np.mean([r["loss"] for r in rows[-10:]]) < 0.5 * np.mean([r["loss"] for r in rows[:10]])
    assert all(r["grad_norm"] is not None and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] < rows[10]["lr"] and rows[-1]["lr"] < 1e-5          # warmup, then cosine to 0
    assert (head / "train_curves.png").stat().st_size > 10_000
    table = (head / "heldout_table.md").read_text()
    assert "| 0 | " in table and "| 2 | " in table and "simulated acceptance length" in table
    assert "Per-position metrics" in stdout
    # the held-out accuracy, counted by hand (another code path), and stage 3's offline_metrics
    # from the head dir alone, agree with the training's table
    hand = hand_counted(head, cache, val)
    print("hand count", hand)
    np.testing.assert_allclose(held["acc"][:2], hand["acc"], atol=1e-9)
    assert held["loss"][0] == pytest.approx(hand["loss_0"], rel=1e-4)
    np.testing.assert_allclose(held["alpha"][:2], hand["alpha"], atol=2e-6)
    assert all(a <= b <= 1 for a, b in zip(held["alpha"], held["alpha_hi"]))
    assert held["simulated_tau_t1"] == pytest.approx(simulated_tau(held["alpha"]))
    assert all(len(r["alpha_k"]) == len(r["alpha_hi_k"]) == len(r["mass_out_k"]) == 3 for r in rows)
    assert np.mean([r["alpha_k"][0] for r in rows[-10:]]) > np.mean([r["alpha_k"][0] for r in rows[:10]]) + 0.1
    assert "sampling at T = 1" in table
    m = offline_metrics(head, cache, split="val")
    np.testing.assert_allclose(m["acc"], held["acc"], atol=1e-9)
    np.testing.assert_allclose(m["alpha"], held["alpha"], atol=1e-9)
    assert m["simulated_tau"] == pytest.approx(held["simulated_tau"])
    assert m["num_samples"] == len(val)


def test_cpu_evaluation_batches_stay_cache_sized(trained, cache, monkeypatch):
    """On a CPU the held-out batches hold at most CPU_EVAL_BATCH_TOKENS padded tokens (the demo's check
    took 7.8 s in 16,384-token batches, 3.8 s in 2,048: bench/bench_train.py --parts eval) and give
    the numbers of the big batches."""
    import stage2_train.evaluate as ev

    head, _, _ = trained
    reader = CacheReader(cache)
    model = load_model(head, reader)
    idx = np.arange(len(reader))
    padded: list[int] = []
    real = ev.ttt_forward

    def spy(m, batch, *a, **k):
        padded.append(batch["input_ids"].numel())
        return real(m, batch, *a, **k)

    monkeypatch.setattr(ev, "ttt_forward", spy)
    small = ev.evaluate_model(model, reader, idx, ttt_length=3)
    small_batches, padded[:] = list(padded), []
    big = ev.evaluate_model(model, reader, idx, ttt_length=3, max_tokens=ev.EVAL_BATCH_TOKENS)
    assert len(padded) == 1 and len(small_batches) > 1, (small_batches, padded)  # 7,680 padded tokens in all
    assert max(small_batches) <= ev.CPU_EVAL_BATCH_TOKENS
    assert small["counted_tokens"] == big["counted_tokens"] and small["num_tokens"] == big["num_tokens"]
    np.testing.assert_allclose(small["acc"], big["acc"], atol=1e-12)
    np.testing.assert_allclose(small["loss"], big["loss"], rtol=1e-5)
    np.testing.assert_allclose(small["alpha"], big["alpha"], rtol=1e-5)


def test_export_round_trip(trained, cache, tmp_path):
    head, _, _ = trained
    config, tensors = load_head(head)
    assert set(tensors) == set(WEIGHT_KEYS) and "embed_tokens.weight" not in tensors
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == 128 and config["target_hidden_size"] == 64
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]
    tr = config["training"]
    assert tr["cache_id"] and tr["final_step"] == 150 and tr["best_step"] in (50, 100, 150)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert int(tensors["t2d"].sum()) == 128

    r = CacheReader(cache)
    batch_ids = torch.from_numpy(r.sample(0)["input_ids"][:20].astype(np.int64))[None]
    feats = torch.randn(1, 20, 3 * 64)

    def logits_of(d):
        m = load_model(d, r)
        with torch.no_grad():
            h, _ = m.step(m.fuse(feats), batch_ids, torch.arange(20)[None])
            return m.logits(h)

    ref = logits_of(head)
    sg = export_head(head, "sglang", tmp_path / "sg", dtype="float32")
    vl = export_head(head, "vllm", tmp_path / "vl")
    assert torch.equal(logits_of(sg), ref)                       # fp32 export: the same head
    torch.testing.assert_close(logits_of(vl), ref, atol=0.1, rtol=0.05)   # bf16 export
    c_sg, t_sg = load_head(sg)
    c_vl, t_vl = load_head(vl)
    assert set(t_sg) == set(WEIGHT_KEYS) == set(t_vl)
    assert t_vl["fc.weight"].dtype == torch.bfloat16 and t_vl["d2t"].dtype == torch.int64
    # HF index i = input of decoder layer i: vLLM takes it as is; SGLang adds one, so it gets i - 1
    # one export for both engines: top-level (vLLM) = HF ids, eagle_config (SGLang) = HF - 1
    assert c_vl["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3] == c_sg["eagle_aux_hidden_state_layer_ids"]
    assert c_sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2] == \
        c_vl["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert c_sg["eagle_config"]["hf_hidden_states_layer_ids"] == [2, 3, 3] and "training" in c_sg
    assert engine_layer_ids([2, 15, 27], "sglang", 30) == [1, 14, 26]
    with pytest.raises(HeadError, match="layer id 0 .* cannot be captured by sglang"):
        engine_layer_ids([0, 15, 27], "sglang", 30)
    with pytest.raises(HeadError, match="layer id 30 .* cannot be captured by vllm"):
        engine_layer_ids([2, 15, 30], "vllm", 30)


def test_train_loss_reaches_the_unroll(cache, tmp_path):
    """train.loss = tv through `eagle3 train`: with a draft vocab of the whole target vocab every counted
    position is a loss position, so each step's logged loss_k is 1 - alpha_k (it is not under ce)."""
    V = CacheReader(cache).vocab_size
    cfg = write_cfg(tmp_path / "tv.yaml", cache, tmp_path / "tv", max_steps=4, val_fraction=0.0, draft_vocab_size=V,
                    loss="tv", lk_eta=2.0)
    run(train_cmd(cfg))
    rows = [json.loads(ln) for ln in (tmp_path / "tv" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        np.testing.assert_allclose(r["loss_k"], [1 - a for a in r["alpha_k"]], rtol=1e-5)
        assert all(h >= a for h, a in zip(r["alpha_hi_k"], r["alpha_k"])) and r["mass_out_k"] == [0.0] * 3
    tr = json.loads((tmp_path / "tv" / "config.json").read_text())["training"]
    assert tr["loss"] == "tv" and tr["lk_eta"] == 2.0


def test_kill9_then_resume_equals_uninterrupted(cache, tmp_path):
    kw = dict(max_steps=60, save_every=5, val_fraction=0.0, ttt_length=2)
    ref_cfg = write_cfg(tmp_path / "ref.yaml", cache, tmp_path / "ref", **kw)
    cfg = write_cfg(tmp_path / "k.yaml", cache, tmp_path / "k", **kw)
    proc = subprocess.Popen(train_cmd(cfg), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = tmp_path / "k" / "checkpoints" / "latest"
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step00000010":
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = latest.read_text().strip()
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run finished before it could be killed"
    assert not (tmp_path / "k" / "last").exists()
    p = run(train_cmd(cfg))
    assert "resuming at step" in p.stdout
    run(train_cmd(ref_cfg))
    a = load_file(str(tmp_path / "k" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in WEIGHT_KEYS)
    steps = [json.loads(x)["step"] for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    # a checkpoint of another head shape is not silently resumed
    p = run(train_cmd(cfg, "train.draft_vocab_size=64"), ok=False)
    assert p.returncode == 1 and "the checkpoint was trained with draft_vocab_size=128, this run has 64" in p.stderr
    # --restart ignores the checkpoint
    p = run(train_cmd(cfg, "--restart", "train.max_steps=3"))
    assert "resuming" not in p.stdout


def test_bad_configs(cache, tmp_path):
    def cfg(**train):
        return load_config(raw={"target": {"path": "/deleted"}, "train": {"cache": str(cache), **train}})

    with pytest.raises(VocabError, match=r"train.draft_vocab_size 1000 is larger than the target's vocabulary \(320 tokens"):
        preflight(cfg(draft_vocab_size=1000))
    with pytest.raises(CacheError, match=r"cache.json: hidden_size is 64 but 32 was expected"):
        preflight(cfg(draft_vocab_size=64, model_overrides={"hidden_size": 32}))
    with pytest.raises(CacheError, match=r"cache not found: /nowhere/cache \(run `eagle3 extract` first\)"):
        preflight(load_config(raw={"target": {"path": "/x"}, "train": {"cache": "/nowhere/cache"}}))
    with pytest.raises(CacheError, match=r"layers are \[2, 3, 3\] but \[1, 2, 3\] was expected|layers is \[2, 3, 3\]"):
        preflight(load_config(raw={"target": {"path": "/x"}, "extract": {"layers": [1, 2, 3]},
                                   "train": {"cache": str(cache), "draft_vocab_size": 64}}))
    # a head against a cache of another hidden size
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    meta = json.loads((other / "cache.json").read_text())
    meta["target"]["hidden_size"] = 48
    (other / "cache.json").write_text(json.dumps(meta))
    head = tmp_path / "h"
    (head).mkdir()
    from stage2_train.model import Eagle3Draft
    from schemas.head import make_head_config
    from stage2_train.export import write_head

    r = CacheReader(cache)
    write_head(Eagle3Draft(make_head_config(r.target_config(), draft_vocab_size=64, layer_ids=r.layers)), head)
    # the edited cache.json no longer matches its shards: refused when opened (issue 14), before the head check
    with pytest.raises(CacheError, match=r"shard 00000.zarr: shard.json: hidden_size is 64, cache.json says 48"):
        offline_metrics(head, other, split="all")
    # the CLI prints the message, no traceback, exit 1
    bad = write_cfg(tmp_path / "bad.yaml", cache, tmp_path / "o", draft_vocab_size=1000)
    p = run(train_cmd(bad), timeout=120, ok=False)
    assert p.returncode == 1 and "error: train.draft_vocab_size 1000 is larger" in p.stderr
    assert "Traceback" not in p.stderr


def test_bf16_compute_trains_and_offline_metrics_reproduce_it(cache, tmp_path):
    """train.compute_dtype=bfloat16: the run says so, the head records it, and stage 3's offline
    metrics evaluate in the same precision (they reproduce the training's held-out table)."""
    cfg = write_cfg(tmp_path / "c.yaml", cache, tmp_path / "head", max_steps=30, eval_every=15,
                    compute_dtype="bfloat16")
    p = run(train_cmd(cfg))
    assert "float32 weights, bfloat16 compute" in p.stdout
    config, tensors = load_head(tmp_path / "head")
    assert config["training"]["compute_dtype"] == "bfloat16"
    held = config["training"]["heldout"]
    m = offline_metrics(tmp_path / "head", cache, split="val")
    np.testing.assert_allclose(m["acc"], held["acc"], atol=1e-9)
    # Counted by hand in both precisions: the offline numbers are the bf16 ones, not fp32's.
    _, val = split_indices(len(CacheReader(cache)), 0.15, 0)
    hb = hand_counted(tmp_path / "head", cache, val, compute_dtype=torch.bfloat16)
    hf = hand_counted(tmp_path / "head", cache, val)
    print("hand count bf16", hb, "fp32", hf, "offline", m["loss"][0], m["acc"][:2])
    assert abs(m["loss"][0] - hb["loss_0"]) < 0.25 * abs(hb["loss_0"] - hf["loss_0"])
    np.testing.assert_allclose(m["acc"][:2], hb["acc"], atol=2.0 / min(hb["counted"]))
    rows = [json.loads(ln) for ln in (tmp_path / "head" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
