"""Issue 14 point 2: a cache opens only when consistent; `shards verify` exits 1 on every inconsistency."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import CacheError, CacheReader
from schemas.config import load_config
from stage1_extract.extract import run_extract
from tiny import sharegpt_rows, tiny_target, write_jsonl


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("consistency")
    tdir = tiny_target(tmp / "t", "llama")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(10, seed=2))
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)]},
                           "extract": {"cache": str(tmp / "cache"), "samples_per_shard": 4, "topk": 4,
                                       "layers": [1, 3, 5]}})
    return run_extract(cfg, progress=False)  # shards 0 (4 samples), 1 (4), 2 (2)


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _missing_shard(c):
    shutil.rmtree(c / "shards" / "00001.zarr")


def _no_shard_json(c):
    (c / "shards" / "00001.zarr" / "shard.json").unlink()


def _half_written_shard_json(c):
    p = c / "shards" / "00001.zarr" / "shard.json"
    p.write_text(p.read_text()[:40])


def _extra_shard(c):
    shutil.copytree(c / "shards" / "00002.zarr", c / "shards" / "00003.zarr")


def _renamed_shard(c):
    (c / "shards" / "00002.zarr").rename(c / "shards" / "00004.zarr")


def _copied_over(c):  # shard 0 copied over shard 1: 28 samples instead of 24 in the words
    shutil.rmtree(c / "shards" / "00001.zarr")
    shutil.copytree(c / "shards" / "00000.zarr", c / "shards" / "00001.zarr")


def _copied_and_relabelled(c):  # ... and its shard.json edited to look right: duplicate samples remain
    _copied_over(c)
    _edit_json(c / "shards" / "00001.zarr" / "shard.json", lambda d: d.update(shard=1))


def _no_embedding(c):
    (c / "target" / "embed_tokens.safetensors").unlink()


def _changed_target_config(c):
    _edit_json(c / "target" / "config.json", lambda d: d.update(rms_norm_eps=0.5))


def _edited_layers(c):
    _edit_json(c / "cache.json", lambda d: d.update(layers=[1, 2, 5]))


def _edited_num_samples(c):
    _edit_json(c / "cache.json", lambda d: d["data"].update(num_samples=11))


def _edited_shard_starts(c):
    _edit_json(c / "cache.json", lambda d: d.update(shard_starts=[0, 4, 7, 10]))


def _old_layout_edited_num_samples(c):  # a cache made before shard_starts: k * samples_per_shard
    _edit_json(c / "cache.json", lambda d: (d.pop("shard_starts"), d["data"].update(num_samples=11)))


def _edited_hidden_dtype(c):
    _edit_json(c / "cache.json", lambda d: d.update(hidden_dtype="float8_e4m3fn"))


def _missing_arrays(c):  # what two writers with one worker id left in the issue: arrays gone, shard.json there
    for a in ("input_ids", "loss_mask", "hidden"):
        shutil.rmtree(c / "shards" / "00001.zarr" / a)


CASES = {
    "missing shard": (_missing_shard, "shard 00001.zarr: missing (cache.json num_shards = 3)"),
    "missing shard.json": (_no_shard_json, "shard 00001.zarr: shard.json missing"),
    "half-written shard.json": (_half_written_shard_json, "shard 00001.zarr: shard.json unreadable, half-written?"),
    "extra shard": (_extra_shard, "shard 00003.zarr: beyond num_shards = 3 (an extra shard)"),
    "renamed shard": (_renamed_shard, "shard 00002.zarr: missing (cache.json num_shards = 3); "
                                      "shard 00004.zarr: beyond num_shards = 3"),
    "copied shard": (_copied_over, "shard 00001.zarr: shard.json says shard 0: the directory was renamed or copied"),
    "duplicate samples": (_copied_and_relabelled, "sample_index: 4 samples appear more than once "
                                                  "(0 in 00000.zarr, 00001.zarr; 1 in 00000.zarr, 00001.zarr;"),
    "deleted embedding": (_no_embedding, "target/embed_tokens.safetensors: missing"),
    "changed target file": (_changed_target_config, "target/config.json: sha256 differs from the one recorded"),
    "edited layers": (_edited_layers, "shard 00000.zarr: shard.json: layers is [1, 3, 5], cache.json says [1, 2, 5]"),
    "edited sample count": (_edited_num_samples, "cache.json: shard_starts ends at sample 10, "
                                                 "data.num_samples is 11"),
    "edited shard layout": (_edited_shard_starts, "shard 00001.zarr: shard.json: 4 samples, cache.json "
                                                  "(shard_starts, or samples_per_shard and data.num_samples) "
                                                  "implies 3"),
    "old cache, edited sample count": (_old_layout_edited_num_samples, "shard 00002.zarr: shard.json: 2 samples, "
                                       "cache.json (shard_starts, or samples_per_shard and data.num_samples) "
                                       "implies 3"),
    "edited hidden dtype": (_edited_hidden_dtype, "shard 00000.zarr: array hidden: logical dtype bfloat16, "
                                                  "cache.json hidden_dtype says float8_e4m3fn"),
    "arrays missing": (_missing_arrays, "shard 00001.zarr: array input_ids: missing or unreadable metadata"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_inconsistent_cache_is_refused_and_verify_exits_1(cache, tmp_path, case):
    damage, message = CASES[case]
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    CacheReader(c)  # sound before
    damage(c)
    with pytest.raises(CacheError) as ei:
        CacheReader(c)
    assert str(ei.value).startswith(f"cache {c} is inconsistent")
    assert message in str(ei.value)
    res = CliRunner().invoke(app, ["shards", "verify", str(c)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and message.split("; ")[0] in res.output


def test_an_old_cache_without_target_checksums_opens_with_one_note(cache, tmp_path, capsys):
    c = tmp_path / "old"
    shutil.copytree(cache, c)
    assert "target_files" in json.loads((c / "cache.json").read_text())
    _edit_json(c / "cache.json", lambda d: d.pop("target_files"))
    CacheReader(c)
    CacheReader(c)
    err = capsys.readouterr().err
    assert err.count("cache.json records no checksums of target/ files") == 1
    assert len(CacheReader(c)) == 10
