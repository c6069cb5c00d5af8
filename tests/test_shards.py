"""`eagle3 shards ls|inspect|verify|stats|index`: numbers against hand computations, corruption detection."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import ARRAYS, CacheReader, bits_to_bf16, committed_shards
from schemas.config import load_config
from stage1_extract.extract import run_extract
from tiny import sharegpt_rows, tiny_target, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(9, seed=5))
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                           "extract": {"cache": str(tmp / "cache"), "samples_per_shard": 4, "topk": 6,
                                       "layers": [1, 3, 5]}})
    return run_extract(cfg, progress=False)


def _run(*args):
    res = runner.invoke(app, ["shards", *map(str, args)])
    return res.exit_code, res.stdout + (res.stderr if res.stderr_bytes is not None else "")


def _json(*args):
    code, text = _run(*args, "--json")
    assert code == 0, text
    return json.loads(text)


def test_ls_lists_committed_and_never_calls_leftovers_committed(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    # what a killed run leaves: a temp dir mid-write, and a renamed dir without shard.json
    shutil.copytree(c / "shards" / "00001.zarr", c / "shards" / ".tmp-00004-999.zarr")
    (c / "shards" / ".tmp-00004-999.zarr" / "shard.json").unlink()
    shutil.copytree(c / "shards" / "00001.zarr", c / "shards" / "00005.zarr")
    (c / "shards" / "00005.zarr" / "shard.json").unlink()
    rows = {r["name"]: r for r in _json("ls", c)}
    assert [n for n, r in rows.items() if r["status"] == "committed"] == ["00000.zarr", "00001.zarr", "00002.zarr"]
    assert rows[".tmp-00004-999.zarr"]["status"] == "uncommitted (temp)"
    assert rows["00005.zarr"]["status"].startswith("incomplete")
    assert committed_shards(c) == [0, 1, 2]
    r = CacheReader(cache)
    for k in r.shard_ids:
        row, info = rows[f"{k:05d}.zarr"], r.shards[k].info
        assert (row["samples"], row["tokens"], row["loss_tokens"]) == (info["samples"], info["tokens"],
                                                                       info["loss_tokens"])
        disk = sum(f.stat().st_size for f in (cache / "shards" / f"{k:05d}.zarr").rglob("*") if f.is_file())
        assert row["disk_bytes"] == disk and row["ratio"] == round(info["raw_bytes"] / disk, 3)
    assert [s["samples"] for s in rows.values() if s["status"] == "committed"] == [4, 4, 1]
    code, text = _run("ls", c)
    assert code == 0 and "uncommitted (temp)" in text and "3 committed shards, 9 samples" in text


def test_verify_passes_then_names_each_corrupted_array(cache, tmp_path):
    code, text = _run("verify", cache)
    assert code == 0 and "3 shards checked, 0 bad" in text
    for name in ARRAYS:
        c = tmp_path / name
        shutil.copytree(cache, c)
        files = sorted((c / "shards" / "00001.zarr" / name / "c").rglob("*"), key=lambda f: f.stat().st_size)
        f = [x for x in files if x.is_file()][-1]
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40  # one flipped bit in one byte of the stored (compressed) data
        f.write_bytes(bytes(b))
        code, text = _run("verify", c)
        assert code == 1, (name, text)
        assert f"BAD 00001.zarr: {name}:" in text, text
        assert "00000.zarr" not in text.split("bad")[-1] and "BAD 00000" not in text and "BAD 00002" not in text
        res = json.loads(runner.invoke(app, ["shards", "verify", str(c), "--json"]).stdout)
        assert list(res["bad"]) == ["00001.zarr"] and res["bad"]["00001.zarr"][0].startswith(name + ":")
        shutil.rmtree(c)


def test_verify_reports_a_shape_lie_in_shard_json(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    p = c / "shards" / "00000.zarr" / "shard.json"
    info = json.loads(p.read_text())
    info["tokens"] += 1
    p.write_text(json.dumps(info))
    code, text = _run("verify", c)
    assert code == 1 and "BAD 00000.zarr: input_ids: shape" in text


def test_stats_match_hand_computation(cache):
    s = _json("stats", cache)
    r = CacheReader(cache)
    lps = np.concatenate([r.shards[k].rows(0, r.shards[k].info["tokens"], ["topk_logprobs"])["topk_logprobs"]
                          for k in r.shard_ids]).astype(np.float32)
    mass = np.exp(lps).sum(-1)
    tokens = sum(r.shards[k].info["tokens"] for k in r.shard_ids)
    disk = sum(f.stat().st_size for f in (cache / "shards").rglob("*") if f.is_file())
    assert s["samples"] == 9 and s["tokens"] == tokens == int(r.lengths().sum())
    assert s["loss_tokens"] == sum(int(r.sample(i)["loss_mask"].sum()) for i in range(len(r)))
    assert s["bytes"] == disk and s["bytes_per_token"] == round(disk / tokens, 2)
    assert s["topk_mass_mean"] == pytest.approx(mass.mean(), abs=1e-5)
    assert s["topk_mass_p5"] == pytest.approx(np.percentile(mass, 5), abs=2e-4)
    counts = r.token_counts()
    # the tiny vocab (320) is below 8k: every loss token is covered
    assert s["coverage"] == {"8192": 1.0, "16384": 1.0, "32768": 1.0}
    assert s["distinct_loss_tokens"] == int((counts > 0).sum())


def test_stats_coverage_of_the_n_most_frequent(cache, monkeypatch):
    """Coverage buckets below the vocabulary size, counted by hand from the loss-masked ids."""
    import pipeline.cmd_shards as cmd_shards

    r = CacheReader(cache)
    ids = np.concatenate([r.sample(i)["input_ids"][r.sample(i)["loss_mask"].astype(bool)] for i in range(len(r))])
    freq = sorted(np.unique(ids, return_counts=True)[1].tolist(), reverse=True)
    assert len(freq) > 12  # enough distinct tokens for the buckets below to differ
    monkeypatch.setattr(cmd_shards, "COVERAGE_N", (1, 4, 12))
    got = cmd_shards.cache_stats(cache)["coverage"]
    assert got == {str(n): round(sum(freq[:n]) / len(ids), 6) for n in (1, 4, 12)}
    assert got["1"] < got["4"] < got["12"] < 1.0


def test_inspect_shows_marked_text_norms_and_candidates(cache):
    from transformers import AutoTokenizer

    r = CacheReader(cache)
    i = 5
    ref = r.refs[i]
    res = _json("inspect", cache, ref.sample_index)
    d = r.sample(i)
    tok = AutoTokenizer.from_pretrained(str(cache / "target"))
    assert res["tokens"] == ref.length and res["loss_tokens"] == int(d["loss_mask"].sum())
    text = res["text"]
    assert text.replace("«", "").replace("»", "") == "".join(tok.decode([int(t)]) for t in d["input_ids"])
    masked = "".join(tok.decode([int(t)]) for t, m in zip(d["input_ids"], d["loss_mask"]) if m)
    assert "".join(seg.split("»")[0] for seg in text.split("«")[1:]) == masked
    h = bits_to_bf16(d["hidden"]).float().numpy()
    for j, L in enumerate(res["layers"]):
        assert L["layer"] == [1, 3, 5][j]
        assert L["norm_mean"] == pytest.approx(np.linalg.norm(h[:, j], axis=-1).mean(), abs=1e-3)
        assert L["max"] == pytest.approx(h[:, j].max(), abs=1e-3)
    for p in res["topk"]:
        t = p["position"]
        assert d["loss_mask"][t + 1] == 1
        assert [c["id"] for c in p["candidates"]] == d["topk_ids"][t, :5].tolist()
        assert p["candidates"][0]["prob"] == pytest.approx(np.exp(float(d["topk_logprobs"][t, 0])), abs=1e-4)
    code, text = _run("inspect", cache, 999)
    assert code == 1 and "sample 999 is not in" in text


def test_index_rebuilds_the_manifest_and_missing_cache_is_a_clear_error(cache, tmp_path):
    import pyarrow.parquet as pq

    c = tmp_path / "c"
    shutil.copytree(cache, c)
    (c / "manifest.parquet").unlink()
    assert _json("index", c)["shards"] == 3
    t = pq.read_table(c / "manifest.parquet").to_pylist()
    assert [row["shard"] for row in t] == [0, 1, 2] and sum(row["samples"] for row in t) == 9
    assert t == pq.read_table(cache / "manifest.parquet").to_pylist()
    code, text = _run("stats", tmp_path / "nope")
    assert code == 1 and "cache not found" in text
