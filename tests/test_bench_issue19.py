"""Issue 19's benchmarks run (quick modes): extract peak RSS by shard size, decoded / trained-on rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def test_extract_memory_quick(tmp_path):
    res = _run("extract_memory.py", tmp_path / "m.json")
    runs = {r["samples_per_shard"]: r for r in res["runs"] if r["code"] == "after"}
    assert sorted(runs) == [2, 16] and all(r["peak_rss_mb"] > 100 for r in runs.values())
    assert res["difference_mb"]["after"] == round(runs[16]["peak_rss_mb"] - runs[2]["peak_rss_mb"], 1)


def test_chunk_rows_quick_auto_keeps_a_rank_within_a_quarter_more_rows(tmp_path):
    res = _run("chunk_rows.py", tmp_path / "c.json")
    rows = {r["chunk_rows"]: r for r in res["sources"][0]["rows"]}
    auto = next(r for r in rows.values() if r["auto"])
    assert auto["chunk_rows"] == 512  # 1-4k-token samples: a quarter of the mean, as a power of two
    assert auto["ranks_8"]["max"] <= 1.25 < rows[2048]["ranks_8"]["mean"]  # the old default: 1.7x
    assert res["loader_run"]["decoded_rows"] >= res["loader_run"]["needed_rows"] > 0
