"""Bad-input corpus, configs (issue 22, cases 3, 7, 8): every value finite, no silent surprises, one line."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.config import ConfigError, load_config

BASE = {"target": {"path": "x"}}
runner = CliRunner()


def _load(overrides=(), raw=None):
    import copy

    return load_config(raw=copy.deepcopy(raw or BASE), overrides=list(overrides))


@pytest.mark.parametrize("override,key", [
    ("train.lr=inf", "train.lr"), ("train.loss_decay=inf", "train.loss_decay"), ("train.grad_clip=inf", "train.grad_clip"),
    ("train.lr=.nan", "train.lr"), ("train.weight_decay=.inf", "train.weight_decay"),
    ("eval.temperature=1e400", "eval.temperature"), ("vllm.kv_cache_gib=.inf", "vllm.kv_cache_gib"),
    ("train.model_overrides={rope_theta: .inf}", "train.model_overrides"),
    ("sweep.grid={train.lr: [1e-4, .nan]}", "sweep.grid"),
])
def test_every_float_must_be_finite(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}': .*finite number"):
        _load([override])


def test_duplicated_yaml_key_is_refused_naming_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("target: {path: x}\ntrain: {lr: 0.1}\ndata: {max_length: 10}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"config {p}: key 'train' is given twice (lines 2 and 4); YAML would keep only the second"
    p.write_text("target:\n  path: x\n  path: y\n")
    with pytest.raises(ConfigError, match="key 'path' is given twice \\(lines 2 and 3\\)"):
        load_config(p)


def test_override_is_never_cut_at_a_comment():
    with pytest.raises(ConfigError, match="line break"):
        _load(["train.output=runs/a\n#b"])
    with pytest.raises(ConfigError, match=r"YAML reads '#b' as a comment and would drop it; quote the value"):
        _load(["train.output=runs/a #b"])
    assert _load(["train.output='runs/a #b'"]).train.output == "runs/a #b"   # quoted: kept whole
    assert _load(["train.output=runs/a#b"]).train.output == "runs/a#b"       # no space: not a comment


def test_layers_must_be_low_mid_high():
    for bad in ("[3,2,1]", "[1,1,2]", "[2,5,4]"):
        with pytest.raises(ConfigError, match=r"'extract.layers': must be 3 distinct layer ids in increasing order"):
            _load([f"extract.layers={bad}"])
    assert _load(["extract.layers=[1,2,3]"]).extract.layers == [1, 2, 3]


def test_a_data_file_listed_twice_is_refused(tmp_path):
    a = tmp_path / "a.jsonl"
    with pytest.raises(ConfigError, match=r"'data.train': .*a.jsonl' is listed twice \(entries 0 and 2\)"):
        _load([f"data.train=[{a}, {tmp_path / 'b.jsonl'}, {tmp_path}/./a.jsonl]"])
    with pytest.raises(ConfigError, match="'data.eval': .* is listed twice"):
        _load([f"data.eval=[{a}, {a}]"])


@pytest.mark.parametrize("key", ["extract.cache", "train.output", "eval.output", "sweep.output",
                                 "data.regenerate.output", "target.path"])
def test_an_empty_path_is_refused(key):
    with pytest.raises(ConfigError, match=rf"'{key}': must not be empty \(an empty path means the working directory\)"):
        _load([f"{key}="])


def test_binary_config_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(bytes(range(128, 256)) * 3)
    res = runner.invoke(app, ["config", "show", str(p)])
    text = res.output
    assert res.exit_code == 1 and "Traceback" not in text, text
    assert f"config {p} is not UTF-8 text (byte 0x80 at offset 0)" in " ".join(text.split())


def test_regenerate_output_equal_to_an_input_file_is_refused(tmp_path):
    from stage1_extract.regenerate import RegenerateError, pending
    from tiny import sharegpt_rows, write_jsonl

    data = write_jsonl(tmp_path / "prompts.jsonl", sharegpt_rows(3))
    before = data.read_bytes()
    cfg = _load([f"data.train=[{data}]", f"data.regenerate.output={tmp_path}/./prompts.jsonl",
                 "data.regenerate.enabled=true"])
    with pytest.raises(RegenerateError, match=r"is the input file .*prompts.jsonl of data.train/data.eval"):
        pending(cfg)
    # someone else's file is never appended to or truncated (a resumed run drops a partial last line)
    other = tmp_path / "notes.jsonl"
    other.write_text('{"id": "x"}\nhalf a line')
    cfg = _load([f"data.train=[{data}]", f"data.regenerate.output={other}"])
    with pytest.raises(RegenerateError, match=r"exists and was not written by eagle3 regenerate"):
        pending(cfg)
    assert other.read_text() == '{"id": "x"}\nhalf a line' and data.read_bytes() == before
