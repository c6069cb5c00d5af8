"""Every chunk read is checked: a changed byte, a deleted or empty array file, an edited
dtype or count is a CacheError naming the shard and the array -- never zeros, never a
traceback (issue 14, points 3 and 4). Old caches without chunk checksums still read."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
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
def built(tmp_path_factory):
    """(cache, every sample's rows as read before any damage): 3 shards, 16-row chunks."""
    tmp = tmp_path_factory.mktemp("integrity")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(10, seed=3))
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                           "extract": {"cache": str(tmp / "cache"), "samples_per_shard": 4, "topk": 4,
                                       "layers": [1, 3, 5], "chunk_rows": 16}})
    cache = Path(run_extract(cfg, progress=False))
    r = CacheReader(cache)
    return cache, [r.sample(i) for i in range(len(r))]


@pytest.fixture()
def cache(built, tmp_path):
    c = tmp_path / "cache"
    shutil.copytree(built[0], c)
    return c


def read_all(cache: Path) -> list[dict]:
    r = CacheReader(cache)
    return [r.sample(i) for i in range(len(r))]


def hidden_file(cache: Path, k: int = 1) -> Path:
    return shards_dir(cache) / shard_name(k) / "hidden" / "c" / "0" / "0" / "0"


def flip_byte_in_chunk(f: Path, chunk: int) -> None:
    """Flip one byte in the middle of inner chunk `chunk` (located through the shard index)."""
    raw = bytearray(f.read_bytes())
    n = None
    for n_try in range(1, 10000):  # the index is n*16 bytes + crc at the end; find n from the offsets
        idx = np.frombuffer(bytes(raw[-(n_try * 16 + 4):-4]), dtype="<u8").reshape(n_try, 2)
        # chunks lie in the file in the order they were completed, not necessarily by index
        if idx[:, 0].min() == 0 and int((idx[:, 0] + idx[:, 1]).max()) == len(raw) - n_try * 16 - 4 \
                and int(idx[:, 1].sum()) == len(raw) - n_try * 16 - 4:
            n = n_try
            break
    assert n is not None and chunk < n
    off, nb = (int(v) for v in np.frombuffer(bytes(raw[-(n * 16 + 4):-4]), dtype="<u8").reshape(n, 2)[chunk])
    raw[off + nb // 2] ^= 0x10
    f.write_bytes(bytes(raw))


def test_flipped_byte_in_a_hidden_chunk_names_shard_array_and_chunk(cache):
    flip_byte_in_chunk(hidden_file(cache), 1)
    with pytest.raises(CacheError) as e:
        read_all(cache)
    msg = str(e.value)
    assert "00001.zarr" in msg and "'hidden'" in msg and "chunk 1" in msg and "crc32c" in msg


def test_flipped_byte_stops_training_batches(cache, built):
    from stage2_train.data import make_train_loader
    from stage2_train.sampler import chunk_aware_order

    flip_byte_in_chunk(hidden_file(cache, 0), 0)
    r = CacheReader(cache)
    shard_of = np.array([ref.shard for ref in r.refs])
    order = chunk_aware_order(shard_of, r.lengths(), np.arange(len(r)), micro_batch_size=2, max_tokens=4096,
                              seed=0, epoch=0)
    t2d = np.arange(r.vocab_size)
    with pytest.raises(CacheError, match=r"00000\.zarr: array 'hidden': chunk 0 .*crc32c"):
        list(make_train_loader(r, order.arrivals, order.batches, t2d, None))


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate"])
def test_deleted_or_empty_array_file_is_not_read_as_zeros(cache, damage):
    f = hidden_file(cache)
    if damage == "delete":
        f.unlink()
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CacheError) as e:
        read_all(cache)
    msg = str(e.value)
    assert "00001.zarr" in msg and "'hidden'" in msg
    assert {"delete": "missing", "empty": "empty", "truncate": "shorter than its"}[damage] in msg


def test_edited_dtype_and_counts_are_refused_at_open(cache):
    zj = shards_dir(cache) / shard_name(2) / "hidden" / "zarr.json"
    meta = json.loads(zj.read_text())
    meta["data_type"] = "int16"
    zj.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"00002\.zarr: array 'hidden' has dtype int16, the cache stores uint16"):
        CacheReader(cache)
    meta["data_type"] = "uint16"
    zj.write_text(json.dumps(meta))
    sj = shards_dir(cache) / shard_name(2) / "shard.json"
    info = json.loads(sj.read_text())
    info["samples"] += 1
    sj.write_text(json.dumps(info))
    # The open-time check (schemas.cache_check) sees the count first; the reader's own check says it otherwise.
    with pytest.raises(CacheError, match=r"00002\.zarr: (array 'offsets' has \d+ rows but shard\.json says"
                                         r"|shard\.json: 3 samples, cache\.json .* implies 2)"):
        CacheReader(cache)


