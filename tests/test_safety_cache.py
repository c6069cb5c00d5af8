"""Bad-input corpus, caches (issue 22, cases 4-7): never trust a cache further than it was checked.

Damaged copies of one tiny cache: links out of the cache, a 25 KB chunk file declaring two
million rows, malformed cache.json / zarr.json, inner chunks that differ between arrays, and
another checkpoint of the same shapes trying to extend the cache. Each is one clear line."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import CacheError, CacheReader, shard_name, shards_dir
from schemas.config import load_config
from stage1_extract.extract import run_extract
from tiny import sharegpt_rows, tiny_target, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("sc")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(8, seed=4))
    cfg = load_config(raw={"target": {"path": str(tiny_llama_dir), "dtype": "float32", "device": "cpu"},
                           "data": {"train": [str(data)]},
                           "extract": {"cache": str(tmp / "cache"), "samples_per_shard": 4, "topk": 4,
                                       "layers": [1, 3, 5], "chunk_rows": 16}})
    return run_extract(cfg, progress=False), cfg


@pytest.fixture()
def c(made, tmp_path):
    d = tmp_path / "cache"
    shutil.copytree(made[0], d)
    return d


def read_all(cache: Path) -> None:
    r = CacheReader(cache)
    for i in range(len(r)):
        r.sample(i)


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
    assert text.startswith("error: ") and "Traceback" not in res.output, res.output
    return text


# --------------------------------------------------------------------------- symlinks (case 4)


def test_a_shard_linked_out_of_the_cache_is_refused(c, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere" / shard_name(1)
    outside.parent.mkdir()
    shutil.move(shards_dir(c) / shard_name(1), outside)
    (shards_dir(c) / shard_name(1)).symlink_to(outside)
    with pytest.raises(CacheError, match=rf"shards/00001.zarr -> {outside}: resolves outside the cache"):
        CacheReader(c)
    res = runner.invoke(app, ["shards", "ls", str(c)])
    assert res.exit_code == 0 and "refused: a symlink out of the cache" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["shards", "verify", str(c)])
    assert res.exit_code == 1 and "INCONSISTENT shards/00001.zarr" in res.output, res.output
    monkeypatch.setenv("EAGLE3_FOLLOW_SYMLINKS", "1")  # the explicit option
    read_all(c)


def test_a_chunk_file_linked_out_of_the_cache_is_refused(c, tmp_path):
    from schemas.cache_read import ChunkedArray, ChunkError

    f = shards_dir(c) / shard_name(0) / "hidden" / "c" / "0" / "0" / "0"
    outside = tmp_path / "secret"
    shutil.move(f, outside)
    f.symlink_to(outside)
    with pytest.raises(CacheError, match=r"00000.zarr/hidden/c/0/0/0 -> .*secret: resolves outside the cache"):
        CacheReader(c)
    with pytest.raises(ChunkError, match=r"array 'hidden': .*resolves to .*secret, outside the cache"):
        ChunkedArray(shards_dir(c) / shard_name(0), "hidden")
    res = runner.invoke(app, ["shards", "verify", str(c)])
    assert res.exit_code == 1 and "resolves outside the cache" in res.output, res.output


def test_shards_ls_on_a_shard_linked_to_root_is_one_line_and_never_walks(c):
    (shards_dir(c) / shard_name(1)).rename(shards_dir(c) / "moved")
    (shards_dir(c) / shard_name(1)).symlink_to("/")
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "ls", str(c)], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "warning: shards/00001.zarr: refused: a symlink out of the cache (/): not read" in " ".join(p.stderr.split())


# --------------------------------------------------------------------------- bounded reads (case 5)


def rle_zstd_zeros(nbytes: int) -> bytes:
    """A zstd frame of `nbytes` zeros made of RLE blocks: 4 bytes per 128 KiB (what a memory bomb looks like)."""
    out = bytearray(struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", nbytes))  # single segment, 8-byte size
    left = nbytes
    while left:
        n = min(left, 1 << 17)
        left -= n
        out += struct.pack("<I", int(left == 0) | (1 << 1) | (n << 3))[:3] + b"\0"
    return bytes(out)


def plant_bomb(c: Path, rows: int = 2_097_152) -> Path:
    import google_crc32c

    arr = shards_dir(c) / shard_name(0) / "hidden"
    meta = json.loads((arr / "zarr.json").read_text())
    rest = meta["shape"][1:]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [rows, *rest]
    meta["codecs"][0]["configuration"]["chunk_shape"] = [rows, *rest]
    (arr / "zarr.json").write_text(json.dumps(meta))
    frame = rle_zstd_zeros(rows * int(np.prod(rest)) * 2)
    chunk = frame + struct.pack("<I", google_crc32c.value(frame))
    index = struct.pack("<QQ", 0, len(chunk))
    f = arr / "c" / "0" / "0" / "0"
    f.write_bytes(chunk + index + struct.pack("<I", google_crc32c.value(index)))
    return f


def test_a_chunk_declaring_two_million_rows_is_refused_before_allocating(c):
    f = plant_bomb(c)
    assert f.stat().st_size < 26_000  # the 24.6 KB file
    tracemalloc.start()
    try:
        with pytest.raises(CacheError) as e:
            read_all(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "array hidden: zarr.json declares chunks of [2097152, 3, 64] (chunk_grid chunk_shape)" in str(e.value)
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    tracemalloc.start()
    try:
        res = runner.invoke(app, ["shards", "verify", str(c)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.exit_code == 1 and "refusing to allocate for it" in res.output, res.output
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_shard_json_counts_beyond_max_length_are_refused(c):
    sj = shards_dir(c) / shard_name(1) / "shard.json"
    info = json.loads(sj.read_text())
    info.update(tokens=10**9)
    sj.write_text(json.dumps(info))
    with pytest.raises(CacheError, match=r"shard 00001.zarr: shard.json: 1000000000 tokens in 4 samples, more than "
                                         r"cache.json's max_length 2048 allows"):
        CacheReader(c)


# --------------------------------------------------------------------------- malformed metadata (case 7)


@pytest.mark.parametrize("edit,msg", [
    (lambda m: [], "cache.json: not a JSON object (a list)"),
    (lambda m: {k: v for k, v in m.items() if k != "target"}, "cache.json: target is None, not an object"),
    (lambda m: {**m, "num_shards": "x"}, "cache.json: num_shards is 'x', not a non-negative integer"),
    (lambda m: {**m, "target": {**m["target"], "hidden_size": 10**12}}, "hidden_size is 1000000000000, not a positive"),
    (lambda m: {**m, "layers": [1, 3]}, "layers is [1, 3], not a list of 3 layer ids"),
])
def test_malformed_cache_json_is_one_line(c, edit, msg):
    cj = c / "cache.json"
    cj.write_text(json.dumps(edit(json.loads(cj.read_text()))))
    with pytest.raises(CacheError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        CacheReader(c)
    for cmd in ("ls", "verify", "stats", "index"):
        assert msg in cli("shards", cmd, c)


def test_an_array_zarr_json_that_is_a_list_is_one_line(c):
    (shards_dir(c) / shard_name(1) / "hidden" / "zarr.json").write_text("[]")
    with pytest.raises(CacheError, match=r"shard 00001.zarr: array hidden: zarr.json is not a JSON object"):
        CacheReader(c)
    res = runner.invoke(app, ["shards", "verify", str(c)])
    assert res.exit_code == 1 and "Traceback" not in res.output and "zarr.json is not a JSON object" in res.output, \
        res.output


def test_inner_chunks_differing_between_arrays_is_a_cache_error(c):
    from schemas.cache_write import write_array
    from stage2_train.loader import CacheLoader

    p = shards_dir(c) / shard_name(1)
    r = CacheReader(c)
    a = r.shards[1].read("hidden", 0, r.shards[1].array("hidden").shape[0])
    shutil.rmtree(p / "hidden")
    write_array(p / "hidden", a, chunk_rows=8, compressor="zstd", attributes={"logical_dtype": "bfloat16"}, threads=1)
    r = CacheReader(c)  # sound: the same bytes, chunked differently
    n = len(r)
    with pytest.raises(CacheError, match=r"00001.zarr: row arrays are not in the layout the chunk loader reads"):
        CacheLoader(r, np.arange(n), [[i] for i in range(n)], np.arange(r.vocab_size), threads=1)


# --------------------------------------------------------------------------- target identity (case 6)


def test_another_checkpoint_of_the_same_shapes_cannot_extend_the_cache(made, c, tmp_path, capsys):
    _, cfg = made
    other = tiny_target(tmp_path / "other", "llama", seed=7)  # same shapes, same file names and sizes
    shutil.rmtree(shards_dir(c) / shard_name(1))  # a resumed run would write shard 1
    run = lambda t: run_extract(cfg.model_copy(update={"target": cfg.target.model_copy(update={"path": str(t)}),  # noqa: E731
                                                       "extract": cfg.extract.model_copy(update={"cache": str(c)})}),
                                progress=False)
    with pytest.raises(CacheError) as e:
        run(other)
    meta = json.loads((c / "cache.json").read_text())
    mine = meta["target"]["weights_sampled_sha256"]
    msg = str(e.value)
    assert f"target weights (content: sha256 of sampled blocks): cache has {mine[:16]}... (target " in msg, msg
    assert f"this run has " in msg and str(other) in msg and "(target /" in msg
    assert not (shards_dir(c) / shard_name(1)).exists()
    # a cache written before the content hash existed still opens and resumes, with a warning
    del meta["target"]["weights_sampled_sha256"]
    (c / "cache.json").write_text(json.dumps(meta))
    run(cfg.target.path)
    assert "records no content hash of the target's weights" in capsys.readouterr().err
    read_all(c)
