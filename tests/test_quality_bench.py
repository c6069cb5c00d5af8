"""bench/quality.py's prompt mix (ShareGPT v3 multi-turn + the issue-13 sources, never MT-bench), its
staged sweep ranking, and the published report (bench/quality_report.py)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
import quality_report as qr  # noqa: E402

needs_data = pytest.mark.skipif(not (quality.DATA / "sharegpt_v3").is_dir(), reason="../shared/data is absent")


# --------------------------------------------------------------------------- the prompt mix


@needs_data
def test_prompt_mix_is_multiturn_sharegpt_plus_old_sources_and_never_eval_questions():
    sz = quality.Sizes(sharegpt=300, sharegpt_turns=3, prompts=200)
    train, mt, gsm = quality.prompt_sets(sz)
    assert len(train) == 500 and len({r["id"] for r in train}) == 500
    src = [r["id"].split("-")[0] for r in train]
    assert src.count("sharegptv3") == 300
    # any prefix keeps the shares (a cut run still trains on every source)
    assert abs(src[:100].count("sharegptv3") - 60) <= 2
    multi = [r for r in train if r["id"].startswith("sharegptv3-")]
    assert all(m["from"] == "human" for r in multi for m in r["conversations"])      # the target answers each
    assert max(len(r["conversations"]) for r in multi) == 3
    assert sum(len(r["conversations"]) > 1 for r in multi) > 100
    assert all(len(m["value"]) <= sz.human_chars for r in multi for m in r["conversations"])
    held = {q["prompt"] for q in mt} | {q["question"] for q in gsm}
    mt_all = [json.loads(x) for x in (quality.DATA / "mt_bench" / "question.jsonl").read_text().splitlines()]
    held |= {t for q in mt_all for t in q["turns"]}
    assert not held & {m["value"] for r in train for m in r["conversations"]}
    # the eval sets: all 80 MT-bench first turns, ids carry the category; GSM8K's last 20 rows
    assert len(mt) == 80 and {r["id"].split("-", 2)[2] for r in mt} == {q["category"] for q in mt_all}
    assert sorted(r["prompt"] for r in mt) == sorted(q["turns"][0] for q in mt_all)
    # interleaved by category: any prefix (eval.max_prompts) keeps all 8 categories
    assert len({r["id"].split("-", 2)[2] for r in mt[:8]}) == 8
    assert len(gsm) == 20
    # the same sizes give the same file (the pipeline's fingerprints stay put), a smaller mix is a prefix
    assert quality.prompt_sets(sz)[0] == train
    small = quality.prompt_sets(quality.Sizes(sharegpt=150, sharegpt_turns=3, prompts=200))[0]
    assert {r["id"] for r in small if r["id"].startswith("sharegptv3-")} < {r["id"] for r in multi}


def test_written_prompts_escape_line_separators_that_splitlines_would_break(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "one\u2028two\u0085three\u2029"}]}]
    p = tmp_path / "p.jsonl"
    quality.write_if_changed(p, rows)
    text = p.read_text()
    assert len(text.splitlines()) == 1 and [json.loads(x) for x in text.splitlines()] == rows
    r = tmp_path / "regenerated.jsonl"
    r.write_text(json.dumps({"id": "b", "v": "x\u2028y"}, ensure_ascii=False) + "\n")
    assert len(r.read_text().splitlines()) == 2                       # what stage 1 would have read
    assert quality.escape_line_breaks(r) == 1
    assert [json.loads(x) for x in r.read_text().splitlines()] == [{"id": "b", "v": "x\u2028y"}]
    assert quality.escape_line_breaks(r) == 0                          # nothing left: file untouched


def test_rates_count_each_sweep_stage_by_the_heads_it_trained(monkeypatch, tmp_path):
    # Was: every sweep row carried the whole sweep's tokens (10 heads), so a 2-head stage showed 5x its rate.
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "cache_summary", lambda _: {"samples": 10, "tokens": 5000, "loss_tokens": 3000})
    sz = quality.Sizes(sweep_steps=60, micro_batch=8, final_epochs=5)
    calls = [{"command": "sweep", "config": "sweep-lr", "ran": ["train"] * 3, "wall_s": 100.0, "cpu_s": 200.0,
              "load1": 2.0},
             {"command": "sweep", "config": "sweep-ttt", "ran": ["train"] * 2, "wall_s": 100.0, "cpu_s": 200.0,
              "load1": 2.0}]
    rows = [r for r in quality.rates(tmp_path, sz, calls).splitlines() if r.startswith("| sweep")]
    # one head: 60 steps x 8 samples x 500 tokens a sample = 240,000 tokens
    assert rows == ["| sweep (sweep-lr) | 720,000 | 100.0 | 200.0 | 2.0 | 7,200 | 3,600 |",
                    "| sweep (sweep-ttt) | 480,000 | 100.0 | 200.0 | 2.0 | 4,800 | 2,400 |"]


def test_sweep_ranks_by_tau_over_the_served_depth(tmp_path):
    """TTT 7's two extra positions would win on the full simulated τ; τ@5 ranks the heads as served."""
    rows = [{"name": "ttt_length-5", "train.ttt_length": 5, "finished": True, "acc": [0.6, 0.5, 0.45, 0.4, 0.38],
             "acc_0": 0.6, "simulated_tau": qr_tau([0.6, 0.5, 0.45, 0.4, 0.38])},
            {"name": "ttt_length-7", "train.ttt_length": 7, "finished": True,
             "acc": [0.595, 0.5, 0.45, 0.4, 0.37, 0.9, 0.9], "acc_0": 0.595},
            {"name": "ttt_length-9", "train.ttt_length": 9, "finished": False}]
    rows[1]["simulated_tau"] = qr_tau(rows[1]["acc"])
    assert rows[1]["simulated_tau"] > rows[0]["simulated_tau"]
    (tmp_path / "sweep-ttt").mkdir()
    (tmp_path / "sweep-ttt" / "sweep.json").write_text(json.dumps({"rows": rows}))
    best, table = quality.stage_best(tmp_path, "ttt", "train.ttt_length")
    assert best == 5 and [r["best"] for r in table["rows"]] == [True, False, False]
    assert table["rows"][0]["tau@5"] == pytest.approx(qr_tau(rows[0]["acc"]))
    md = quality.sweep_markdown({"train.ttt_length": best}, {"ttt": table})
    assert "| ttt | **★** ttt_length-5 |" in md and "chosen: ttt_length=5" in md


