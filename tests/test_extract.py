"""Stage 1 extraction: round trips against direct forwards, padding-free layout, refusals, SmolLM2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from schemas.cache import ARRAYS, CacheError, CacheReader, EMBED_FILE, bits_to_bf16, committed_shards
from schemas.config import load_config
from stage1_extract.extract import Extractor, make_batches, pad_batch, run_extract
from tiny import sharegpt_rows, tiny_target, write_jsonl

FP16_ULP = 2.0 ** -10  # relative spacing of float16 (log-probs are stored in fp16)


def _cfg(tdir, data, cache, **extract):
    ex = {"cache": str(cache), "samples_per_shard": 4, "max_tokens_per_batch": 160, "topk": 8,
          "logits_chunk_tokens": 37, "layers": [1, 3, 5], **extract}
    return load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)], "max_length": 96},
                            "extract": ex})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", sharegpt_rows(10, seed=3, turns=2))


def _direct(model, ids, mask, layers, K):
    """Reference: the model's own forward on the same padded batch, logits materialised."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    flat = mask.reshape(-1).bool()
    hid = torch.stack([out.hidden_states[i] for i in layers], 2).reshape(-1, 3, out.hidden_states[0].shape[-1])[flat]
    lp = torch.log_softmax(out.logits.float(), -1).reshape(-1, out.logits.shape[-1])[flat]
    v, i = lp.topk(K, -1)
    return hid.to(torch.bfloat16), i, v, lp


@pytest.mark.parametrize("family", ["llama", "qwen3", "minicpm3"])
def test_round_trip_matches_direct_and_unpadded_forward(tmp_path, data_file, family):
    from transformers import AutoModelForCausalLM

    tdir = tiny_target(tmp_path / "t", family)
    cfg = _cfg(tdir, data_file, tmp_path / "cache")
    rep = {}
    root = run_extract(cfg, progress=False, report=rep)
    assert rep["logits_path"] == "head"  # chunked lm_head agreed with the model's own logits
    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    r = CacheReader(root, expect={"layers": [1, 3, 5], "topk": 8, "hidden_size": 64})
    meta = r.meta
    assert meta["target"]["model_type"] == family and meta["target"]["dtype"] == "float32"
    # the raw embedding matrix + the scale the model applies (MiniCPM: scale_emb = 12)
    want_scale = 12.0 if family == "minicpm3" else 1.0
    assert meta["embed_scale"] == pytest.approx(want_scale)
    emb = r.load_embedding()
    assert torch.equal(emb, model.get_input_embeddings().weight.detach())
    K, layers = 8, [1, 3, 5]
    n_checked = 0
    for k in r.shard_ids:
        sh = r.shards[k]
        o = sh.offsets
        lengths = np.diff(o)
        arr = sh.rows(0, int(o[-1]))
        # padding-free: T is the sum of real lengths
        assert arr["input_ids"].shape[0] == lengths.sum() == sh.info["tokens"]
        seqs = [arr["input_ids"][o[j]:o[j + 1]] for j in range(len(lengths))]
        # the batches stage 1 ran, rebuilt, and the same padded forward done directly
        for batch in make_batches(lengths.tolist(), cfg.extract.max_tokens_per_batch):
            ids, mask = pad_batch([seqs[j] for j in batch], 0)
            hid, tid, tlp, _ = _direct(model, ids, mask, layers, K)
            rows = np.concatenate([np.arange(o[j], o[j + 1]) for j in batch])
            got_h = arr["hidden"][rows]
            assert np.array_equal(got_h, hid.view(torch.int16).numpy().view(np.uint16)), "hidden bits differ"
            got_ids, got_lp = arr["topk_ids"][rows], arr["topk_logprobs"][rows].astype(np.float32)
            same = got_ids == tid.numpy()
            if not same.all():  # a different GEMM shape may only reorder exactly tied candidates
                r_, c_ = np.nonzero(~same)
                assert np.allclose(got_lp[r_, c_], tlp.numpy()[r_, c_], atol=1e-6), "top-K ids differ"
            assert np.allclose(got_lp, tlp.numpy(), rtol=FP16_ULP, atol=1e-4)
            n_checked += len(batch)
        # unpadded single-sample forward: within bf16 rounding
        for j in range(len(lengths)):
            x = torch.from_numpy(seqs[j].astype(np.int64))[None]
            with torch.no_grad():
                out = model(input_ids=x, output_hidden_states=True)
            ref = torch.stack([out.hidden_states[i][0] for i in layers], 1)
            got = bits_to_bf16(arr["hidden"][o[j]:o[j + 1]]).float()
            assert torch.allclose(got, ref, rtol=2 ** -7, atol=1e-4), (family, j, float((got - ref).abs().max()))
            lp = torch.log_softmax(out.logits[0].float(), -1)
            top = lp.topk(K, -1)
            assert (arr["topk_ids"][o[j]:o[j + 1], 0] == top.indices[:, 0].numpy()).mean() > 0.99
            assert np.allclose(arr["topk_logprobs"][o[j]:o[j + 1]].astype(np.float32), top.values.numpy(),
                               rtol=2 ** -7, atol=2e-3)
    assert n_checked == len(r) == 10