def test_shards_inspect_on_a_corrupt_chunk_is_a_clear_error(cache):
    flip_byte_in_chunk(hidden_file(cache, 0), 0)
    r = CacheReader(cache)
    res = runner.invoke(app, ["shards", "inspect", str(cache), str(r.refs[0].sample_index)])
    text = res.stdout + (res.stderr if res.stderr_bytes is not None else "")
    assert res.exit_code == 1, text
    assert "error:" in text and "00000.zarr" in text and "'hidden'" in text and "Traceback" not in text


def _old_cache_module():
    """schemas/cache.py as it was at edbc6e1 (zarr's writer, no chunk checksums), as a module."""
    src = subprocess.run(["git", "show", "edbc6e1:schemas/cache.py"], cwd=ROOT, capture_output=True, text=True)
    if src.returncode != 0:
        pytest.skip("git history with edbc6e1 is not available")
    path = Path(__file__).parent / "_old_cache_edbc6e1.py"
    spec = importlib.util.spec_from_loader("old_cache_edbc6e1", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src.stdout, str(path), "exec"), mod.__dict__)  # noqa: S102 - our own history
    return mod


def rewrite_with_old_code(cache: Path, k: int) -> None:
    old = _old_cache_module()
    p = shards_dir(cache) / shard_name(k)
    sh = CacheReader(cache).shards[k]
    arrays = {n: sh.read(n, 0, sh.array(n).shape[0]) for n in old.ARRAYS}
    info = json.loads((p / "shard.json").read_text())
    shutil.rmtree(p)
    old.write_shard(cache, k, arrays, compressor="zstd", chunk_rows=info["chunk_rows"],
                    extra={key: info[key] for key in ("sample_range", "hidden_size", "topk", "layers") if key in info})


def test_old_and_new_shards_in_one_cache_read_the_same(cache, built, capsys):
    rewrite_with_old_code(cache, 1)
    cj = json.loads((shards_dir(cache) / shard_name(1) / "hidden" / "zarr.json").read_text())
    assert [c["name"] for c in cj["codecs"][0]["configuration"]["codecs"]] == ["bytes", "zstd"]  # really old
    got = read_all(cache)
    for a, b in zip(got, built[1]):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    err = capsys.readouterr().err
    assert err.count("without per-chunk checksums") == 1


def test_old_shard_with_a_deleted_file_is_still_refused(cache):
    rewrite_with_old_code(cache, 1)
    hidden_file(cache).unlink()
    with pytest.raises(CacheError, match=r"00001\.zarr: array 'hidden': data file .* is missing"):
        read_all(cache)


def test_zarr_reads_the_new_layout_bit_for_bit(built):
    import zarr

    cache = built[0]
    r = CacheReader(cache)
    for k, sh in r.shards.items():
        for name in sh.layout:
            a = zarr.open_array(str(shards_dir(cache) / shard_name(k) / name), mode="r")[...]
            np.testing.assert_array_equal(a, sh.read(name, 0, sh.array(name).shape[0]))


def test_training_cli_reports_a_corrupt_chunk_without_traceback(cache, tmp_path):
    flip_byte_in_chunk(hidden_file(cache, 2), 0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"name": "t", "target": {"path": "/no/target"},
                               "train": {"cache": str(cache), "output": str(tmp_path / "head"), "max_steps": 3,
                                         "draft_vocab_size": 32, "ttt_length": 2, "val_fraction": 0.0,
                                         "save_every": 100, "eval_every": 100,
                                         "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json")}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert p.returncode == 1, text[-3000:]
    assert "00002.zarr" in text and "'hidden'" in text and "crc32c" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_parallel_compression_writes_the_same_bytes(tmp_path, compressor):
    import zarr

    from schemas.cache_write import write_array

    a = (np.random.default_rng(0).standard_normal((1000, 3, 16)) * 100).astype(np.int16).view(np.uint16)
    a[200:400] = 0  # an all-zero chunk is written too (never an index entry that reads as fill_value)
    files = []
    for threads in (1, 3):
        p = tmp_path / f"t{threads}"
        write_array(p, a, chunk_rows=64, compressor=compressor, attributes={}, threads=threads)
        files.append((p / "c" / "0" / "0" / "0").read_bytes())
        np.testing.assert_array_equal(zarr.open_array(str(p), mode="r")[...], a)
    assert files[0] == files[1]
    idx = np.frombuffer(files[0][-(16 * 16 + 4):-4], dtype="<u8").reshape(16, 2)
    assert (idx != (1 << 64) - 1).all()
