"""load_target on an offline GPU node. transformers >= 5.2x swaps layers for Hugging Face Hub
kernels by default (`kernels` is one of its requirements); on CUDA that downloads kernel code at
load time, so an offline node failed in from_pretrained (bench/gpu_check.py on an H200:
"Version 2 of 'kernels-community/rotary' is not available in the local cache"). On CPU the
same call finds no kernel to fetch, so the test makes the hub step fail as it does there."""
from __future__ import annotations

import pytest
import transformers.modeling_utils as modeling_utils

from schemas.config import TargetConfig
from schemas.target import load_target
from tiny import tiny_target


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_load_target_never_asks_the_hub_for_kernels(tmp_path, monkeypatch, family):
    def offline_hub(*a, **kw):
        raise ValueError("Version 2 of 'kernels-community/rotary' is not available in the local cache and "
                         "Hugging Face Hub is in offline mode.")

    monkeypatch.setattr(modeling_utils, "kernelize", offline_hub)
    d = tiny_target(tmp_path / "t", family)
    model, _, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    assert model.use_kernels is False
