"""fp8 hidden states (extract.hidden_dtype=fp8): error bounds of the e4m3 round trip, an fp8
cache next to a bf16 cache of the same target, and the tools that read both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import CacheReader, bits_to_bf16
from schemas.config import load_config
from schemas.fp8 import E4M3_MAX, dequantize_to_bf16_bits, quantize_e4m3, quantize_packed
from stage1_extract.extract import run_extract
from tiny import sharegpt_rows, tiny_target, write_jsonl

runner = CliRunner()


def round_trip(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_e4m3(x)
    back = bits_to_bf16(dequantize_to_bf16_bits(q.numpy(), scale.numpy())).float()
    return back, scale.float()


def test_round_trip_error_is_within_the_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 256, generator=g) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    x[5, 1] = 0.0  # an all-zero row stays zero
    x[7, 2, 3] = 5e4  # one outlier per row: the scale follows it
    x = x.to(torch.bfloat16)
    back, scale = round_trip(x)
    xf = x.float()
    bound = 2 ** -4 * xf.abs() + 2 ** -9 * scale.unsqueeze(-1) + 2 ** -8 * back.abs()
    assert ((back - xf).abs() <= bound).all()
    assert (back[5, 1] == 0).all()
    # the bound is not loose: the typical relative error of normal values is a few percent at most
    rel = ((back - xf).abs() / xf.abs().clamp_min(1e-30))[xf.abs() > scale.unsqueeze(-1) * 2 ** -6]
    assert 0.005 < float(rel.mean()) < 0.03


def test_values_on_the_e4m3_grid_come_back_exactly():
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid.abs() <= E4M3_MAX)]
    x = (grid[torch.randperm(len(grid))[:128]] * 0.5).view(1, 1, 128)  # scale = amax / 448 = 0.5
    x[0, 0, 0] = E4M3_MAX * 0.5
    back, scale = round_trip(x)
    assert float(scale) == 0.5
    assert torch.equal(back, x)


def test_packed_form_carries_the_same_bits():
    x = torch.randn(10, 3, 32, dtype=torch.bfloat16)
    q, scale = quantize_e4m3(x)
    p = quantize_packed(x)
    assert p.dtype == torch.uint8 and p.shape == (10, 3, 34)
    assert torch.equal(p[..., :32], q)
    assert torch.equal(p[..., 32:].contiguous().view(torch.float16)[..., 0], scale)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(8, seed=2))
    out = {"target": tdir, "data": data}
    for dt in ("bf16", "fp8"):
        cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                               "extract": {"cache": str(tmp / f"cache-{dt}"), "samples_per_shard": 3, "topk": 4,
                                           "layers": [1, 3, 5], "chunk_rows": 32, "hidden_dtype": dt}})
        out[dt] = run_extract(cfg, progress=False)
    return out


def test_fp8_cache_reads_as_bf16_close_to_the_bf16_cache(caches):
    a, b = CacheReader(caches["bf16"]), CacheReader(caches["fp8"])
    assert a.hidden_dtype == "bfloat16" and b.hidden_dtype == "float8_e4m3fn"
    assert json.loads((caches["fp8"] / "cache.json").read_text())["hidden_dtype"] == "float8_e4m3fn"
    assert len(a) == len(b)
    for i in range(len(a)):
        sa, sb = a.sample(i), b.sample(i)
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(sa[name], sb[name])
        assert sb["hidden"].dtype == np.uint16 and sb["hidden"].shape == sa["hidden"].shape
        x, y = bits_to_bf16(sa["hidden"]).float(), bits_to_bf16(sb["hidden"]).float()
        scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
        assert ((y - x).abs() <= 2 ** -4 * x.abs() + 2 ** -9 * scale + 2 ** -8 * y.abs()).all()
    disk = lambda c: sum(f.stat().st_size for f in (c / "shards").rglob("*") if f.is_file())  # noqa: E731
    assert disk(caches["fp8"]) < 0.7 * disk(caches["bf16"])


def test_stats_verify_and_loader_understand_fp8(caches):
    from stage2_train.data import collate
    from stage2_train.loader import CacheLoader
    from stage2_train.sampler import chunk_aware_order

    res = runner.invoke(app, ["shards", "stats", str(caches["fp8"]), "--json"])
    assert res.exit_code == 0, res.stdout
    assert json.loads(res.stdout)["hidden_dtype"] == "float8_e4m3fn"
    res = runner.invoke(app, ["shards", "stats", str(caches["fp8"])])
    assert "hidden states float8_e4m3fn (one fp16 scale per token per layer)" in " ".join(res.stdout.split())
    res = runner.invoke(app, ["shards", "verify", str(caches["fp8"])])
    assert res.exit_code == 0, res.stdout
    r = CacheReader(caches["fp8"])
    o = chunk_aware_order(np.array([x.shard for x in r.refs]), r.lengths(), np.arange(len(r)), micro_batch_size=2,
                          max_tokens=4096, seed=0, epoch=0)
    t2d = np.arange(r.vocab_size)
    for got, ids in zip(CacheLoader(r, o.arrivals, o.batches, t2d), o.batches):
        want = collate([r.sample(i) for i in ids], t2d, sample_ids=ids)
        assert torch.equal(got["hidden"], want["hidden"]) and got["hidden"].dtype == torch.bfloat16


def test_resuming_an_extraction_with_another_hidden_dtype_is_refused(caches):
    cfg = load_config(raw={"target": {"path": str(caches["target"])}, "data": {"train": [str(caches["data"])]},
                           "extract": {"cache": str(caches["bf16"]), "samples_per_shard": 3, "topk": 4,
                                       "layers": [1, 3, 5], "chunk_rows": 32, "hidden_dtype": "fp8"}})
    with pytest.raises(Exception, match=r"hidden dtype \(extract.hidden_dtype\): cache has 'bfloat16', this run has "
                                        r"'float8_e4m3fn'"):
        run_extract(cfg, progress=False)
