"""Bad-input corpus, directories (issue 22, cases 1, 2, 7): one rule decides what a directory is
before any command writes or deletes in it; a model, a head or foreign files are never touched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.dirkind import MARKER, UnsafeDirError, classify, ensure_writable, mark, remove_owned
from tiny import sharegpt_rows, write_jsonl

runner = CliRunner()


def one_line_error(res, *needles):
    text = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert text.startswith("error: ") and text.count("error: ") == 1, res.output
    for n in needles:
        assert n in text, (n, text)
    return text


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    """A copy of the tiny target with a foreign file beside its weights."""
    d = tmp_path_factory.mktemp("m") / "target"
    shutil.copytree(tiny_llama_dir, d)
    (d / "NOTES.txt").write_text("mine")
    return d


@pytest.fixture(scope="module")
def head_dir(tiny_llama_fp32, tmp_path_factory):
    from spec_helpers import make_head
    from stage2_train.export import write_head

    head = make_head(tiny_llama_fp32, seed=1)
    head.config["target_num_hidden_layers"] = int(tiny_llama_fp32.config.num_hidden_layers)
    return write_head(head, tmp_path_factory.mktemp("h") / "head")


def write_cfg(tmp: Path, **sections) -> Path:
    import yaml

    raw = {"target": {"path": str(sections.pop("target", "x")), "dtype": "float32", "device": "cpu"}}
    for k, v in sections.items():
        raw.setdefault(k.split("__")[0], {})[k.split("__")[1]] = v
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


# --------------------------------------------------------------------------- the rule


def test_classify_names_every_kind(tmp_path, model_dir, head_dir):
    assert classify(tmp_path / "nope").kind == "missing"
    (tmp_path / "f").write_text("x")
    assert classify(tmp_path / "f").kind == "file"
    (tmp_path / "e").mkdir()
    assert classify(tmp_path / "e").kind == "empty"
    assert classify(model_dir).kind == "model"
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"x")
    assert classify(stray) == classify(stray) and classify(stray).kind == "model"
    assert classify(head_dir).kind == "head"
    holder = tmp_path / "holder"  # the case 1: D holds D/target (a model), nothing else
    shutil.copytree(model_dir, holder / "target")
    assert classify(holder).kind == "unknown"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.json").write_text(json.dumps({"schema": "eagle3-cache/1"}))
    assert classify(tmp_path / "c").kind == "cache"
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "README.md").write_text("x")
    assert classify(tmp_path / "u").kind == "unknown"
    mark(tmp_path / "u", "export", "test")
    assert classify(tmp_path / "u").kind == "export"
    with pytest.raises(UnsafeDirError, match=r"train.output .*/target is a model directory \(config.json with "
                                             r"architectures \['LlamaForCausalLM'\]\); refusing to write there"):
        ensure_writable(model_dir, ("missing", "empty", "head"), "train.output")


def test_remove_owned_deletes_only_what_was_recorded(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "a").write_text("1")
    (d / "b").write_text("2")
    with pytest.raises(UnsafeDirError, match="holds files eagle3 did not write \\(b\\)"):
        remove_owned(d, {"a"}, "target/")
    assert tree(d) == {"a": b"1", "b": b"2"}
    remove_owned(d, {"a", "b"}, "target/")
    assert not d.exists()


# --------------------------------------------------------------------------- extract


def test_extract_never_deletes_a_model_next_to_the_cache(model_dir, tmp_path):
    """Case 1: `eagle3 extract CFG target.path=D/target extract.cache=D` replaced D/target with the cache's."""
    D = tmp_path / "D"
    shutil.copytree(model_dir, D / "target")
    before = tree(D)
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(4))
    cfg = write_cfg(tmp_path, target=D / "target", data__train=[str(data)], extract__cache=str(D),
                    extract__layers=[1, 3, 5])
    res = runner.invoke(app, ["extract", str(cfg), "--no-progress"])
    one_line_error(res, f"extract.cache {D} is a directory eagle3 did not create", "refusing to write there")
    assert tree(D) == before
    # the model's own directory, and a plain file
    res = runner.invoke(app, ["extract", str(cfg), f"extract.cache={D / 'target'}", "--no-progress"])
    one_line_error(res, "is a model directory")
    assert tree(D) == before
    res = runner.invoke(app, ["extract", str(cfg), f"extract.cache={D / 'target' / 'NOTES.txt'}", "--no-progress"])
    one_line_error(res, "NOTES.txt is a file (a file, not a directory)")
    res = runner.invoke(app, ["extract", str(cfg), "extract.cache=", "--no-progress"])
    one_line_error(res, "'extract.cache': must not be empty")
    assert tree(D) == before