def qr_tau(acc):
    t, p = 1.0, 1.0
    for a in acc:
        p *= a
        t += p
    return t


# --------------------------------------------------------------------------- the report


def _method(name, tau_by_prompt):
    pp = [{"id": pid, "turn": 0, "new_tokens": n, "passes": k, "wall_s": 1.0, "base_wall_s": 1.0, "match": True}
          for pid, (n, k) in tau_by_prompt.items()]
    new, passes = sum(n for n, _ in tau_by_prompt.values()), sum(k for _, k in tau_by_prompt.values())
    return {"method": name, "num_prompts": len(pp), "tau": new / passes, "speedup": 1.4, "lossless": True,
            "lossless_ties": 0, "acceptance_by_depth": [0.7, 0.5], "per_prompt": pp}


@pytest.fixture()
def fake_run(tmp_path):
    run, head = tmp_path / "run", tmp_path / "run" / "head"
    head.mkdir(parents=True)
    heldout = {"acc": [0.56, 0.45], "loss": [1.0, 1.2], "simulated_tau": 1 + 0.56 + 0.56 * 0.45, "num_samples": 9}
    (head / "config.json").write_text(json.dumps({"training": {"heldout": heldout, "best_step": 3, "total_steps": 3}}))
    (head / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 100 * s}) + "\n" for s in (1, 2, 3)))
    (head / "eval.jsonl").write_text("".join(json.dumps({"step": s, "acc": [0.1 * s, 0.05 * s],
                                                         "simulated_tau": 1 + 0.1 * s}) + "\n" for s in (2, 3)))
    for n in ("prompts.jsonl", "eval_mtbench.jsonl"):
        (run / n).write_text(f"{n}\n")
    cfg = run / "final.yaml"
    cfg.write_text("name: x\n")
    mt = {"mt-81-writing": (30, 10), "mt-82-writing": (10, 10), "mt-101-math": (50, 20)}
    evals = {"MT-bench, target bfloat16": {"heads": [{"methods": [_method("chain", mt), _method("tree", mt)]}]},
             "GSM8K, target bfloat16": {"heads": [{"methods": [_method("chain", {"gsm8k-eval-1": (46, 20)})]}]}}
    return run, head, cfg, evals