def test_layout_offsets_counts_and_ordering(tmp_path, data_file):
    from stage1_extract.tokenize import build_samples
    from transformers import AutoTokenizer

    tdir = tiny_target(tmp_path / "t", "llama")
    cfg = _cfg(tdir, data_file, tmp_path / "cache", samples_per_shard=3)
    root = run_extract(cfg, progress=False)
    samples, _ = build_samples(cfg, AutoTokenizer.from_pretrained(str(tdir)))
    assert committed_shards(root) == [0, 1, 2, 3]  # 10 samples, 3 a shard
    r = CacheReader(root)
    V = r.vocab_size
    for k in r.shard_ids:
        sh = r.shards[k]
        mine = samples[3 * k:3 * k + 3]
        lens = [len(s.input_ids) for s in mine]
        assert sh.offsets.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
        assert sh.small("sample_index").tolist() == [s.sample_index for s in mine]
        rows = sh.rows(0, sum(lens), ["input_ids", "loss_mask"])
        assert np.array_equal(rows["input_ids"], np.concatenate([s.input_ids for s in mine]))
        assert np.array_equal(rows["loss_mask"], np.concatenate([s.loss_mask for s in mine]))
        want = np.bincount(rows["input_ids"][rows["loss_mask"] == 1], minlength=V)
        assert np.array_equal(sh.small("token_counts"), want)
        info = sh.info
        assert info["samples"] == len(mine) and info["tokens"] == sum(lens)
        assert info["loss_tokens"] == int(sum(s.loss_mask.sum() for s in mine))
        assert set(info["checksums"]) == set(ARRAYS)
    meta = json.loads((root / "cache.json").read_text())
    assert meta["num_shards"] == 4 and meta["samples_per_shard"] == 3 and meta["data"]["num_samples"] == 10
    assert meta["data"]["sources"][0]["sha256"] and meta["tokenizer"]["chat_template_sha256"]
    for f in ("config.json", "tokenizer.json", EMBED_FILE):
        assert (root / "target" / f).is_file()
    assert (root / "manifest.parquet").is_file()


def test_refuses_a_cache_made_differently_and_skips_committed(tmp_path, data_file):
    tdir = tiny_target(tmp_path / "t", "llama")
    cache = tmp_path / "cache"
    run_extract(_cfg(tdir, data_file, cache), progress=False)
    with pytest.raises(CacheError, match=r"layers \(extract.layers\): cache has \[1, 3, 5\], this run has \[1, 2, 5\]"):
        run_extract(_cfg(tdir, data_file, cache, layers=[1, 2, 5]), progress=False)
    with pytest.raises(CacheError, match=r"K \(extract.topk\): cache has 8, this run has 4"):
        run_extract(_cfg(tdir, data_file, cache, topk=4), progress=False)
    other = tiny_target(tmp_path / "t2", "llama", seed=1, layers=4)
    with pytest.raises(CacheError, match=r"target \(num_hidden_layers\): cache has 6, this run has 4"):
        run_extract(_cfg(other, data_file, cache, layers=[1, 2, 3]), progress=False)
    before = {p.name: (p / "shard.json").stat().st_mtime_ns for p in (cache / "shards").iterdir()}
    rep = {}
    run_extract(_cfg(tdir, data_file, cache), progress=False, report=rep)
    assert rep["shards_skipped"] == 3 and rep["shards_written"] == 0
    assert before == {p.name: (p / "shard.json").stat().st_mtime_ns for p in (cache / "shards").iterdir()}


def test_model_logits_path_equals_chunked_head_path(tmp_path):
    """The fallback (model's own logits, reduced in chunks) and the lm_head path agree."""
    from transformers import AutoModelForCausalLM

    tdir = tiny_target(tmp_path / "t", "minicpm3")
    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    ids, mask = pad_batch([np.arange(3, 40), np.arange(50, 61)], 0)
    a = Extractor(model, [0, 2, 6], 5, chunk_tokens=7, logits_path="head")(ids, mask)
    b = Extractor(model, [0, 2, 6], 5, chunk_tokens=1000, logits_path="model")(ids, mask)
    assert a[0].shape == (48, 3, 64) and torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.allclose(a[2].float(), b[2].float(), rtol=FP16_ULP, atol=1e-4)


def test_make_batches_respects_the_token_budget():
    lengths = [5, 30, 12, 12, 40, 7, 100]
    b = make_batches(lengths, 64)
    assert sorted(i for x in b for i in x) == list(range(7))
    assert b[0] == [6]  # longer than the budget: alone
    for x in b[1:]:
        assert len(x) * max(lengths[i] for i in x) <= 64
    assert [lengths[x[0]] for x in b] == sorted((lengths[x[0]] for x in b), reverse=True)


@pytest.mark.real_model
def test_smollm2_alpaca_eval(tmp_path, smollm2_target, shared_data):
    from schemas.target import load_target

    data = shared_data / "alpaca_eval" / "train_llama3_8b_instruct.sharegpt.jsonl"
    cfg = load_config(raw={"target": smollm2_target.model_dump(),
                           "data": {"train": [str(data)], "max_samples": 16, "max_length": 96},
                           "extract": {"cache": str(tmp_path / "cache"), "samples_per_shard": 8,
                                       "max_tokens_per_batch": 1024, "topk": 16}})
    target = load_target(cfg.target)
    root = run_extract(cfg, progress=False, target=target)
    model = target[0]
    r = CacheReader(root, expect={"hidden_size": 576, "vocab_size": 49152, "layers": [2, 15, 27]})
    assert len(r) == 16 and r.shard_ids == [0, 1]
    from pipeline.cmd_shards import cache_stats, verify_cache

    assert verify_cache(root)["ok"]
    st = cache_stats(root)
    assert st["samples"] == 16 and st["tokens"] == int(r.lengths().sum())
    assert 0.5 < st["topk_mass_mean"] <= 1.0 + 1e-3
    d = r.sample(5)
    x = torch.from_numpy(d["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    ref = torch.stack([out.hidden_states[i][0] for i in (2, 15, 27)], 1)
    got = bits_to_bf16(d["hidden"]).float()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < 2 ** -7, float(rel)
    top1 = torch.log_softmax(out.logits[0].float(), -1).argmax(-1).numpy()
    assert (d["topk_ids"][:, 0] == top1).mean() > 0.98
