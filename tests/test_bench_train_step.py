"""bench/bench_train_step.py --quick: before / after on the same batches and weights (and SpecForge's
draft model when a venv with it is given: EAGLE3_SPECFORGE_PYTHON)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_train_step as bts  # noqa: E402


def _has_baseline(rev: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _has_baseline("c96fae6"), reason="the baseline commit is not in this clone")


def _rows(path: Path) -> dict:
    rep = json.loads(path.read_text())
    return {(r["impl"], r["T"], r["ttt"]): r for r in rep["rows"]}


def test_quick_before_and_after_agree_on_the_loss_and_both_run(tmp_path, one_thread, monkeypatch):
    monkeypatch.delenv("EAGLE3_SPECFORGE_PYTHON", raising=False)
    out = tmp_path / "q.json"
    assert bts.main(["--quick", "--json", str(out), "--md", str(tmp_path / "q.md")]) == 0
    rows = _rows(out)
    assert sorted(k for k in rows) == sorted((i, T, s) for i in ("after", "before") for T in (16, 32) for s in (2, 3))
    for T in (16, 32):
        for s in (2, 3):
            b, a = rows[("before", T, s)], rows[("after", T, s)]
            assert a["first_loss"] == pytest.approx(b["first_loss"], rel=1e-5)       # same weights, same batch
            assert a["tokens"] == b["tokens"] > 0 and a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0
            assert a["saved_mib"] > 0 and b["saved_mib"] > 0
    md = (tmp_path / "q.md").read_text()
    assert md.startswith("| T | B | TTT | dtype | before tok/s | after tok/s | after / before |")


@pytest.mark.skipif(not os.environ.get("EAGLE3_SPECFORGE_PYTHON"), reason="EAGLE3_SPECFORGE_PYTHON not set")
def test_specforge_draft_model_computes_our_loss(tmp_path, one_thread):
    """SpecForge's draft model, given our initial weights and per-step inputs, gives our first loss:
    the two steps do the same work, so their tokens/s compare."""
    out = tmp_path / "sf.json"
    assert bts.main(["--quick", "--lengths", "16", "--ttt", "3", "--specforge", os.environ["EAGLE3_SPECFORGE_PYTHON"],
                     "--specforge-no-compile", "--json", str(out)]) == 0
    rows = _rows(out)
    sf, a = rows[("specforge", 16, 3)], rows[("after", 16, 3)]
    assert "error" not in sf, sf.get("error")
    assert sf["first_loss"] == pytest.approx(a["first_loss"], rel=1e-5)
    assert sf["tokens_per_s"] > 0 and sf["peak_rss_delta_mib"] is not None
