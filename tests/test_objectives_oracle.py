"""The four objectives against speculators' and SpecForge's own formulas (bench/objectives_oracle.py).

Skips without the peers' oracle venv (EAGLE3_PEERS_PYTHON or .venv-peers; the bench script's
docstring has the two install commands)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def peers_python() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from objectives_oracle import ENV_VAR, oracle_python

    p = oracle_python()
    if p is None:
        pytest.skip(f"no peers' oracle venv ({ENV_VAR} or .venv-peers)")
    return p


def test_objectives_equal_peer_formulas(peers_python, tmp_path):
    out = tmp_path / "oracle.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/objectives_oracle.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    pairs = {(x["objective"], x["peer"]) for x in res["full"]}
    assert pairs == {("ce", "speculators_kl"), ("tv", "speculators_tv"), ("lk_alpha", "speculators_nla"),
                     ("lk_alpha", "specforge_alpha"), ("lk_lambda", "speculators_lk_hybrid"),
                     ("lk_lambda", "specforge_lambda"), ("alpha", "specforge_acceptance")}
    for x in res["full"]:
        assert x["loss"] <= 1e-5 and x["grad"] <= 1e-5, x
    part = res["partial"]
    assert part["lower_bound_holds"] and part["upper_bound_holds"] and part["speculators_over_credits"]
    assert part["mean_alpha_K"] < part["mean_alpha_true"] < part["mean_alpha_hi"]
