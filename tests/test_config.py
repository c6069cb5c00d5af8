"""Config loading/overrides/validation, `eagle3 config show` round trip, and `eagle3 data inspect`."""
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.config import ConfigError, RunConfig, load_config
from tiny import tiny_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def base(**sections):
    return {"target": {"path": "some/model"}, **sections}


def test_overrides_coerce_types():
    cfg = load_config(raw=base(), overrides=[
        "train.lr=3e-4", "train.epochs=3", "extract.layers=[2,8,13]", "data.train=[a.jsonl, b.jsonl]",
        "target.trust_remote_code=true", "eval.method=[chain,tree]", "jobs.slurm.partition=gpu",
        "data.max_samples=10", "name=exp1", "train.model_overrides.rope_theta=10000"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.extract.layers == [2, 8, 13]
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.target.trust_remote_code is True
    assert cfg.eval_methods == ["chain", "tree"]
    assert cfg.jobs.slurm.partition == "gpu" and cfg.data.max_samples == 10 and cfg.name == "exp1"
    assert cfg.train.model_overrides == {"rope_theta": 10000}
    # An override wins over the file's value; untouched keys keep theirs.
    plain = load_config(ROOT / "configs" / "demo.yaml")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.lr=3e-3", "data.max_length=256"])
    assert plain.train.lr != 3e-3 and plain.data.max_length != 256
    assert cfg.train.lr == 3e-3 and cfg.data.max_length == 256 and cfg.train.epochs == plain.train.epochs


@pytest.mark.parametrize("overrides, raw, expected", [
    (["train.lrr=1"], None, "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["trian.lr=1"], None, "unknown key 'trian'; did you mean 'train'?"),
    ([], base(data={"max_lenght": 5}), "unknown key 'data.max_lenght'; did you mean 'data.max_length'?"),
    (["jobs.slurm.partion=x"], None, "unknown key 'jobs.slurm.partion'; did you mean 'jobs.slurm.partition'?"),
    (["data.regenerate.max_new_token=5"], None,
     "unknown key 'data.regenerate.max_new_tokens'".replace("max_new_tokens'", "max_new_token'; did you mean "
                                                            "'data.regenerate.max_new_tokens'?")),
])
def test_unknown_keys_name_path_and_nearest(overrides, raw, expected):
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw or base(), overrides=overrides)
    assert expected in str(e.value)
    assert "valid keys here:" in str(e.value)


def test_bad_values_and_overrides():
    with pytest.raises(ConfigError, match=r"'train.epochs': Input should be a valid integer.*got 'abc'"):
        load_config(raw=base(), overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"'data.truncation': Input should be 'drop_tail' or 'skip'"):
        load_config(raw=base(), overrides=["data.truncation=middle"])
    with pytest.raises(ConfigError, match="override 'train.lr' is not of the form key=value"):
        load_config(raw=base(), overrides=["train.lr"])
    with pytest.raises(ConfigError, match="missing required key 'target'"):
        load_config(raw={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_config_show_round_trip(tmp_path):
    res = runner.invoke(app, ["config", "show", str(ROOT / "configs" / "demo.yaml"), "train.lr=2e-4",
                              "extract.layers=[1,2,3]"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.lr=2e-4", "extract.layers=[1,2,3]"])
    assert RunConfig.model_validate(shown) == cfg
    assert shown["train"]["lr"] == 2e-4 and shown["extract"]["layers"] == [1, 2, 3]
    # Every config shipped in configs/ shows and loads back equal.
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        res = runner.invoke(app, ["config", "show", str(f)])
        assert res.exit_code == 0, (f, res.output)
        assert load_config(raw=yaml.safe_load(res.stdout)) == load_config(f)


def test_config_show_error_is_clean():
    res = runner.invoke(app, ["config", "show", str(ROOT / "configs" / "demo.yaml"), "train.lrr=1"])
    assert res.exit_code == 1
    assert "error:" in res.stderr and "unknown key 'train.lrr'; did you mean 'train.lr'?" in res.stderr
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- eagle3 data inspect


@pytest.fixture(scope="module")
def inspect_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    tdir = d / "tok"
    tiny_tokenizer("chatml").save_pretrained(str(tdir))
    (tdir / "config.json").write_text(json.dumps({"model_type": "llama"}))  # an HF dir for target.path
    rows = [
        {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                      {"from": "gpt", "value": "Paris is the capital of France."}]},
        {"id": "bad", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        {"id": "c", "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Solve 12 * 7"},
                                 {"role": "assistant", "content": "84"},
                                 {"role": "user", "content": "Write a poem"},
                                 {"role": "assistant", "content": "the sea and the sky"}]},
    ]
    data = write_jsonl(d / "data.jsonl", rows)
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": str(tdir)},
                                   "data": {"train": [str(data)], "on_error": "skip"}}))
    return cfg, data, tdir


def test_data_inspect_json_sample(inspect_setup):
    from transformers import AutoTokenizer

    cfg, data, tdir = inspect_setup
    res = runner.invoke(app, ["data", "inspect", str(cfg), "--index", "2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["assistant_spans"] == ["84<|im_end|>", "the sea and the sky<|im_end|>"]
    tok = AutoTokenizer.from_pretrained(str(tdir))
    assert got["text"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSolve 12 * 7<|im_end|>\n"
                           "<|im_start|>assistant\n84<|im_end|>\n<|im_start|>user\nWrite a poem<|im_end|>\n"
                           "<|im_start|>assistant\nthe sea and the sky<|im_end|>\n")
    assert got["input_ids"] == tok(got["text"], add_special_tokens=False)["input_ids"]
    assert len(got["loss_mask"]) == len(got["input_ids"]) and set(got["loss_mask"]) == {0, 1}
    masked = [i for i, m in zip(got["input_ids"], got["loss_mask"]) if m]
    assert tok.decode(masked) == "84<|im_end|>the sea and the sky<|im_end|>"

    res = runner.invoke(app, ["data", "inspect", str(cfg), "--index", "1"])
    assert res.exit_code == 1
    assert "sample 1 was skipped: unknown role" in res.stderr and f"{data}:2: conversations[1].from" in res.stderr
    res = runner.invoke(app, ["data", "inspect", str(cfg), "--index", "9"])
    assert res.exit_code == 1 and "no sample 9: the data has 3 samples (0..2)" in res.stderr
    # Text view: the masked runs are marked (no terminal here, so with brackets).
    res = runner.invoke(app, ["data", "inspect", str(cfg), "-i", "0"])
    assert res.exit_code == 0, res.output
    assert "assistant\n⟦Paris is the capital of France.<|im_end|>⟧\n" in res.stdout


def test_data_inspect_stats(inspect_setup):
    from transformers import AutoTokenizer

    cfg, data, tdir = inspect_setup
    res = runner.invoke(app, ["data", "inspect", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    tok = AutoTokenizer.from_pretrained(str(tdir))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    # Counted by hand, not with stage 1's tokenizer code: the ChatML text rendered here, its
    # ids, and as loss tokens each assistant answer's ids plus its <|im_end|> (the byte-level
    # BPE splits at the newline before an answer and at special tokens, so answers tokenize alone).
    lens, loss = [], 0
    for r in (rows[0], rows[2]):
        msgs = r.get("messages") or [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                                     for t in r["conversations"]]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        lens.append(len(tok(text, add_special_tokens=False)["input_ids"]))
        loss += sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1
                    for m in msgs if m["role"] == "assistant")
    assert got["samples_read"] == 3 and got["kept"] == 2 and got["skipped"] == {"unknown role": 1}
    assert got["tokens"] == sum(lens) and got["loss_tokens"] == loss and got["truncated"] == 0
    assert got["length_percentiles"] == {"p50": min(lens), "p90": max(lens), "p99": max(lens), "max": max(lens)}
    cut = max(lens) - 3
    res = runner.invoke(app, ["data", "inspect", str(cfg), f"data.max_length={cut}"])
    assert res.exit_code == 0, res.output
    assert re.search(rf"truncated \(drop_tail at {cut}\)\s*│\s*1\s*│", res.stdout), res.stdout
    assert re.search(rf"tokens\s*│\s*{sum(lens) - 3}\s*│", res.stdout), res.stdout
    assert re.search(r"unknown role\s*│\s*1\s*│", res.stdout), res.stdout


def test_data_inspect_fails_before_model_load(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"target": {"path": str(tmp_path / "no_model")},
                                   "data": {"train": [str(tmp_path / "missing.jsonl")]}}))
    for extra in ([], ["--index", "0"]):
        res = runner.invoke(app, ["data", "inspect", str(cfg), *extra])
        assert res.exit_code == 1
        assert f"{tmp_path / 'missing.jsonl'}: data file not found" in res.stderr
    write_jsonl(tmp_path / "ok.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]}])
    res = runner.invoke(app, ["data", "inspect", str(cfg), f"data.train=[{tmp_path / 'ok.jsonl'}]"])
    assert res.exit_code == 1 and "does not exist" in res.stderr and "Traceback" not in res.output


def test_data_inspect_prompt_only_demo_hint(monkeypatch):
    """The demo's prompts have no answers yet: the error says so and where the answered data goes
    (brackets in error messages survive the terminal markup)."""
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the repository root
    res = runner.invoke(app, ["data", "inspect", str(ROOT / "configs" / "demo.yaml")])
    assert res.exit_code == 1
    assert "configs/demo_prompts.jsonl:1: conversations: no assistant turn" in res.stderr
    assert "data.train=[runs/demo/regenerated.jsonl]" in res.stderr