def test_write_target_dir_replaces_only_files_the_cache_recorded(tmp_path, tiny_llama_fp32, tiny_llama_dir):
    from transformers import AutoTokenizer

    from stage1_extract.extract import _write_target_dir

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    root = tmp_path / "c"
    (root / "target").mkdir(parents=True)
    (root / "target" / "model.safetensors").write_bytes(b"weights")  # someone's model, no embedding
    with pytest.raises(UnsafeDirError, match="holds files eagle3 did not write \\(model.safetensors\\)"):
        _write_target_dir(root, tiny_llama_fp32, tok, tiny_llama_dir, 1.0)  # a new cache: nothing recorded yet
    assert (root / "target" / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(UnsafeDirError, match="holds files eagle3 did not write \\(model.safetensors\\)"):
        _write_target_dir(root, tiny_llama_fp32, tok, tiny_llama_dir, 1.0, recorded={"config.json": "x"})
    assert (root / "target" / "model.safetensors").read_bytes() == b"weights"
    # our own target/ whose embedding was deleted: rewritten
    (root / "target" / "model.safetensors").unlink()
    (root / "target" / "config.json").write_text("{}")
    _write_target_dir(root, tiny_llama_fp32, tok, tiny_llama_dir, 1.0, recorded={"config.json": "x"})
    assert (root / "target" / "embed_tokens.safetensors").is_file()


def test_gguf_conversion_removes_only_its_own_unfinished_directory(tmp_path, tiny_llama_dir, monkeypatch):
    """schemas.target's conversion directory was cleared with rmtree: now only files its marker lists go."""
    import transformers as tf

    from schemas.config import TargetConfig
    from schemas.target import conversion_dir, converted_dir

    real_model, real_tok = tf.AutoModelForCausalLM.from_pretrained, tf.AutoTokenizer.from_pretrained
    loads = []  # the GGUF reader replaced by the tiny target: the write path below is the real one
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (loads.append(k.get("gguf_file")), real_model(str(tiny_llama_dir)))[1])
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(str(tiny_llama_dir)))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = TargetConfig(path=str(gguf), convert_dir=str(tmp_path / "conv"))
    out = conversion_dir(cfg, gguf)
    # a directory there that eagle3 did not write: refused before any conversion, untouched
    out.mkdir(parents=True)
    (out / "NOTES.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UnsafeDirError, match=r"the GGUF conversion directory .* holds files eagle3 did not write "
                                             r"\(NOTES.txt, model.safetensors\); refusing to remove it"):
        converted_dir(cfg)
    assert tree(out) == {"NOTES.txt": b"mine", "model.safetensors": b"weights"} and loads == []
    shutil.rmtree(out)
    # a conversion of ours: marked, every file listed
    assert converted_dir(cfg) == out and loads == ["m.gguf"]
    assert classify(out).kind == "conversion" and (out / ".complete").is_file()
    assert converted_dir(cfg) == out and loads == ["m.gguf"]  # complete: reused
    assert not list(out.parent.glob("*.tmp*"))
    # unfinished (no .complete): ours, so converted again
    (out / ".complete").unlink()
    assert converted_dir(cfg) == out and loads == ["m.gguf"] * 2 and (out / ".complete").is_file()
    # unfinished with a file of someone else's inside: refused, nothing removed
    (out / ".complete").unlink()
    (out / "NOTES.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(UnsafeDirError, match=r"holds files eagle3 did not write \(NOTES.txt\)"):
        converted_dir(cfg)
    assert tree(out) == before and loads == ["m.gguf"] * 2


def test_gguf_conversion_config_does_not_depend_on_the_files_path(tmp_path, tiny_llama_dir, monkeypatch):
    """config.json named the GGUF's path, and a cache records config.json's sha256: the same GGUF in
    another checkout's venv was refused as 'a different target'. The path now goes in the marker."""
    import transformers as tf

    from schemas.config import TargetConfig
    from schemas.dirkind import read_marker
    from schemas.target import converted_dir

    real_model, real_tok = tf.AutoModelForCausalLM.from_pretrained, tf.AutoTokenizer.from_pretrained
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model(str(tiny_llama_dir)))
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(str(tiny_llama_dir)))
    outs = []
    for where in ("a", "b"):
        gguf = tmp_path / where / "m.gguf"
        gguf.parent.mkdir()
        gguf.write_bytes(b"GGUF")
        outs.append(converted_dir(TargetConfig(path=str(gguf), convert_dir=str(tmp_path / "conv"))))
    assert outs[0] != outs[1]
    assert (outs[0] / "config.json").read_bytes() == (outs[1] / "config.json").read_bytes()
    assert read_marker(outs[1])["source"] == str(tmp_path / "b" / "m.gguf")


