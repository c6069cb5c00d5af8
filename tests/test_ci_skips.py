"""Skips in CI: every `pytest.skip` reason in tests/ is classified (conftest.CI_REQUIRED fails in
CI, conftest.SKIP_ALLOWED stays a skip with its reason printed), and CI=true turns the former
into failures."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def skip_reasons() -> list[tuple[str, str]]:
    """(file:line, leading literal text) of every pytest.skip(...) / pytest.importorskip(...) in tests/."""
    found = []
    for f in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest"):
                continue
            where = f"{f.name}:{node.lineno}"
            if node.func.attr == "importorskip":
                found.append((where, f"could not import '{node.args[0].value}'"))
            elif node.func.attr == "skip" and node.args:
                a = node.args[0]
                if isinstance(a, ast.Constant):
                    found.append((where, a.value))
                elif isinstance(a, ast.JoinedStr):
                    found.append((where, a.values[0].value if isinstance(a.values[0], ast.Constant) else ""))
                else:  # pytest.skip(str(e)): the conftest's vllm_python names its reason below
                    found.append((where, None))
    return found


def test_every_skip_reason_is_classified():
    unclassified = []
    for where, text in skip_reasons():
        if where.startswith("conftest.py") and text is None:
            continue  # vllm_python: skip(str(VllmMissingError)) = "vLLM is not available: ..." (in CI_REQUIRED)
        if text is None or not (text.startswith(tuple(conftest.CI_REQUIRED)) or text in conftest.SKIP_ALLOWED):
            unclassified.append((where, text))
    assert not unclassified, ("skips that tests/conftest.py neither fails in CI (CI_REQUIRED) nor allows "
                              f"(SKIP_ALLOWED): {unclassified}")
    assert len(skip_reasons()) >= 12


def test_the_vllm_missing_message_is_classified():
    from schemas.config import VllmConfig
    from schemas.vllm_runtime import VllmMissingError, engine_python

    try:
        engine_python(VllmConfig(python="/nonexistent/python"))
    except VllmMissingError as e:
        assert str(e).startswith(tuple(conftest.CI_REQUIRED))


def run_pytest(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "def test_service():\n    pytest.skip('could not start a local Slurm: slurmctld exited')\n\n"
        "def test_data():\n    pytest.skip('../shared/data is absent')\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfail():\n    assert False\n\n"
        "def test_ok():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    p = subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return p.stdout


def test_ci_turns_install_skips_into_failures(tmp_path):
    out = run_pytest(tmp_path, "true")
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in out, out
    assert "CI=true: this test would skip (could not start a local Slurm: slurmctld exited); in CI that means the " \
           "local Slurm cluster (munge, slurmctld, slurmd) failed, so it fails instead" in out
    assert "SKIPPED [1] test_x.py:7: ../shared/data is absent" in out  # -ra prints the reason of what remains


def test_outside_ci_they_stay_skips(tmp_path):
    out = run_pytest(tmp_path, None)
    assert "1 passed, 2 skipped, 1 xfailed" in out, out
    assert "could not start a local Slurm: slurmctld exited" in out


def test_the_suite_prints_skip_reasons():
    import tomllib

    cfg = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-ra" in cfg["addopts"].split()  # the short summary lists every skip with its reason
