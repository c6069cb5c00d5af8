"""bench/offline_vs_real.py: each set's offline table is read on that set's own regenerated answers
(its own cache as extract.eval_cache), beside stage 3's real chain τ on the same prompts."""
from __future__ import annotations

import json
from pathlib import Path

from test_bench_quick import run_script


def test_quick_mode_reads_each_set_on_its_own_answers(tmp_path):
    out = tmp_path / "ovr"
    p = run_script(f"offline_vs_real.py --quick --out {out}", tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row, = json.loads((out / "offline_vs_real.json").read_text())["rows"]
    report = json.loads((out / "eval" / "eval" / "report.json").read_text())
    head, = report["heads"]
    chain, = head["methods"]
    # the offline table is on the 3 answers the target just wrote, not on the training cache's held-out split
    assert head["offline"]["cache"] == str(out / "eval" / "cache") and head["offline"]["split"] == "all"
    assert head["offline"]["num_samples"] == 3
    regen = [json.loads(x) for x in (out / "eval" / "regenerated.jsonl").read_text().splitlines()]
    asked = [json.loads(x)["prompt"] for x in (out / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [r["conversations"][0]["value"] for r in regen] == asked and len(asked) == 3
    assert (row["real_tau"], row["simulated_tau"]) == (chain["tau"], head["offline"]["simulated_tau"])
    assert (row["prompts"], row["max_new_tokens"], row["chain"]) == (3, 8, 3)
    assert f"| eval | 3 | 8 | 3 | {chain['tau']:.3f} | {head['offline']['simulated_tau']:.3f} |" in p.stdout