# --------------------------------------------------------------------------- train.output


def test_train_output_never_overwrites_a_model(model_dir, tmp_path):
    """Case 2: `eagle3 train CFG train.output=<a model directory>` exited 0 replacing its weights."""
    before = tree(model_dir)
    cfg = write_cfg(tmp_path, train__cache=str(tmp_path / "no-cache"))
    res = runner.invoke(app, ["train", str(cfg), f"train.output={model_dir}", "--no-progress"])
    one_line_error(res, f"train.output {model_dir} is a model directory", "Set train.output to a new or empty")
    assert tree(model_dir) == before
    res = runner.invoke(app, ["train", str(cfg), f"train.output={model_dir / 'NOTES.txt'}", "--no-progress"])
    one_line_error(res, "NOTES.txt is a file")
    assert tree(model_dir) == before


def test_lock_output_checks_before_touching(model_dir, tmp_path):
    from stage2_train.collectives import Ranks
    from stage2_train.run_state import RunStateError, lock_output

    one = Ranks(0, 1, torch.device("cpu"))
    before = tree(model_dir)
    with pytest.raises(RunStateError, match="is a model directory"):
        lock_output(model_dir, one)
    assert tree(model_dir) == before
    out = tmp_path / "head"
    lock = lock_output(out, one)
    assert classify(out).kind == "head" and (out / MARKER).is_file()
    lock.release()
    lock_output(out, one).release()  # an earlier training output is resumed


# --------------------------------------------------------------------------- export


def test_export_force_overwrites_only_an_earlier_export(head_dir, tmp_path):
    """Case 2: `export --force` overwrote a trained head or a stray model.safetensors."""
    other_head = tmp_path / "other-head"
    shutil.copytree(head_dir, other_head)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"somebody's weights")
    for victim, why in ((other_head, "holds a trained head"), (stray, "holds a model")):
        before = tree(victim)
        res = runner.invoke(app, ["export", str(head_dir), str(victim), "--force"])
        one_line_error(res, f"export: {victim} {why}", "refusing to write into it, even with --force")
        assert tree(victim) == before
    out = tmp_path / "serve"
    assert runner.invoke(app, ["export", str(head_dir), str(out)]).exit_code == 0
    assert classify(out).kind == "export" and (out / MARKER).is_file()
    res = runner.invoke(app, ["export", str(head_dir), str(out)])
    one_line_error(res, "is not empty; pass --force to overwrite the export there")
    assert runner.invoke(app, ["export", str(head_dir), str(out), "--force"]).exit_code == 0
    # an export made before markers existed (its config's `export` block) is still ours
    (out / MARKER).unlink()
    assert classify(out).kind == "export"
    assert runner.invoke(app, ["export", str(head_dir), str(out), "--force"]).exit_code == 0


