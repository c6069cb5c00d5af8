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


# --------------------------------------------------------------------------- point 6: long conversations


def _long_conversation(pairs: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You answer briefly."}]
    for i in range(pairs):
        msgs.append({"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"})
        msgs.append({"role": "assistant", "content": f"The answer is {2 * i}."})
    return msgs


@pytest.fixture(scope="module")
def chat_toks():
    from tiny import TEMPLATES, tiny_tokenizer

    return {t: tiny_tokenizer(t) for t in TEMPLATES}


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "mistral", "phi3"])
def test_truncated_long_conversation_mask_equals_the_full_computation(chat_toks, template):
    from stage1_extract.tokenize import tokenize_conversation

    tok = chat_toks[template]
    msgs = _long_conversation(60)
    full = tokenize_conversation(tok, msgs, max_length=1_000_000)
    assert not full.truncated and sum(full.loss_mask) > 0
    for L in (1, 17, 128, 301):
        cut = tokenize_conversation(tok, msgs, max_length=L)
        assert cut.truncated and cut.full_length == len(full.input_ids)
        assert cut.input_ids == full.input_ids[:L] and cut.loss_mask == full.loss_mask[:L]


def test_a_truncated_conversation_renders_only_the_turns_before_the_cut(chat_toks, monkeypatch):
    # issue 14 point 6: every assistant turn re-rendered the whole prefix (quadratic); with
    # max_length 128 only the first few turns matter, whatever the length of the conversation
    import stage1_extract.tokenize as T

    calls = []
    real = T._render

    def counting(tok, messages, add_generation_prompt):
        calls.append(len(messages))
        if len(calls) > 100:
            raise AssertionError("rendered more than 100 prefixes for 128 tokens")
        return real(tok, messages, add_generation_prompt)

    monkeypatch.setattr(T, "_render", counting)
    ts = T.tokenize_conversation(chat_toks["chatml"], _long_conversation(5000), max_length=128)
    assert ts.truncated and len(ts.input_ids) == 128
    assert len(calls) < 20 and sorted(calls)[-2] < 30  # the full render once, then short prefixes