def test_report_json_md_png_carry_curves_categories_goals_and_hashes(fake_run, tmp_path):
    run, head, cfg, evals = fake_run
    rep = qr.build_report(run, head, command=["python", "bench/quality.py", "--engine", "vllm"], config=cfg,
                          sizes={"sharegpt": 3}, evals=evals, sweep={"rows": [], "markdown": "x"}, root=ROOT)
    assert [(p["step"], p["tokens"]) for p in rep["curve"]] == [(2, 300), (3, 600)]     # cumulative tokens
    rows = {(r["set"], r["method"]): r for r in rep["eval"]}
    assert rows[("MT-bench", "chain")]["by_category"] == {"math": 2.5, "writing": 2.0}    # Σ new / Σ passes
    goals = {g["goal"]: g for g in rep["goals"]}
    assert goals["MT-bench chain τ"]["value"] == pytest.approx(90 / 40) and goals["MT-bench chain τ"]["met"]
    assert goals["GSM8K chain τ"]["margin"] == pytest.approx(2.3 - 2.2) and goals["GSM8K chain τ"]["met"]
    assert goals["MT-bench chain speed-up"]["met"] and goals["held-out acc_0"]["met"]
    assert rep["config"]["sha256"] == hashlib.sha256(b"name: x\n").hexdigest()
    data = {Path(d["path"]).name: d["sha256"] for d in rep["data"]}
    assert data["prompts.jsonl"] == hashlib.sha256(b"prompts.jsonl\n").hexdigest()
    assert data["regenerated.jsonl"] is None                                             # absent: said so
    paths = qr.write_report(rep, tmp_path / "results", "quality-test")
    back = json.loads(paths["json"].read_text())
    assert back["command"] == rep["command"] and back["goals"] == rep["goals"]
    md = paths["md"].read_text()
    assert "`python bench/quality.py --engine vllm`" in md and rep["config"]["sha256"] in md
    assert "| MT-bench chain τ (bfloat16) | 2.250 | 2.0 | yes | +0.250 |" in md
    assert "| MT-bench (3) | bfloat16 | chain | 2.250 | 1.40× | yes | 2.500 | 2.000 |" in md
    assert "![curves](quality-test.png)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "results").glob("*.tmp*"))


def _curve_report(tokens, acc0, tau, *, seconds=3200.0, head="/elsewhere/head"):
    heldout = {"acc": [acc0[-1], 0.3], "simulated_tau": tau[-1]}
    return {"curve": [{"step": i + 1, "tokens": t, "acc": [a, 0.3], "simulated_tau": s}
                      for i, (t, a, s) in enumerate(zip(tokens, acc0, tau))],
            "head": {"path": "/work/run/head", "heldout": heldout},
            "stages": [{"stage": "train", "seconds": 5.0, "output": "/x/probe"},
                       {"stage": "train", "seconds": seconds, "output": head}],
            "goals": [{"goal": "MT-bench chain τ", "threshold": 2.0, "value": 1.5},
                      {"goal": "MT-bench chain speed-up", "threshold": 1.3, "value": 1.1}]}