# --------------------------------------------------------------------------- eval.output


def test_eval_output_is_new_empty_or_an_earlier_eval_output(model_dir, head_dir, tmp_path):
    """Stage 3 wrote report.* into whatever eval.output named (a model's directory, a cache, anyone's files)."""
    from schemas.config import load_config

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    cfg = write_cfg(tmp_path, target="/not/loaded", eval__head=[str(head_dir)], eval__prompts=[str(prompts)])
    cache = tmp_path / "cache"
    (cache / "shards").mkdir(parents=True)
    (cache / "cache.json").write_text(json.dumps({"schema": "eagle3-cache/1"}))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    for victim, what in ((model_dir, "a model directory"), (cache, "an eagle3 cache"),
                         (foreign, "a directory eagle3 did not create"), (head_dir, "a trained head")):
        before = tree(victim)
        res = runner.invoke(app, ["eval", str(cfg), f"eval.output={victim}"])
        one_line_error(res, f"eval.output {victim} is {what}", "refusing to write there",
                       "Set eval.output to a new or empty directory (or an earlier eval output)")
        assert tree(victim) == before
    res = runner.invoke(app, ["eval", str(cfg), f"eval.output={prompts}"])
    one_line_error(res, "p.jsonl is a file")

    from stage3_eval.evaluate import check_eval_output, open_eval_output

    def claim(out):  # what run_eval does: checked before the target loads, created and marked when written
        p = check_eval_output(load_config(raw={"target": {"path": "x"}, "eval": {"head": [str(head_dir)],
                                                                                 "output": out}}))
        assert p.exists() == (p.name != "new")
        return open_eval_output(p)

    assert claim(str(tmp_path / "new")) == tmp_path / "new" and classify(tmp_path / "new").kind == "eval"
    (tmp_path / "empty").mkdir()
    claim(str(tmp_path / "empty"))
    earlier = tmp_path / "earlier"  # written before markers existed: its report files say what it is
    earlier.mkdir()
    for f in ("report.json", "report.md", "report.png", "vllm_raw.json"):
        (earlier / f).write_text("{}")
    assert classify(earlier).kind == "eval"
    claim(str(earlier))
    assert (earlier / MARKER).is_file()
    # the default, <head>/eval, inside a trained head: the head stays a head
    head = tmp_path / "h"
    shutil.copytree(head_dir, head)
    out = check_eval_output(load_config(raw={"target": {"path": "x"}, "eval": {"head": [str(head)]}}))
    assert open_eval_output(out) == head / "eval"
    assert classify(head).kind == "head" and classify(head / "eval").kind == "eval"


# --------------------------------------------------------------------------- sweep, shards index


def test_sweep_output_and_shards_index_ask_the_rule(model_dir, tmp_path):
    from pipeline.sweep import claim_sweep_dir
    from schemas.config import load_config

    before = tree(model_dir)
    cfg = load_config(raw={"target": {"path": "x"}, "sweep": {"output": str(model_dir), "grid": {"train.lr": [1e-4]}}})
    with pytest.raises(UnsafeDirError, match="sweep.output .* is a model directory"):
        claim_sweep_dir(cfg)
    cfg = load_config(raw={"target": {"path": "x"}, "sweep": {"output": str(tmp_path / "sw")}})
    assert claim_sweep_dir(cfg) == tmp_path / "sw" and classify(tmp_path / "sw").kind == "sweep"
    res = runner.invoke(app, ["shards", "index", str(model_dir)])
    one_line_error(res, "shards index: CACHE", "is a model directory")
    assert tree(model_dir) == before
