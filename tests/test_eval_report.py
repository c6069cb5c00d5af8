"""Stage 3 end to end on a tiny target: prompts, run_eval, report files, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from spec_helpers import fit_head, greedy_reference, make_head
from stage3_eval.offline import offline_markdown
from stage3_eval.prompts import PromptError, load_prompts, render
from stage3_eval.report import REQUIRED, markdown, summarize
from tiny import write_jsonl


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, _one_thread):
    import transformers as tf

    from schemas.head import save_head

    d = tmp_path_factory.mktemp("eval")
    m = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    prompts = write_jsonl(d / "mt.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["What is the capital of France?", "Write a poem about it."]},
        {"question_id": 82, "category": "math", "turns": ["Solve 12 * 7.", "Now add 5."]}])
    plain = write_jsonl(d / "plain.jsonl", [{"prompt": "Hello! How can I help you?"},
                                            {"question": "The quick brown fox jumps over"}])
    seqs = []
    for t in ["What is the capital of France?", "Solve 12 * 7.", "Hello! How can I help you?"]:
        seqs.append(greedy_reference(m, render(tok, [{"role": "user", "content": t}]), 30))
    heads = []
    for name, head in (("untrained", make_head(m, seed=2)), ("fitted", fit_head(m, seqs, steps=120))):
        heads.append(str(save_head(d / name, head.head_state_dict(), head.config)))
    return d, m, tok, [str(prompts), str(plain)], heads, str(tiny_llama_dir)


def test_prompt_formats(tmp_path, setup):
    d, _, tok, files, _, _ = setup
    sg = write_jsonl(tmp_path / "sg.jsonl", [
        {"id": "a", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}]},
        {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"}]}])
    ps = load_prompts([files[0], str(sg), files[1]])
    assert [p.turns for p in ps] == [["What is the capital of France?", "Write a poem about it."],
                                     ["Solve 12 * 7.", "Now add 5."], ["hi"], ["first"],
                                     ["Hello! How can I help you?"], ["The quick brown fox jumps over"]]
    assert ps[0].id == "81" and ps[2].id == "a" and ps[4].line == 1
    assert len(load_prompts([files[0], str(sg)], max_prompts=3)) == 3
    assert [p.turns for p in load_prompts([files[0]], max_turns=1)] == [["What is the capital of France?"],
                                                                      ["Solve 12 * 7."]]
    ids = render(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts([str(bad)])
    bad.write_text('{"prompt": "ok"}\n\n{"text": "x"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:3: no prompt field .*got keys \['text'\]"):
        load_prompts([str(bad)])
    bad.write_text('{"turns": ["a", 3]}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:1: turns\[1\]: must be a non-empty string, got int"):
        load_prompts([str(bad)])
    with pytest.raises(PromptError, match="prompt file not found"):
        load_prompts([str(tmp_path / "nope.jsonl")])


def test_summarize_hand_computed():
    runs = [{"id": "a", "turn": 1, "new_tokens": 9, "passes": 4, "accept_lengths": [3, 0, 1, 3],
             "drafted_depths": [3, 3, 3, 3], "wall_s": 1.0, "base_new_tokens": 9, "base_wall_s": 3.0,
             "match": True, "first_mismatch": None},
            {"id": "b", "turn": 1, "new_tokens": 3, "passes": 2, "accept_lengths": [1, 0],
             "drafted_depths": [3, 3], "wall_s": 1.0, "base_new_tokens": 4, "base_wall_s": 1.0,
             "match": False, "first_mismatch": 2}]
    s = summarize("chain", runs, 3)
    assert set(REQUIRED) <= set(s)
    assert s["tau"] == 12 / 6 and s["num_prompts"] == 2 and s["target_forward_passes"] == 6
    # depth 1: 6 tries, 4 ok; depth 2: 4 tries (a >= 1), 2 ok; depth 3: 2 tries, 2 ok
    assert s["acceptance_by_depth"] == [4 / 6, 2 / 4, 1.0]
    assert s["accept_length_hist"] == [2, 2, 0, 2]
    assert s["baseline_tokens_per_s"] == 13 / 4 and s["spec_tokens_per_s"] == 12 / 2
    assert s["speedup"] == pytest.approx((12 / 2) / (13 / 4))
    # a cycle: 2 s / 6 passes; a plain step: 4 s / 13 tokens; speed-up = τ / cycle cost
    assert s["cycle_cost"] == pytest.approx((2 / 6) / (4 / 13))
    assert s["speedup"] == pytest.approx(s["tau"] / s["cycle_cost"])
    md = markdown({"heads": [{"head": "h", "name": "h", "methods": [s]}]})
    assert ("* h chain: one cycle (drafting + one target pass over the drafted tokens) costs 1.08× a plain greedy "
            "step, so the speed-up is τ / 1.08 = 2.000 / 1.08 = 1.85×, a gain.") in md
    assert s["lossless"] is False and s["mismatched_prompts"] == [{"id": "b", "turn": 1, "first_mismatch": 2}]


def test_offline_markdown_format():
    off = {"acc": [0.5, 0.25], "acc_std": [0.1, 0.05], "loss": [1.2, 2.0], "loss_std": [0.3, 0.4],
           "simulated_tau": 1.625, "cache": "c", "split": "val", "num_samples": 3, "num_tokens": 40}
    md = offline_markdown(off)
    assert "| position | acc | loss |" in md
    assert "| 0 | 0.5000 ± 0.1000 | 1.2000 ± 0.3000 |" in md and "| 1 | 0.2500 ± 0.0500 | 2.0000 ± 0.4000 |" in md
    assert "simulated τ = 1.625" in md
    assert "skipped: no cache" in offline_markdown({"skipped": "no cache"})
    # the per-sample spread is preferred when stage 2 provides it
    md = offline_markdown({**off, "acc_sample_std": [0.2, 0.3], "loss_sample_std": [0.6, 0.7]})
    assert "| 1 | 0.2500 ± 0.3000 | 2.0000 ± 0.7000 |" in md and "std over samples" in md


def test_offline_markdown_shows_alpha_beside_acc_and_tau_at_t1():
    off = {"acc": [0.5, 0.25], "acc_std": [0.1, 0.05], "loss": [1.2, 2.0], "loss_std": [0.3, 0.4],
           "simulated_tau": 1.625, "cache": "c", "split": "val", "num_samples": 3, "num_tokens": 40,
           "alpha": [0.6, 0.4], "alpha_hi": [0.65, 0.45], "simulated_tau_t1": 1.84, "simulated_tau_t1_hi": 1.9426}
    md = offline_markdown(off)
    assert "| position | acc | alpha [≤ alpha_hi] | loss |" in md
    assert "| 0 | 0.5000 ± 0.1000 | 0.6000 [0.6500] | 1.2000 ± 0.3000 |" in md
    assert "| 1 | 0.2500 ± 0.0500 | 0.4000 [0.4500] | 2.0000 ± 0.4000 |" in md
    assert "simulated τ = 1.625 (greedy, from acc)" in md
    assert "simulated τ at T = 1 = 1.840 (from alpha; ≤ 1.943 from alpha_hi)" in md


def _cfg(setup, **eval_over):
    from schemas.config import load_config

    d, _, _, files, heads, tdir = setup
    ev = {"head": heads, "prompts": files, "method": ["chain", "tree"], "max_new_tokens": 24,
          "draft_tokens": 3, "top_k": 3, "depth": 3, "total_tokens": 8, "warmup": 1, "repeats": 1,
          "output": str(d / "out")}
    ev.update(eval_over)
    return load_config(raw={"target": {"path": tdir}, "eval": ev,
                            "extract": {"cache": str(d / "nocache")}})


def test_run_eval_report(setup):
    from stage3_eval.evaluate import run_eval

    d, m, tok, files, heads, _ = setup
    cfg = _cfg(setup)
    rep = run_eval(cfg, progress=False, model_tok=(m, tok))
    on_disk = json.loads((d / "out" / "report.json").read_text())
    assert on_disk["heads"][0]["methods"][0]["tau"] == rep["heads"][0]["methods"][0]["tau"]
    assert [h["head"] for h in rep["heads"]] == heads
    for h in rep["heads"]:
        assert [mm["method"] for mm in h["methods"]] == ["chain", "tree"]
        assert h["offline"]["skipped"].startswith("no feature cache")
        for mm in h["methods"]:
            assert set(REQUIRED) <= set(mm)
            assert mm["lossless"] is True and mm["mismatched_prompts"] == []
            assert mm["num_prompts"] == 4 and mm["num_turns"] == 6  # 2 MT-bench x 2 turns + 2 plain
            assert mm["tau"] == mm["new_tokens"] / mm["target_forward_passes"]
            assert len(mm["acceptance_by_depth"]) == 3
            assert mm["speedup"] > 0
    fitted = rep["heads"][1]["methods"]
    untrained = rep["heads"][0]["methods"]
    assert fitted[1]["tau"] > untrained[1]["tau"] and fitted[1]["tau"] > 1.5
    md = (d / "out" / "report.md").read_text()
    assert "| head | method |" in md and "| fitted | tree |" in md
    assert (d / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_eval_sampling(setup):
    """eval.temperatures: one row per temperature and method; at T > 0 the lossless column is the
    sampling check (a correct decoder passes it), at T = 0 token identity; eval.lossless_runs = 0
    turns the check off."""
    from stage3_eval.evaluate import run_eval

    d, m, tok, files, heads, _ = setup
    cfg = _cfg(setup, temperatures=[0, 0.8], head=heads[1], method=["chain", "tree"], max_prompts=2, max_turns=1,
               output=str(d / "samp"), warmup=0, lossless_runs=15, lossless_tokens=5, lossless_prefixes=2)
    rep = run_eval(cfg, progress=False, model_tok=(m, tok))
    rows = rep["heads"][0]["methods"]
    assert [(r["temperature"], r["method"]) for r in rows] == [(0.0, "chain"), (0.0, "tree"), (0.8, "chain"),
                                                              (0.8, "tree")]
    assert rep["settings"]["temperatures"] == [0.0, 0.8]
    for r in rows:
        assert r["num_turns"] == 2 and r["new_tokens"] > 0 and r["lossless"] is True
        if r["temperature"] == 0:
            assert "sampling_check" not in r
        else:
            c = r["sampling_check"]
            assert c["n"] == 2 * 15 * 4 and c["pass"] and c["temperature"] == 0.8 and 0 < c["min_tv"] < 0.5
    md = (d / "samp" / "report.md").read_text()
    assert "| fitted | tree | 0.8 |" in md and "| fitted | chain | 0 |" in md
    assert "### Lossless at T > 0" in md and "* fitted tree T=0.8: pass. 120 tokens after the first" in md
    cfg = _cfg(setup, temperature=0.8, head=heads[1], method="tree", max_prompts=2, max_turns=1,
               output=str(d / "samp0"), warmup=0, lossless_runs=0)
    mm = run_eval(cfg, progress=False, model_tok=(m, tok))["heads"][0]["methods"][0]
    assert mm["lossless"] is None and "sampling_check" not in mm and mm["temperature"] == 0.8


def test_cli_eval(setup, tiny_llama_dir):
    from typer.testing import CliRunner

    import yaml

    from pipeline.cli import app

    d, _, _, files, heads, _ = setup
    cfg = {"target": {"path": str(tiny_llama_dir)}, "extract": {"cache": str(d / "nocache")},
           "eval": {"head": heads[1], "prompts": [files[1]], "method": "chain", "max_new_tokens": 8,
                    "output": str(d / "cli"), "warmup": 0}}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["eval", str(d / "c.yaml"), "eval.draft_tokens=2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "| head | method |" in r.output and "yes |" in r.output
    assert json.loads((d / "cli" / "report.json").read_text())["settings"]["draft_tokens"] == 2
    r = CliRunner().invoke(app, ["eval", str(d / "c.yaml"), f"eval.prompts=[{d / 'missing.jsonl'}]"])
    assert r.exit_code == 1 and "missing.jsonl: prompt file not found" in r.output