def test_projection_reads_a_log_trend_an_hour_on_and_to_each_goal():
    import math

    tokens = [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6]
    acc0 = [0.1 + 0.02 * math.log(t) for t in tokens]
    tau = [1.2 + 0.03 * math.log(t) for t in tokens]
    pj = qr.projection(_curve_report(tokens, acc0, tau))
    assert pj["points"] == 3 and pj["from_tokens"] == 8e5           # the later half of six points
    assert pj["fits"]["acc_0"]["a"] == pytest.approx(0.1) and pj["fits"]["acc_0"]["b"] == pytest.approx(0.02)
    assert pj["rate_tok_s"] == pytest.approx(3.2e6 / 3200)          # the head's stage, matched by folder name
    t1 = 3.2e6 + 1000 * 3600
    rows = {r["quantity"]: r for r in pj["rows"]}
    assert rows["held-out acc_0"]["then"] == pytest.approx(0.1 + 0.02 * math.log(t1))
    assert rows["held-out acc_0"]["hours_to_goal"] == pytest.approx((math.exp(0.45 / 0.02) - 3.2e6) / 1000 / 3600)
    # the real τ's excess over 1 scales with the simulated τ's: 0.5 of it here
    sim0, sim1 = tau[-1], 1.2 + 0.03 * math.log(t1)
    chain = rows["MT-bench chain τ"]
    assert chain["then"] == pytest.approx(1 + 0.5 * (sim1 - 1) / (sim0 - 1))
    need = 1 + 1.0 * (sim0 - 1) / 0.5                                 # the simulated τ that scales to 2.0
    assert chain["hours_to_goal"] == pytest.approx((math.exp((need - 1.2) / 0.03) - 3.2e6) / 1000 / 3600)
    assert "MT-bench chain speed-up" not in rows                     # only τ goals follow the curve
    md = "\n".join(qr.projection_markdown(pj))
    assert "## What the curve says 1 h more training would give" in md
    assert f"| held-out acc_0 | {acc0[-1]:.3f} | {0.1 + 0.02 * math.log(t1):.3f} | 0.55 |" in md


def test_projection_of_a_flat_curve_never_reaches_the_goal_and_short_curves_give_none():
    flat = qr.projection(_curve_report([1e5, 2e5, 4e5], [0.4, 0.4, 0.39], [1.6, 1.6, 1.59]))
    rows = {r["quantity"]: r for r in flat["rows"]}
    assert rows["held-out acc_0"]["never"] and rows["held-out acc_0"]["hours_to_goal"] is None
    assert "| held-out acc_0 | 0.390 | " in "\n".join(qr.projection_markdown(flat))
    assert "never (flat)" in "\n".join(qr.projection_markdown(flat))
    creeping = qr.projection(_curve_report([1e5, 2e5, 4e5], [0.4, 0.4 + 1e-6, 0.4 + 2e-6], [1.6, 1.6, 1.6]))
    assert {r["quantity"]: r for r in creeping["rows"]}["held-out acc_0"]["never"]   # exp(1e5): past any float
    untimed = qr.projection(_curve_report([1e5, 2e5, 4e5], [0.3, 0.35, 0.4], [1.4, 1.5, 1.6], head="/x/other"))
    assert untimed["rate_tok_s"] is None and untimed["tokens_then"] is None
    assert all(r["then"] is None for r in untimed["rows"])
    assert qr.projection(_curve_report([1e5, 2e5], [0.3, 0.4], [1.4, 1.5])) is None


def test_published_report_gains_its_projection_from_the_command_line(fake_run, tmp_path):
    run, head, cfg, evals = fake_run
    (head / "eval.jsonl").write_text("".join(json.dumps({"step": s, "acc": [0.1 * s, 0.05 * s],
                                                         "simulated_tau": 1 + 0.1 * s}) + "\n" for s in (1, 2, 3)))
    rep = qr.build_report(run, head, command=["x"], config=cfg, sizes={}, evals=evals, root=ROOT)
    assert rep["projection"]["rate_tok_s"] is None                  # no stage markers in this run
    rep.pop("projection")
    out = tmp_path / "results"
    qr.write_report(rep, out, "old")
    assert "What the curve says" not in (out / "old.md").read_text()
    assert qr.main([str(out / "old.json")]) == 0
    assert json.loads((out / "old.json").read_text())["projection"]["points"] == 3
    assert "## What the curve says 1 h more training would give" in (out / "old.md").read_text()
