"""Issue 19: token-sized shards, chunks written as they fill, a bounded writer, one load of the target."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.cache import SHARD_JSON, CacheError, CacheReader, committed_shards
from schemas.cache_write import chunked_checksum
from schemas.config import load_config
from stage1_extract.extract import (auto_chunk_rows, make_batches, run_extract, shard_batches, shard_starts,
                                    split_by_tokens)
from tiny import sharegpt_rows, tiny_target, write_jsonl


def test_shards_close_before_the_sample_that_passes_the_token_or_sample_bound():
    lengths = [5, 5, 5, 20, 3, 3, 3, 3]
    assert shard_starts(lengths, 3, 12) == [0, 2, 3, 4, 7, 8]  # 20 > 12 tokens: a shard of its own
    assert shard_starts(lengths, 3, None) == [0, 3, 6, 8]  # older caches: samples_per_shard alone
    assert shard_starts(lengths, 100, 1 << 20) == [0, 8]
    assert split_by_tokens([], 10) == [0]


def test_batches_stay_inside_windows_and_one_window_is_make_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, 60).tolist()
    assert shard_batches(lengths, 128, sum(lengths)) == make_batches(lengths, 128)
    bounds = split_by_tokens(lengths, 300)
    window_of = np.searchsorted(bounds, np.arange(len(lengths)), side="right") - 1
    got = shard_batches(lengths, 128, 300)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert all(len({int(window_of[i]) for i in b}) == 1 for b in got)
    assert all(sum(lengths[bounds[w]:bounds[w + 1]]) <= 300 or bounds[w + 1] - bounds[w] == 1
               for w in range(len(bounds) - 1))


@pytest.mark.parametrize("mean, rows", [(2500, 512), (400, 64), (50, 32), (20000, 2048), (1024, 256)])
def test_auto_chunk_rows_is_a_quarter_of_the_mean_length(mean, rows):
    assert auto_chunk_rows([mean] * 10) == rows


def test_an_array_streamed_in_pieces_is_the_array_written_whole(tmp_path):
    import zarr

    from schemas.cache_write import ArrayStream, write_array

    rng = np.random.default_rng(1)  # finite bf16 bits (the reader refuses NaN/inf patterns), either sign
    a = (rng.integers(0, 0x7F00, (1000, 3, 16)) | (rng.integers(0, 2, (1000, 3, 16)) << 15)).astype(np.uint16)
    write_array(tmp_path / "whole", a, chunk_rows=64, compressor="zstd", attributes={}, threads=2)
    s = ArrayStream(tmp_path / "pieces", a.shape, a.dtype, chunk_rows=64, compressor="zstd", attributes={},
                    threads=2)
    cuts = [0, 1, 7, 64, 65, 200, 333, 999, 1000]
    for x, y in zip(cuts[:-1], cuts[1:]):
        s.append(a[x:y])
    nbytes, sha = s.close()
    f = Path("c") / "0" / "0" / "0"
    assert (tmp_path / "pieces" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes()
    assert nbytes == (tmp_path / "pieces" / f).stat().st_size and sha == chunked_checksum(a, 64)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "pieces"), mode="r")[...], a)
    # rows in any order: each chunk goes when complete; zarr and our reader see the same array
    s3 = ArrayStream(tmp_path / "shuffled", a.shape, a.dtype, chunk_rows=64, compressor="zstd", attributes={},
                     threads=2)
    blocks = [(x, y) for x, y in zip(range(0, 1000, 37), list(range(37, 1000, 37)) + [1000])]
    held = []
    for j in np.random.default_rng(2).permutation(len(blocks)):
        x, y = blocks[j]
        s3.put(x, a[x:y])
        held.append(s3.held_rows)
    assert s3.close()[1] == sha and max(held) < 1000 // 2 and held[-1] == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "shuffled"), mode="r")[...], a)
    from schemas.cache_read import ChunkedArray

    (tmp_path / "shard").mkdir()
    (tmp_path / "shuffled").rename(tmp_path / "shard" / "hidden")
    np.testing.assert_array_equal(ChunkedArray(tmp_path / "shard", "hidden").rows(0, 1000), a)
    with pytest.raises(ValueError, match=r"handed over twice"):
        s4 = ArrayStream(tmp_path / "twice", a.shape, a.dtype, chunk_rows=64, compressor="zstd", attributes={})
        s4.put(0, a[:64])
        s4.put(10, a[10:20])
    s2 = ArrayStream(tmp_path / "short", a.shape, a.dtype, chunk_rows=64, compressor="zstd", attributes={})
    s2.append(a[:10])
    with pytest.raises(ValueError, match=r"rows of 16 inner chunks were never handed over \(first: chunk 0, "
                                         r"rows 0..64\)"):
        s2.close()
    s2.abort()


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(40, seed=11, turns=3))
    return tmp, tdir, data


def _cfg(varied, cache: Path, **extract):
    tmp, tdir, data = varied
    ex = {"cache": str(cache), "samples_per_shard": 1000, "max_tokens_per_batch": 192, "topk": 4,
          "layers": [1, 3, 5], **extract}
    return load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]}, "extract": ex})


def _checksums(root: Path) -> dict:
    return {p.name: json.loads((p / SHARD_JSON).read_text())["checksums"] for p in sorted((root / "shards").iterdir())}


def test_the_writer_holds_at_most_a_window_of_rows(varied, one_thread):
    tmp = varied[0]
    small, whole = {}, {}
    a = run_extract(_cfg(varied, tmp / "w256", window_tokens=256), progress=False, report=small)
    b = run_extract(_cfg(varied, tmp / "wall", window_tokens=1 << 20), progress=False, report=whole)
    r = CacheReader(a)
    T, C = int(r.lengths().sum()), small["chunk_rows"]
    assert r.shard_ids == [0] and T > 4 * 256 and C < 256  # one shard, four windows and more
    # only the chunks waiting for rows of samples not computed yet are held: with one window over
    # the whole shard (longest first) that is still far from the shard
    assert 0 < whole["peak_held_rows"] < T // 2
    # at most a window (256 tokens, or one longer sample) and the chunk it shares with the one before
    assert 0 < small["peak_held_rows"] < max(256, int(r.lengths().max())) + C
    assert small["window_tokens"] == 256
    ra, rb = r.shards[0], CacheReader(b).shards[0]
    for name in ("input_ids", "loss_mask", "offsets", "sample_index", "token_counts"):
        np.testing.assert_array_equal(ra.small(name) if name in ("offsets", "sample_index", "token_counts")
                                      else ra.read(name, 0, T), rb.small(name) if name in
                                      ("offsets", "sample_index", "token_counts") else rb.read(name, 0, T))
    from pipeline.cmd_shards import verify_cache

    assert verify_cache(a)["ok"] and verify_cache(b)["ok"]


def test_token_sized_shards_are_the_same_for_any_number_of_workers(varied, one_thread):
    tmp = varied[0]
    ref = run_extract(_cfg(varied, tmp / "t1", shard_tokens=700, samples_per_shard=9), progress=False)
    meta = json.loads((ref / "cache.json").read_text())
    lengths = CacheReader(ref).lengths()
    assert meta["shard_starts"] == shard_starts(lengths, 9, 700) and meta["shard_tokens"] == 700
    assert meta["num_shards"] == len(meta["shard_starts"]) - 1 == len(committed_shards(ref)) >= 4
    for k in committed_shards(ref):
        info = json.loads((ref / "shards" / f"{k:05d}.zarr" / SHARD_JSON).read_text())
        assert info["tokens"] <= 700 or info["samples"] == 1
        assert info["samples"] <= 9
    cfg2 = _cfg(varied, tmp / "t2", shard_tokens=700, samples_per_shard=9)
    run_extract(cfg2, worker="1/2", progress=False)
    run_extract(cfg2, worker="0/2", progress=False)
    assert _checksums(tmp / "t2") == _checksums(ref)
    assert meta["codec"]["chunk_rows"] == auto_chunk_rows(lengths)
    zj = json.loads((ref / "shards" / "00000.zarr" / "hidden" / "zarr.json").read_text())
    assert zj["codecs"][0]["configuration"]["chunk_shape"][0] == auto_chunk_rows(lengths)


def test_a_cache_from_before_token_sized_shards_is_extended_and_another_layout_refused(varied, one_thread):
    tmp = varied[0]
    cache = tmp / "old"
    cfg = _cfg(varied, cache, samples_per_shard=8)
    run_extract(cfg, worker="0/2", progress=False)
    cj = cache / "cache.json"
    meta = json.loads(cj.read_text())
    for key in ("shard_tokens", "shard_starts"):  # what a cache written before issue 19 lacks
        meta.pop(key)
    cj.write_text(json.dumps(meta))
    rep = {}
    run_extract(cfg, worker="1/2", progress=False, report=rep)  # the default shard_tokens keeps its layout
    assert rep["shards_written"] == 2 and committed_shards(cache) == [0, 1, 2, 3, 4]
    assert len(CacheReader(cache)) == 40
    with pytest.raises(CacheError, match=r"shard layout \(extract.samples_per_shard / extract.shard_tokens\): "
                                         r"cache has 5 shards starting at samples \[0, 8, 16, 24\]\.\.\., this run "
                                         r"makes \d+ .*set extract.shard_tokens=null to extend it"):
        run_extract(_cfg(varied, cache, samples_per_shard=8, shard_tokens=300), progress=False)


def test_the_target_is_loaded_straight_onto_its_device(tmp_path, monkeypatch):
    """from_pretrained places the weights (device_map); nothing moves a whole model afterwards."""
    import transformers

    from schemas.config import TargetConfig
    from schemas.target import load_target

    tdir = tiny_target(tmp_path / "t", "llama")
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        seen.update(k)
        return real(cls, *a, **k)

    def no_move(self, *a, **k):
        raise AssertionError("the whole model was moved after loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(torch.nn.Module, "to", no_move)
    model, _, _ = load_target(TargetConfig(path=str(tdir), dtype="float32", device="cpu"))
    assert seen["device_map"] == torch.device("cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_one_eagle3_run_loads_the_target_once_for_both_splits(varied, monkeypatch, one_thread):
    import schemas.target
    from pipeline.run import do_extract

    tmp, tdir, data = varied
    real, calls = schemas.target.load_target, []

    def counting(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(schemas.target, "load_target", counting)
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)], "eval": [str(data)],
                                                                   "max_samples": 6},
                           "extract": {"cache": str(tmp / "run" / "cache"), "topk": 4, "layers": [1, 3, 5]}})
    info = do_extract(cfg, progress=False, log=lambda s: None)
    assert len(calls) == 1
    assert committed_shards(info["cache"]) == [0] and committed_shards(info["eval_cache"]) == [0]


def test_shards_with_whole_array_checksums_still_verify_next_to_new_ones(tmp_path):
    """Shards written before per-chunk checksums record the sha256 of each whole array."""
    from cachefix import build_cache
    from pipeline.cmd_shards import verify_cache
    from schemas.cache import shards_dir, verify_shard
    from test_chunk_integrity import flip_byte_in_chunk, rewrite_with_old_code

    cache, _ = build_cache(tmp_path / "c", n_samples=12, samples_per_shard=4, topk=4)
    rewrite_with_old_code(cache, 1)  # the writer of edbc6e1: zarr's, whole-array sha256
    old = json.loads((shards_dir(cache) / "00001.zarr" / SHARD_JSON).read_text())
    new = json.loads((shards_dir(cache) / "00000.zarr" / SHARD_JSON).read_text())
    assert "checksum_kind" not in old and new["checksum_kind"] == "sha256 of chunks"
    assert verify_cache(cache)["ok"]
    for k in (0, 1):
        f = shards_dir(cache) / f"{k:05d}.zarr" / "topk_logprobs" / "c" / "0" / "0"
        flip_byte_in_chunk(f, 0)
        problems = verify_shard(shards_dir(cache) / f"{k:05d}.zarr", vocab_size=CacheReader(cache).vocab_size)
        assert any(p.startswith("topk_logprobs: ") for p in problems), problems
