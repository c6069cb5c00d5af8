"""Issue 14, points 5, 6 and 12: bad input data and config fail clearly; long conversations tokenize in linear time."""
from __future__ import annotations

import json

import pytest

from stage1_extract.conversations import DataError, load_conversations


def _rec(i: int) -> str:
    return json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]})


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_file_is_reported_by_line_not_byte_offset(tmp_path, bom):
    # issue 14 point 12: line 3 holds a Latin-1 byte
    lines = [_rec(0).encode(), _rec(1).encode(), _rec(2).encode().replace(b"q2", b"q\xe92"), _rec(3).encode()]
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(bom + b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as ei:
        load_conversations([str(p)])
    col = lines[2].index(b"\xe9") + 1
    assert str(ei.value) == (f"{p}:3: not UTF-8 text (byte 0xe9 at column {col}; re-encode the file as UTF-8)")


# --------------------------------------------------------------------------- point 5: config validation


@pytest.mark.parametrize("override,key", [("extract.topk=true", "extract.topk"), ("train.lr=true", "train.lr"),
                                          ("extract.layers=[true,2,3]", "extract.layers"),
                                          ("train.max_steps=false", "train.max_steps"),
                                          ("jobs.slurm.gpus_per_task=true", "jobs.slurm.gpus_per_task")])
def test_a_boolean_is_never_read_as_a_number(override, key):
    from schemas.config import ConfigError, load_config

    with pytest.raises(ConfigError) as ei:
        load_config(raw={"target": {"path": "t"}}, overrides=[override])
    assert f"'{key}': must be a number, not a boolean (true/false)" in str(ei.value)
    # booleans stay booleans where a boolean is expected, numbers stay numbers
    cfg = load_config(raw={"target": {"path": "t", "trust_remote_code": True}}, overrides=["extract.topk=5"])
    assert cfg.target.trust_remote_code is True and cfg.extract.topk == 5


def test_topk_above_vocab_fails_before_cache_json_and_the_corrected_run_works(tmp_path, tiny_llama_dir, one_thread):
    from schemas.cache import CACHE_JSON, CacheReader
    from schemas.config import ConfigError, load_config
    from stage1_extract.extract import run_extract
    from tiny import sharegpt_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(3, seed=1))
    cache = tmp_path / "cache"
    V = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]

    def cfg(k):
        return load_config(raw={"target": {"path": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
                                "data": {"train": [str(data)], "max_length": 64},
                                "extract": {"cache": str(cache), "topk": k, "samples_per_shard": 4}})

    with pytest.raises(ConfigError) as ei:
        run_extract(cfg(V + 1), progress=False)
    assert str(ei.value).startswith(f"extract.topk = {V + 1} is larger than the target's vocabulary ({V} tokens)")
    assert not (cache / CACHE_JSON).exists()
    run_extract(cfg(4), progress=False)  # the corrected re-run is not refused
    assert CacheReader(cache).topk == 4
